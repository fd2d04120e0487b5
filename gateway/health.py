"""Circuit breakers per (backend, task) and the background health checks that feed them.

What a breaker does for a request (rules 2-4) and how the dispatcher uses it is told in
:mod:`gateway.dispatch`, with the rest of the failover policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ai_service.protocol.immich import ModelTask
from gateway.backends.base import Backend, BackendFailure
from gateway.metrics import BREAKER_STATE_VALUES, Metrics
from gateway.routing import Router
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Permit:
    trial: bool  # True: the single half-open request whose outcome decides the breaker


@dataclass
class CircuitBreaker:
    backend: str
    task: ModelTask
    threshold: int
    cooldown_s: float
    on_change: Callable[[CircuitBreaker], None] = field(repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    trial_in_flight: bool = False
    opened_by_health: bool = False
    last_error: str | None = None

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            self.on_change(self)

    def _open(self, *, by_health: bool) -> None:
        self.open_until = self.clock() + self.cooldown_s
        self.opened_by_health = by_health
        self._set(BreakerState.OPEN)

    def retry_in(self) -> float:
        return max(0.0, self.open_until - self.clock())

    def acquire(self) -> Permit | None:
        if self.state is BreakerState.CLOSED:
            return Permit(trial=False)
        if self.state is BreakerState.OPEN and self.clock() >= self.open_until:
            self._set(BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return Permit(trial=True)
        return None

    def acquire_early(self) -> Permit | None:
        """A trial before the cooldown ends (every backend is open: rule 4 in gateway/dispatch.py)."""
        if self.state is BreakerState.CLOSED:
            return Permit(trial=False)
        if self.trial_in_flight:
            return None
        self._set(BreakerState.HALF_OPEN)
        self.trial_in_flight = True
        return Permit(trial=True)

    def success(self, permit: Permit) -> None:
        if permit.trial:
            self.trial_in_flight = False
        self.failures = 0
        self.opened_by_health = False
        self._set(BreakerState.CLOSED)

    def failure(self, permit: Permit, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        if permit.trial:
            self.trial_in_flight = False
            self._open(by_health=False)
        elif self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self._open(by_health=False)

    def would_admit(self) -> bool:
        """Whether acquire() would give a permit now (without taking it)."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return self.clock() >= self.open_until
        return not self.trial_in_flight

    def release(self, permit: Permit) -> None:
        """Neither success nor failure (the request was cancelled): free the trial slot."""
        if permit.trial:
            self.trial_in_flight = False

    def health_failed(self, reason: str) -> None:
        self.last_error = f"health check: {reason}"
        if self.state is not BreakerState.HALF_OPEN or not self.trial_in_flight:
            self._open(by_health=True)

    def health_passed(self) -> None:
        if self.state is BreakerState.OPEN and self.opened_by_health:
            self.failures = 0
            self.opened_by_health = False
            self._set(BreakerState.CLOSED)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "consecutive_failures": self.failures,
            "retry_in_s": round(self.retry_in(), 3) if self.state is BreakerState.OPEN else None,
            "last_error": self.last_error,
        }


class Breakers:
    """One breaker per (backend, task) of the routes. A change of state goes to the metrics, to whoever
    listens (the dispatcher cuts attempts waiting on a breaker that opens) and to the log."""

    def __init__(self, settings: GatewaySettings, router: Router, metrics: Metrics) -> None:
        self.metrics = metrics
        self.listeners: list[Callable[[CircuitBreaker], None]] = []
        self._by_key: dict[tuple[str, ModelTask], CircuitBreaker] = {}
        for task in ModelTask:
            for name in router.backends_for(task):
                self._by_key[(name, task)] = CircuitBreaker(
                    backend=name,
                    task=task,
                    threshold=settings.breaker.failure_threshold,
                    cooldown_s=settings.breaker.cooldown_s,
                    on_change=self._changed,
                )
                metrics.breaker_state.labels(name, task.value).set(0)

    def __getitem__(self, key: tuple[str, ModelTask]) -> CircuitBreaker:
        return self._by_key[key]

    def of_backend(self, backend: str) -> list[CircuitBreaker]:
        return [b for (name, _), b in self._by_key.items() if name == backend]

    def _changed(self, breaker: CircuitBreaker) -> None:
        self.metrics.breaker_state.labels(breaker.backend, breaker.task.value).set(BREAKER_STATE_VALUES[breaker.state])
        for listener in self.listeners:
            listener(breaker)
        level = logging.WARNING if breaker.state is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s",
            breaker.state.value,
            extra={
                "fields": {"backend": breaker.backend, "task": breaker.task.value, "last_error": breaker.last_error}
            },
        )


class HealthMonitor:
    """Checks remote backends every ``health.interval_s`` and feeds the result to their breakers."""

    def __init__(
        self, settings: GatewaySettings, backends: dict[str, Backend], breakers: Breakers, metrics: Metrics
    ) -> None:
        self.settings = settings.health
        self.backends = {n: b for n, b in backends.items() if b.has_health_check}
        self.breakers = breakers
        self.metrics = metrics
        self.up: dict[str, bool | None] = dict.fromkeys(self.backends)
        self.failures: dict[str, int] = dict.fromkeys(self.backends, 0)
        self.last_error: dict[str, str | None] = dict.fromkeys(self.backends)
        self.last_checked: dict[str, float | None] = dict.fromkeys(self.backends)
        checking = self.settings.interval_s > 0
        for name, backend in backends.items():
            # In-process backends are up exactly as long as the gateway is; with checks switched off every
            # backend counts as up (as Immich treats its URLs), and failures show in the breakers instead.
            metrics.backend_up.labels(name).set(0 if backend.has_health_check and checking else 1)

    async def run(self) -> None:
        if self.settings.interval_s <= 0 or not self.backends:
            return
        while True:
            await self.check_all()
            await asyncio.sleep(self.settings.interval_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(name) for name in self.backends))

    async def check(self, name: str) -> None:
        backend = self.backends[name]
        try:
            await backend.health(self.settings.timeout_s)
        except BackendFailure as exc:
            self._failed(name, exc.reason)
        except Exception as exc:  # the checker must survive anything a backend does
            self._failed(name, f"{type(exc).__name__}: {exc}")
        else:
            self._passed(name)
        self.last_checked[name] = time.time()

    def _passed(self, name: str) -> None:
        self.failures[name] = 0
        self.last_error[name] = None
        if self.up[name] is not True:
            log.info("backend healthy", extra={"fields": {"backend": name}})
        self.up[name] = True
        self.metrics.backend_up.labels(name).set(1)
        for breaker in self.breakers.of_backend(name):
            breaker.health_passed()

    def _failed(self, name: str, reason: str) -> None:
        self.failures[name] += 1
        self.last_error[name] = reason
        if self.up[name] is not False:
            log.warning("backend unhealthy", extra={"fields": {"backend": name, "error": reason}})
        self.up[name] = False
        self.metrics.backend_up.labels(name).set(0)
        # One missed check may be a blip; only a run of them takes the backend out of rotation.
        if self.failures[name] >= self.settings.failure_threshold:
            for breaker in self.breakers.of_backend(name):
                breaker.health_failed(reason)

    def snapshot(self, name: str) -> dict[str, Any]:
        if name not in self.backends:
            return {"up": True, "health_check": None}
        return {
            "up": self.up[name],
            "health_check": {
                "consecutive_failures": self.failures[name],
                "last_error": self.last_error[name],
                "last_checked_unix": self.last_checked[name],
            },
        }
