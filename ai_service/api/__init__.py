"""HTTP routers: Immich's ML protocol and the MT Photos AI API."""
