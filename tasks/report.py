"""Prefect artifacts that summarise a release."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact

from canaryflow.release.steps import ReleaseState
from validation.results import markdown_table


def artifact_key(model: str, version: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"release-{model}-v{version}".lower()).strip("-")


def release_summary(st: ReleaseState, status: str, reason: str) -> None:
    """One markdown table for the release: outcome, gates, links."""
    body = "\n".join([
        f"# Release of `{st.model}` v{st.version}: **{status}**", "", reason, "",
        f"- champion before: {('v' + st.champion) if st.champion else 'none'}",
        f"- MLflow release run: [{st.run_id}]({st.run_url})",
        "", markdown_table(st.results) if st.results else "_no gate ran_", "", *st.notes,
    ])
    create_markdown_artifact(key=artifact_key(st.model, st.version), markdown=body,
                             description=f"release of {st.model} v{st.version}: {status}")
