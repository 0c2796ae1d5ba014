"""The release summary as markdown (the Prefect release artifact): a headline that says the outcome and who serves
now, the facts with links, every gate, every canary analysis in order with the weight it measured and the checks
that failed, then the notes. Long reasons are shortened here; the full texts are in the canary table artifact,
the release run and the version's tags. Every table is followed by a blank line, so no paragraph after it reads
as one of its rows.
"""

from __future__ import annotations

from typing import Any

from canaryflow.release.story import Story, measured_weight, shorten

CELL = 220  # characters of a reason in a table cell


def markdown(story: Story, notes: list[str]) -> str:
    """The whole page."""
    parts = [f"# {_cell(story.headline(), 400)}", _facts(story), _gates(story)]
    if story.canary.analyses:
        parts.append(_canary(story))
    plain = [n.strip() for n in notes if not n.lstrip().startswith("#")]
    if plain:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in plain))
    parts += [n.strip() for n in notes if n.lstrip().startswith("#")]  # sections of their own (optimization, ...)
    return "\n\n".join(parts).rstrip() + "\n"


def _facts(story: Story) -> str:
    champion = f"v{story.champion_before}" if story.champion_before else "none"
    rows = [("model", f"`{story.model}` v{story.version}"), ("outcome", f"**{story.status}**"),
            ("reason", _cell(story.reason, 600)),
            ("serves now", f"v{story.serving} (champion)" if story.serving else "nothing"),
            ("champion before", champion)]
    if story.variant:
        rows.append(("served variant", story.variant))
    if story.run_url:
        rows.append(("MLflow release run", f"[open]({story.run_url})"))
    if story.version_url:
        rows.append(("MLflow model version", f"[open]({story.version_url})"))
    return table(["", ""], [list(r) for r in rows])


def _gates(story: Story) -> str:
    if not story.results:
        return "## Gates\n\n_no gate ran_"
    rows = [[r.gate, r.outcome.value, _cell(r.reason)] for r in story.results]
    return "## Gates\n\n" + table(["gate", "outcome", "reason"], rows)


def _canary(story: Story) -> str:
    decisive = story.canary.decisive
    rows = []
    for a in story.canary.analyses:
        mark = "**" if a is decisive else ""
        failed = [c for c in a.get("checks") or [] if c.get("outcome") == "failed"]
        checks = "; ".join(_check(c) for c in failed) or _waiting(a)
        rows.append([f"{mark}{a.get('iteration')}{mark}", f"{measured_weight(a):g} %",
                     f"{mark}{a.get('action')}{mark}", _cell(checks, 160),
                     _cell("; ".join(a.get("reasons") or []), 160)])
    head = (f"## Canary\n\n{len(story.canary.analyses)} analyses ({story.canary.path()}), highest share "
            f"{story.canary.max_weight:g} %. The deciding analysis is in bold; every check with its numbers is in "
            "the canary table artifact.")
    deciding = story.canary.deciding_checks()
    if decisive is not None and deciding:
        head += (f"\n\nDecided at analysis {decisive.get('iteration')} ({measured_weight(decisive):g} % measured): "
                 + "; ".join(_check(c) for c in deciding[:4]))
    return head + "\n\n" + table(["analysis", "weight measured", "action", "failed checks", "reason"], rows)


def _check(c: dict[str, Any]) -> str:
    """``agreement 0.81 (threshold 0.95)``."""
    numbers = f" {_num(c.get('measured'))} (threshold {_num(c.get('threshold'))})" if c.get("measured") is not None \
        else ""
    return f"{c.get('name')}{numbers}"


def _waiting(a: dict[str, Any]) -> str:
    held = [c["name"] for c in a.get("checks") or [] if c.get("outcome") in ("inconclusive", "error")]
    return f"none ({', '.join(held)} not judged yet)" if held else "none"


def _num(x: Any) -> str:
    return "-" if x is None else f"{float(x):.4g}"


def _cell(text: str, limit: int = CELL) -> str:
    return shorten(str(text), limit).replace("|", "/")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (cells must not hold ``|`` or line breaks: callers pass :func:`_cell` text)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)
