"""Failover: circuit breakers per (backend, task), background health checks, and the dispatch loop.

Policy, in the order a request meets it:

1. The task's backends are tried in route order, each **at most once** per request (no retry storm).
   A backend that runs another model (MT Photos ignores the name) is passed over.
2. A backend whose breaker is **open** is passed over. A breaker opens after
   ``breaker.failure_threshold`` consecutive failures on that task, or when ``health.failure_threshold``
   consecutive health checks of the backend fail (then all its tasks open: it is unreachable).
3. After ``breaker.cooldown_s`` an open breaker turns **half-open**: exactly one request goes through
   as a trial; success closes it, failure opens it for another cooldown. A passing health check closes
   breakers that health checks opened (requests failures need a real request to prove recovery:
   a working /ping says nothing about a missing model).
4. If *every* eligible backend is open, the one whose cooldown ends first gets an early trial (one at
   a time); requests that arrive while that trial runs get an immediate 503. Failing instantly would
   fail Immich jobs for the whole cooldown although a backend may be back already (Immich does not
   retry failed jobs by itself); trying all would hammer dead backends.
5. Failures that fail over: connection errors, timeouts, 5xx, 404/503 (model not there), and replies
   that do not validate (garbage, empty, wrong dimension). A 400/413/422 that judges the client's
   input goes back to Immich unchanged: every backend would say the same.
6. When nothing answered: a 503 listing the reason per backend. Each attempt is bounded by the task's
   timeout and all attempts together by ``request_deadline_s``, below Immich's own ~300 s.
7. When a breaker opens, attempts still waiting on its backend for its task are cut at once and fail over
   (``breaker.cut_in_flight``), if a later backend of their route would take them now: the breaker's verdict
   reaches the requests it was made too late for. A hung backend otherwise holds each of them for the whole
   task timeout; its health checks (or the failures of earlier requests) open the breaker long before. With
   nowhere to go, an attempt keeps waiting: a slow answer beats a 503. Hedging (a second backend after a
   latency budget) was the alternative: it doubles the work of every slow request, and OCR on a CPU is slow
   by nature.
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
from gateway.backends.base import Backend, BackendFailure, ClientInputError
from gateway.metrics import BREAKER_STATE_VALUES, Metrics
from gateway.routing import RoutedTask, Router
from gateway.settings import GatewaySettings
from gateway.validate import InvalidResponse, validate_response

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
        """A trial before the cooldown ends (every backend is open; see the module docstring, rule 4)."""
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


@dataclass(eq=False)
class _Waiting:
    """An attempt in flight that a breaker opening may cut: where it could go, and how it is told."""

    fallbacks: tuple[str, ...]  # later backends of its route that can serve its request
    cut: asyncio.Future[str]


class NoBackendAvailable(Exception):
    """Every backend of a task failed or was skipped; ``attempts`` says why, per backend."""

    def __init__(self, task: ModelTask, attempts: list[dict[str, str]], retry_after: float | None) -> None:
        reasons = "; ".join(f"{a['backend']}: {a.get('error') or a.get('skipped')}" for a in attempts)
        super().__init__(f"no backend could serve {task}: {reasons or 'no backend configured'}")
        self.task = task
        self.attempts = attempts
        self.retry_after = retry_after


class Dispatcher:
    def __init__(
        self, settings: GatewaySettings, router: Router, backends: dict[str, Backend], metrics: Metrics
    ) -> None:
        self.settings = settings
        self.router = router
        self.backends = backends
        self.metrics = metrics
        self.breakers: dict[tuple[str, ModelTask], CircuitBreaker] = {}
        # Per breaker, the attempts in flight on it that may be cut when it opens (rule 7).
        self._waiting: dict[tuple[str, ModelTask], set[_Waiting]] = {}
        for task in ModelTask:
            for name in router.backends_for(task):
                breaker = CircuitBreaker(
                    backend=name,
                    task=task,
                    threshold=settings.breaker.failure_threshold,
                    cooldown_s=settings.breaker.cooldown_s,
                    on_change=self._breaker_changed,
                )
                self.breakers[(name, task)] = breaker
                metrics.breaker_state.labels(name, task.value).set(0)

    def _breaker_changed(self, breaker: CircuitBreaker) -> None:
        self.metrics.breaker_state.labels(breaker.backend, breaker.task.value).set(BREAKER_STATE_VALUES[breaker.state])
        if breaker.state is BreakerState.OPEN:
            for waiting in self._waiting.get((breaker.backend, breaker.task), ()):
                if not waiting.cut.done() and any(
                    self.breakers[(name, breaker.task)].would_admit() for name in waiting.fallbacks
                ):
                    waiting.cut.set_result(breaker.last_error or "")
        level = logging.WARNING if breaker.state is BreakerState.OPEN else logging.INFO
        log.log(
            level,
            "circuit breaker %s",
            breaker.state.value,
            extra={
                "fields": {"backend": breaker.backend, "task": breaker.task.value, "last_error": breaker.last_error}
            },
        )

    def breakers_of(self, backend: str) -> list[CircuitBreaker]:
        return [b for (name, _), b in self.breakers.items() if name == backend]

    async def dispatch(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, request_id: str, deadline: float
    ) -> tuple[dict[str, Any], str]:
        """Immich's reply for one task and the backend that made it; raises ClientInputError or NoBackendAvailable."""
        task = routed.task
        label = task.value
        attempts: list[dict[str, str]] = []
        last_failed: str | None = None
        eligible: list[str] = []
        route = self.router.backends_for(task)
        servable = [name for name in route if self.backends[name].cannot_serve(routed) is None]
        for name in route:
            backend = self.backends[name]
            why_not = backend.cannot_serve(routed)
            if why_not is not None:
                attempts.append({"backend": name, "skipped": why_not})
                self.metrics.skipped.labels(name, label, "model").inc()
                continue
            eligible.append(name)
            breaker = self.breakers[(name, task)]
            permit = breaker.acquire()
            if permit is None:
                attempts.append({"backend": name, "skipped": self._open_reason(breaker)})
                self.metrics.skipped.labels(name, label, "breaker_open").inc()
                continue
            if last_failed is not None:
                self.metrics.failovers.labels(label, last_failed).inc()
            fallbacks = tuple(servable[servable.index(name) + 1 :])
            result = await self._attempt(
                backend, breaker, permit, routed, image, text, request_id, deadline, attempts, fallbacks
            )
            if result is not None:
                return result, name
            last_failed = name
        tried = {a["backend"] for a in attempts if "error" in a}
        if not tried and eligible:
            # Rule 4: everything open - one early trial on the backend that reopens first.
            for name in sorted(eligible, key=lambda n: self.breakers[(n, task)].open_until):
                breaker = self.breakers[(name, task)]
                permit = breaker.acquire_early()
                if permit is None:
                    continue
                attempts = [a for a in attempts if a["backend"] != name]
                result = await self._attempt(
                    self.backends[name], breaker, permit, routed, image, text, request_id, deadline, attempts
                )
                if result is not None:
                    return result, name
                break
        retry = [self.breakers[(n, task)].retry_in() for n in eligible]
        raise NoBackendAvailable(task, attempts, min(retry) if retry else None)

    @staticmethod
    def _open_reason(breaker: CircuitBreaker) -> str:
        if breaker.state is BreakerState.HALF_OPEN:
            return f"circuit half-open, a trial request is running (last error: {breaker.last_error})"
        return (
            f"circuit open after {breaker.failures} failure(s), next trial in {breaker.retry_in():.1f}s "
            f"(last error: {breaker.last_error})"
        )

    async def _attempt(
        self,
        backend: Backend,
        breaker: CircuitBreaker,
        permit: Permit,
        routed: RoutedTask,
        image: bytes | None,
        text: str | None,
        request_id: str,
        deadline: float,
        attempts: list[dict[str, str]],
        fallbacks: tuple[str, ...] = (),
    ) -> dict[str, Any] | None:
        task = routed.task.value
        remaining = deadline - time.monotonic()
        if remaining <= 0.01:
            breaker.release(permit)
            attempts.append({"backend": backend.name, "skipped": "request deadline reached"})
            self.metrics.skipped.labels(backend.name, task, "deadline").inc()
            return None
        timeout_s = min(self.settings.timeout(routed.task), remaining)
        started = time.perf_counter()
        failure: tuple[str, str] | None = None
        result: dict[str, Any] = {}
        try:
            raw = await self._predict(backend, routed, image, text, timeout_s, request_id, fallbacks)
            result = raw if backend.checked_replies else validate_response(routed, raw, image=image is not None)
        except ClientInputError:
            # The backend is fine; the input is not. Its verdict goes to Immich as is.
            breaker.success(permit)
            self.metrics.backend_requests.labels(backend.name, task, "client_error").inc()
            raise
        except BackendFailure as exc:
            failure = (exc.kind, exc.reason)
        except InvalidResponse as exc:
            failure = ("invalid_response", f"invalid reply: {exc}")
        except Exception as exc:  # a bug in a backend must fail over, not crash the request
            log.exception("backend raised", extra={"fields": {"backend": backend.name, "task": task}})
            failure = ("error", f"{type(exc).__name__}: {exc}")
        except BaseException:
            # Cancelled (Immich hung up, or shutdown): no verdict on the backend, free its trial slot.
            breaker.release(permit)
            raise
        finally:
            self.metrics.backend_latency.labels(backend.name, task).observe(time.perf_counter() - started)
        if failure is None:
            breaker.success(permit)
            self.metrics.backend_requests.labels(backend.name, task, "ok").inc()
            return result
        kind, reason = failure
        if kind == "cut":
            breaker.release(permit)  # no new evidence: the breaker has already opened, and says why
        else:
            breaker.failure(permit, reason)
        self.metrics.backend_requests.labels(backend.name, task, "failure").inc()
        self.metrics.backend_errors.labels(backend.name, task, kind).inc()
        log.warning(
            "backend attempt failed",
            extra={"fields": {"backend": backend.name, "task": task, "kind": kind, "error": reason}},
        )
        attempts.append({"backend": backend.name, "error": reason, "kind": kind})
        return None

    async def _predict(
        self,
        backend: Backend,
        routed: RoutedTask,
        image: bytes | None,
        text: str | None,
        timeout_s: float,
        request_id: str,
        fallbacks: tuple[str, ...],
    ) -> dict[str, Any]:
        """``backend.predict``, cut short with a BackendFailure if the breaker opens meanwhile (rule 7)."""
        call = backend.predict(routed, image, text, timeout_s=timeout_s, request_id=request_id)
        if not self.settings.breaker.cut_in_flight or not fallbacks:
            return await call
        waiting = _Waiting(fallbacks, asyncio.get_running_loop().create_future())
        on_breaker = self._waiting.setdefault((backend.name, routed.task), set())
        on_breaker.add(waiting)
        attempt = asyncio.ensure_future(call)
        try:
            await asyncio.wait((attempt, waiting.cut), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the request itself was cancelled: so is its attempt
            attempt.cancel()
            raise
        finally:
            on_breaker.discard(waiting)
        if attempt.done():
            return attempt.result()
        attempt.cancel()  # closes its connection; nothing is left to read its outcome, so drop it quietly
        attempt.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise BackendFailure("cut", f"circuit opened while this attempt waited ({waiting.cut.result()})")


class HealthMonitor:
    """Checks remote backends every ``health.interval_s`` and feeds the result to their breakers."""

    def __init__(
        self, settings: GatewaySettings, backends: dict[str, Backend], dispatcher: Dispatcher, metrics: Metrics
    ) -> None:
        self.settings = settings.health
        self.backends = {n: b for n, b in backends.items() if b.has_health_check}
        self.dispatcher = dispatcher
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
        for breaker in self.dispatcher.breakers_of(name):
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
            for breaker in self.dispatcher.breakers_of(name):
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
