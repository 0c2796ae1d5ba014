"""Prefect artifacts that summarise a release (markdown from canaryflow/release/summary_md.py)."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact

from canaryflow.release import narrate, summary_md
from canaryflow.release.steps import ReleaseState
from canaryflow.release.story import Story
from canaryflow.services import get_services


def artifact_key(model: str, version: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"release-{model}-v{version}".lower()).strip("-")


def release_summary(st: ReleaseState, status: str, reason: str, story: Story | None = None) -> None:
    """The release's page: headline (outcome, why, who serves now), facts, gates, every canary analysis, notes."""
    story = story or narrate.story_of(get_services(), st, status, reason)
    create_markdown_artifact(key=artifact_key(st.model, st.version), markdown=summary_md.markdown(story, st.notes),
                             description=story.headline()[:500])
