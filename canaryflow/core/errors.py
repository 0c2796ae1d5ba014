"""Typed errors: each says what was measured, what was expected and what to do."""

from __future__ import annotations


class CanaryflowError(Exception):
    """Base of every canaryflow error."""


class ConfigError(CanaryflowError):
    """The settings or the environment cannot work as given."""


class StackError(CanaryflowError):
    """A service of the local stack did not start or answer."""


class RegistryError(CanaryflowError):
    """The MLflow registry does not hold what was asked for."""


class ServingError(CanaryflowError):
    """TorchServe or the router refused or failed an operation."""


class PackagingError(CanaryflowError):
    """The model could not be turned into a TorchServe archive."""


class OrchestrationError(CanaryflowError):
    """Prefect could not confirm a flow run."""


class GateFailed(CanaryflowError):
    """A release gate measured the candidate and refused it; the reason quotes value and threshold."""

    def __init__(self, gate: str, reason: str, outcome: str = "failed") -> None:
        super().__init__(f"{gate}: {reason}")
        self.gate = gate
        self.reason = reason
        self.outcome = outcome  # "inconclusive" / "error": nothing was judged, the release may be run again


class MetricsSourceError(CanaryflowError):
    """The metrics source (router access log, Prometheus) could not be read: not a model failure."""


class BatchError(CanaryflowError):
    """A batch-inference run cannot proceed (missing model, unreadable input, rows unaccounted for)."""


class BatchWriteError(BatchError):
    """Batch output could not be written durably (disk full, write, fsync or rename failed): names the file and what
    to do; finished parts stay valid, so a re-run resumes."""

    def __init__(self, message: str, path: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None]]:  # crosses process boundaries (Dask workers)
        return type(self), (str(self), self.path, self.errno)


class CanaryRolledBack(GateFailed):
    """The canary analysis (or an operator) rolled the candidate back; the reason quotes the failed checks."""

    def __init__(self, reason: str) -> None:
        super().__init__("canary", reason)


class Refused(CanaryflowError):
    """Something a registry user wrote (a model name, a version, a per-model policy) is not allowed; the version is
    tagged ``rejected`` with this reason and nothing else is touched."""
