"""Wire shapes of the two HTTP protocols the service speaks (Immich ML, MT Photos AI)."""
