"""rollback(model_name, to_version, reason, requested_by): the champion back to `previous` (or a named version).

A manual deployment: run it from the Prefect UI or with `canaryflow rollback MODEL --reason TEXT`. Traffic, the
TorchServe default and the aliases move together; a ramp in progress is aborted; who and why are recorded on the
versions, on the registered model and in an MLflow run. Safe to run twice.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks import operations
from tasks.report import artifact_key


@flow(name="rollback", log_prints=True)
def rollback(model_name: str, reason: str, to_version: str | None = None,
             requested_by: str = "prefect-ui") -> dict[str, str]:
    """Serve `to_version` (default: the `previous` alias) as champion again; returns what was done."""
    if not reason.strip():
        raise ValueError("a rollback needs a reason")
    result = operations.rollback(model_name, to_version, reason, requested_by)
    get_run_logger().info("rollback of %s: %s", model_name, result["reason"])
    create_markdown_artifact(
        key=artifact_key(model_name, "rollback").replace("release-", "rollback-"),
        markdown=f"# Rollback of `{model_name}`\n\n- champion now: v{result['champion']}\n"
                 f"- before: v{result['from']}\n- changed: {result['changed']}\n- {result['reason']}\n",
        description=f"rollback of {model_name}")
    return result
