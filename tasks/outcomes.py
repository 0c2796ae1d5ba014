"""Expected outcomes as Prefect states, not tracebacks.

A gate that refuses the candidate, a refused name or policy, a canary analysis whose checks failed: these are the
pipeline working, so their task runs end in a named Failed state with the reason as its message (no exception
escapes the task, so Prefect logs no traceback), and the flow reads the outcome back with :func:`unwrap`.
Anything else a task raises is a real error and stays one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from prefect import get_run_logger
from prefect.client.schemas.objects import State
from prefect.states import Failed

from canaryflow.core.errors import GateFailed, Refused
from validation.results import GateResult

P = ParamSpec("P")
R = TypeVar("R")
MESSAGE = 2000  # characters of a state message (the full reason is in the artifacts and the registry)


def expected_failure(exc: BaseException) -> State:
    """The Failed state an expected outcome ends a task run in: named after it, its reason as the message."""
    name = "GateFailed" if isinstance(exc, GateFailed) else "Refused"
    return Failed(name=name, message=str(exc)[:MESSAGE], data=exc)


def gate_task(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a gate's task function: log every gate result it recorded in one line (with its numbers), and end a
    refusal (GateFailed, Refused) as a named Failed state instead of raising. The state's data is the exception:
    :func:`unwrap` raises it again in the flow."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> Any:
        st = args[0] if args else kwargs.get("st")
        before = len(getattr(st, "results", []) or [])
        try:
            out = fn(*args, **kwargs)
        except (GateFailed, Refused) as exc:
            _log_results(st, before)
            get_run_logger().warning("%s", str(exc)[:MESSAGE])
            return expected_failure(exc)
        _log_results(st, before)
        return out

    return run


def _log_results(st: Any, before: int) -> None:
    for result in (getattr(st, "results", None) or [])[before:]:
        log = get_run_logger()
        (log.info if result.passed else log.warning)("%s", result_line(result))


def result_line(r: GateResult) -> str:
    """``load_test passed: p95 4.1 ms <= 25 ms (p95_ms=4.1, error_ratio=0, rps=812)``."""
    numbers = [f"{k}={_num(v)}" for k, v in r.measured.items()
               if isinstance(v, int | float) and not isinstance(v, bool)][:8]
    return f"{r.gate} {r.outcome.value}: {r.reason}" + (f" ({', '.join(numbers)})" if numbers else "")


def _num(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def unwrap(value: Any) -> Any:
    """A task's return value; a state a task returned (see :func:`gate_task`) gives back its data, and an
    exception in it is raised again here, in the flow, where the release ending handles it."""
    if not isinstance(value, State):
        return value
    data = value.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        raise data
    return data
