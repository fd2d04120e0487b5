"""HTTP routers: Immich's ML protocol, the MT Photos AI API and the service's own status."""
