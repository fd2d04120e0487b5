"""Failover: each task's backends tried in route order, guarded by circuit breakers (gateway/health.py).

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
from dataclasses import dataclass
from typing import Any

from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH, ModelTask
from gateway.backends.base import CLIENT_FAULTS, Backend, BackendFailure
from gateway.health import Breakers, BreakerState, CircuitBreaker, Permit
from gateway.metrics import Metrics
from gateway.routing import RoutedTask, Router
from gateway.settings import GatewaySettings
from gateway.validate import InvalidResponse, validate_response

# The failover loop lived in gateway/health.py: its log lines keep that logger name, which log filters may use.
log = logging.getLogger("gateway.health")


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
    """The failover loop: the policy above, for one task of one request at a time (``dispatch``)."""

    def __init__(
        self,
        settings: GatewaySettings,
        router: Router,
        backends: dict[str, Backend],
        metrics: Metrics,
        breakers: Breakers,
    ) -> None:
        self.settings = settings
        self.router = router
        self.backends = backends
        self.metrics = metrics
        self.breakers = breakers
        # Per breaker, the attempts in flight on it that may be cut when it opens (rule 7).
        self._waiting: dict[tuple[str, ModelTask], set[_Waiting]] = {}
        breakers.listeners.append(self._cut_waiting)

    def _cut_waiting(self, breaker: CircuitBreaker) -> None:
        if breaker.state is not BreakerState.OPEN:
            return
        for waiting in self._waiting.get((breaker.backend, breaker.task), ()):
            if not waiting.cut.done() and any(
                self.breakers[(name, breaker.task)].would_admit() for name in waiting.fallbacks
            ):
                waiting.cut.set_result(breaker.last_error or "")

    async def dispatch_all(
        self, routed: list[RoutedTask], image: bytes | None, text: str | None, *, request_id: str
    ) -> tuple[dict[str, Any], list[str]]:
        """Immich's reply for every task of a request and the backends that made it, under one deadline."""
        deadline = time.monotonic() + self.settings.request_deadline_s
        if len(routed) == 1:
            result, backend = await self.dispatch(routed[0], image, text, request_id=request_id, deadline=deadline)
            return result, [backend]
        # Immich sends one task per request, but the protocol allows several: run them side by side.
        try:
            async with asyncio.TaskGroup() as group:
                jobs = [
                    group.create_task(self.dispatch(r, image, text, request_id=request_id, deadline=deadline))
                    for r in routed
                ]
        except BaseExceptionGroup as group:
            # One failed task fails the request (as in Immich's service); answer with its own error.
            for error in group.exceptions:
                if isinstance(error, CLIENT_FAULTS | NoBackendAvailable):
                    raise error from None
            raise
        merged: dict[str, Any] = {}
        names: list[str] = []
        for job in jobs:
            result, backend = job.result()
            names.append(backend)
            for key, value in result.items():
                if key in (IMAGE_HEIGHT, IMAGE_WIDTH) and key in merged:
                    continue
                merged[key] = value
        return merged, names

    async def dispatch(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, request_id: str, deadline: float
    ) -> tuple[dict[str, Any], str]:
        """Immich's reply for one task and the backend that made it; raises a CLIENT_FAULTS or NoBackendAvailable."""
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
            early = await self._early_trial(routed, eligible, image, text, request_id, deadline, attempts)
            if early is not None:
                return early
        retry = [self.breakers[(n, task)].retry_in() for n in eligible]
        raise NoBackendAvailable(task, attempts, min(retry) if retry else None)

    async def _early_trial(
        self,
        routed: RoutedTask,
        eligible: list[str],
        image: bytes | None,
        text: str | None,
        request_id: str,
        deadline: float,
        attempts: list[dict[str, str]],
    ) -> tuple[dict[str, Any], str] | None:
        """Rule 4: everything open - one early trial on the backend that reopens first."""
        for name in sorted(eligible, key=lambda n: self.breakers[(n, routed.task)].open_until):
            breaker = self.breakers[(name, routed.task)]
            permit = breaker.acquire_early()
            if permit is None:
                continue
            attempts[:] = [a for a in attempts if a["backend"] != name]
            result = await self._attempt(
                self.backends[name], breaker, permit, routed, image, text, request_id, deadline, attempts
            )
            return None if result is None else (result, name)
        return None

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
        except CLIENT_FAULTS:
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
        self._failed(backend.name, breaker, permit, task, failure, attempts)
        return None

    def _failed(
        self,
        name: str,
        breaker: CircuitBreaker,
        permit: Permit,
        task: str,
        failure: tuple[str, str],
        attempts: list[dict[str, str]],
    ) -> None:
        kind, reason = failure
        if kind == "cut":
            breaker.release(permit)  # no new evidence: the breaker has already opened, and says why
        else:
            breaker.failure(permit, reason)
        self.metrics.backend_requests.labels(name, task, "failure").inc()
        self.metrics.backend_errors.labels(name, task, kind).inc()
        log.warning(
            "backend attempt failed", extra={"fields": {"backend": name, "task": task, "kind": kind, "error": reason}}
        )
        attempts.append({"backend": name, "error": reason, "kind": kind})

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
