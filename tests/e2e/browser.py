"""A headless browser for the UI checks: Debian's ``chromium`` renders a page (its JavaScript included) and gives
back the rendered DOM's text, or a PNG screenshot. The Prefect and MLflow UIs are single-page apps that fetch
their data after the first paint, so a check waits, with a deadline, until the text it expects is there."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

WINDOW = "1400,2200"
# Virtual time lets the page's timers run ahead while its requests are answered for real.
BUDGET_MS = 20000


def chromium() -> str:
    """The chromium binary (`make setup` installs Debian's ``chromium``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is not installed: apt-get install chromium (`make setup` does)")
    return found


def _run(url: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="canaryflow-chromium-") as profile:
        cmd = [chromium(), "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={WINDOW}",
               f"--virtual-time-budget={BUDGET_MS}", *args, url]
        if os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # chromium's sandbox refuses to run as root
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "noscript"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def rendered_text(url: str) -> str:
    """The visible text of ``url`` after its scripts ran (whitespace collapsed)."""
    done = _run(url, "--dump-dom")
    if done.returncode != 0:
        raise RuntimeError(f"chromium could not render {url}: {done.stderr[-1000:]}")
    parser = _Text()
    parser.feed(done.stdout)
    return " ".join(" ".join(parser.parts).split())


def wait_for_text(url: str, needles: Iterable[str], timeout_s: float = 180) -> str:
    """The rendered text of ``url`` once it holds every one of ``needles``; AssertionError with what was missing
    and what the page said when the deadline passes."""
    wanted = list(needles)
    deadline = time.monotonic() + timeout_s
    while True:
        text = rendered_text(url)
        missing = [n for n in wanted if n not in text]
        if not missing:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never showed {missing}; it said: {text[:3000]}")
        # no pause: each render takes seconds of virtual and real time already


def screenshot(url: str, path: Path) -> Path:
    """A PNG of ``url`` as rendered, at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run(url, f"--screenshot={path}")
    if done.returncode != 0 or not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium took no screenshot of {url}: {done.stderr[-1000:]}")
    return path
