"""The gateway's one composition root: every long-lived part, built once from the settings.

The HTTP app (``gateway/app.py``, which keeps it in ``app.state.gateway``), its web pages
(``gateway/web``) and the ``regenerate`` command (``gateway/search/cli.py``) all run on a :class:`Gateway`;
none of them builds a part of its own or digs one out of another.

    settings -> router -> backends -> breakers -> dispatcher -> health monitor
                                                            \\-> search (when GATEWAY_IMMICH__URL is set)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from ai_service.protocol.immich import ModelTask
from gateway.backends import Backend, build_backends
from gateway.dispatch import Dispatcher
from gateway.health import Breakers, HealthMonitor
from gateway.metrics import Metrics
from gateway.routing import Router
from gateway.search import SearchFeature
from gateway.search.config_source import ConfigFileError
from gateway.search.database import DatabaseUnavailable
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway")

STATUS_CONFIG_TIMEOUT_S = 2.0  # longest /status waits for Immich's settings (cached; only a cold read waits)


@dataclass(eq=False)
class Gateway:
    settings: GatewaySettings
    router: Router
    metrics: Metrics
    backends: dict[str, Backend]
    breakers: Breakers
    dispatcher: Dispatcher
    monitor: HealthMonitor
    # POST /api/search/smart and /ai/assets/{id}/{ocr,clip}; None (routes absent: 404) without GATEWAY_IMMICH__URL.
    search: SearchFeature | None
    _started: list[Backend] = field(default_factory=list, repr=False)
    _checker: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: GatewaySettings) -> Gateway:
        """Every part, nothing started; raises routing.ConfigError when the configuration cannot work."""
        router = Router(settings)
        metrics = Metrics()
        backends = build_backends(settings)
        breakers = Breakers(settings, router, metrics)
        dispatcher = Dispatcher(settings, router, backends, metrics, breakers)
        return cls(
            settings=settings,
            router=router,
            metrics=metrics,
            backends=backends,
            breakers=breakers,
            dispatcher=dispatcher,
            monitor=HealthMonitor(settings, backends, breakers, metrics),
            search=SearchFeature.from_settings(settings, router, dispatcher),
        )

    async def start(self, *, serving: bool = True) -> None:
        """Start the backends, then (``serving``: the HTTP app) the health checks and the search front with its
        database migration; a one-off command (``serving=False``) needs neither checks nor migration."""
        for backend in self.backends.values():
            await backend.start()
            self._started.append(backend)
        if serving:
            log.info(
                "gateway ready",
                extra={
                    "fields": {
                        "backends": {n: b.describe() for n, b in self.backends.items()},
                        "routes": self.router.describe(),
                    }
                },
            )
            for warning in self.router.startup_warnings():
                log.warning(warning)
            self._checker = asyncio.create_task(self.monitor.run(), name="health-checks")
        if self.search is not None:
            # Never waits for the database: migration runs in the background and /predict serves at once.
            await self.search.start(bootstrap_database=serving)

    async def close(self) -> None:
        """Stop what start() started, the backends last (after uvicorn let in-flight requests finish)."""
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        try:
            if self.search is not None:
                await self.search.close()
        finally:
            for backend in reversed(self._started):
                try:
                    await backend.close()
                except Exception:
                    log.exception("closing backend failed", extra={"fields": {"backend": backend.name}})
            self._started.clear()

    async def warnings(self) -> list[str]:
        """Configurations that work but are probably not what the admin meant (also logged at start-up)."""
        found = self.router.startup_warnings()
        if self.search is not None:
            # Immich's settings unreadable right now: /status still answers, and search.describe says why.
            with contextlib.suppress(TimeoutError, DatabaseUnavailable, ConfigFileError, OSError):
                found += await asyncio.wait_for(self.search.face_warnings(), timeout=STATUS_CONFIG_TIMEOUT_S)
        return found

    async def status(self) -> dict[str, Any]:
        """What ``GET /status`` answers (the admins' page adds to it): no secrets."""
        return {
            "warnings": await self.warnings(),
            "routes": self.router.describe(),
            "backends": {name: {**b.describe(), **self.monitor.snapshot(name)} for name, b in self.backends.items()},
            "breakers": {
                task.value: {name: self.breakers[(name, task)].snapshot() for name in self.router.backends_for(task)}
                for task in ModelTask
            },
            "search": self.search.describe() if self.search is not None else {"enabled": False},
        }


def gateway_of(connection: HTTPConnection) -> Gateway:
    """The running app's composition root (a route's ``request``, or a FastAPI dependency)."""
    gateway: Gateway = connection.app.state.gateway
    return gateway
