"""Browser-facing pieces of the gateway, served under /ai/: the Immich web add-on and the admin status page."""

from gateway.web.routes import router

__all__ = ["router"]
