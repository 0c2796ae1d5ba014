"""Keep the Prefect runs list about releases: a reconcile pass that did nothing is tagged ``reconcile-noop`` and
ends in a Completed state named ``Idle``, and the idle reconcile runs before it are deleted, so at most one idle
run (the latest: proof that reconcile runs) stands among the release runs. To see releases only, filter the
Prefect UI's runs by tag ``release`` (every release run carries its deployment's tags)."""

from __future__ import annotations

from prefect import get_client, get_run_logger
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run

NOOP_TAG = "reconcile-noop"


def quiet_idle_run(flow_name: str = "reconcile", keep: int = 1) -> int:
    """Tag this run ``reconcile-noop`` and delete the older idle runs of ``flow_name`` beyond the ``keep`` newest
    (this one included); returns how many were deleted. Best effort: housekeeping never fails a reconcile."""
    log = get_run_logger()
    me = flow_run.get_id()
    try:
        with get_client(sync_client=True) as client:
            if me:
                client.update_flow_run(me, tags=sorted({*flow_run.get_tags(), NOOP_TAG}))
            idle = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[NOOP_TAG]),
                                              state=FlowRunFilterState(
                                                  type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                limit=200)
            older = sorted((r for r in idle if str(r.id) != str(me)),
                           key=lambda r: r.expected_start_time or r.created, reverse=True)[max(keep - 1, 0):]
            for r in older:
                client.delete_flow_run(r.id)
            return len(older)
    except Exception as exc:  # noqa: BLE001 - a reconcile that worked must not fail over its housekeeping
        log.warning("could not tidy the idle reconcile runs: %s", exc)
        return 0
