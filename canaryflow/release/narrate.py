"""Tell the release's story where people look in MLflow: the release run's description (``mlflow.note.content``)
and links, the model version's description, and the champion a release replaced (its reason and description say
so, instead of a stale "serving as champion").

Machines keep reading the ``canaryflow.*`` tags; these texts are for people and never read back.
"""

from __future__ import annotations

import logging
import time

from canaryflow.core.state import ReleaseStatus, Tag
from canaryflow.release import ramp_report
from canaryflow.release.steps import ReleaseState
from canaryflow.release.story import CanarySummary, Story, version_url, with_update
from canaryflow.services import Services

_log = logging.getLogger(__name__)
NOTE = "mlflow.note.content"  # the run description the MLflow UI shows


def story_of(svc: Services, st: ReleaseState, status: str, reason: str) -> Story:
    """The release as told so far: its gates, the canary's recorded analyses, links."""
    return Story(st.model, st.version, str(status), reason, st.champion, list(st.results),
                 CanarySummary(ramp_report.read_timeline(st)), st.variant, st.run_url,
                 version_url(svc.settings.mlflow_uri, st.model, st.version))


def tell(svc: Services, st: ReleaseState, status: str, reason: str) -> Story:
    """Write the story to the release run and the model version (and the champion it replaced); a failure to
    write a description is logged, never the reason a release fails."""
    story = story_of(svc, st, status, reason)
    try:
        svc.registry.annotate_run(st.run_id, {NOTE: story.run_note(), "canaryflow.outcome": str(status),
                                              "canaryflow.model_version_url": story.version_url,
                                              "canaryflow.serving_after": story.serving or "none"})
        svc.registry.describe_version(st.model, st.version, story.version_description())
        svc.registry.set_tags(st.model, st.version, {"canaryflow.release_run_url": st.run_url})
        if status == ReleaseStatus.RELEASED and st.champion and st.champion != st.version:
            replaced(svc, st.model, st.champion, f"replaced as champion by v{st.version} at {_now()} "
                                                 f"(release run: {st.run_url})")
    except Exception as exc:  # noqa: BLE001 - the record of a release must not undo the release
        _log.warning("could not write the story of %s v%s to MLflow: %s", st.model[:80], st.version, exc)
    return story


def replaced(svc: Services, model: str, version: str, update: str, status: str | None = None) -> None:
    """A version that no longer serves as champion: its reason tag and the top of its description say why (its
    status stays, e.g. ``released``: it passed its release and can be rolled back to)."""
    tags = {Tag.REASON: update, **({Tag.STATUS: status} if status else {})}
    svc.registry.set_tags(model, version, tags)
    describe_update(svc, model, version, update)


def describe_update(svc: Services, model: str, version: str, update: str) -> None:
    """Put ``update`` on top of the version's description, keeping its release summary below."""
    try:
        current = svc.registry.get_version(model, version).description
        svc.registry.describe_version(model, version, with_update(current, update))
    except Exception as exc:  # noqa: BLE001 - a description is for people; the tags already say it
        _log.warning("could not update the description of %s v%s: %s", model[:80], version, exc)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
