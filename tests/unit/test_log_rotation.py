"""Router log rotation (NginxRouter.rotate_logs without a running nginx) and the access log's readers across it:
the canary's metrics windows, the feedback endpoint's answer index. The real nginx: tests/integration/
test_log_rotation.py."""

from __future__ import annotations

import configparser
import io
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import RouterSettings, Settings
from canaryflow.local import logrotate
from canaryflow.local.supervisor import render_config
from deployments import access_log
from deployments.feedback import AnswerIndex
from deployments.metrics import AccessLogMetrics
from deployments.router import NginxRouter
from tests.unit.test_metrics import T0, line, write


@pytest.fixture(autouse=True)
def _fresh_cursors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AccessLogMetrics, "_cursors", {})


@pytest.fixture
def router(tmp_path: Path) -> NginxRouter:
    paths = StatePaths(tmp_path / "state").ensure()
    return NginxRouter(Settings(state_dir=paths.root), paths, lambda: "key", pin_key_provider=lambda: "pin")


def log_of(router: NginxRouter) -> Path:
    return router.paths.router_access_log


def seconds(first: int, last: int, version: str = "1", per_second: int = 4) -> list[str]:
    """Lines for each of ``per_second`` requests a second in [first, last) after T0, request ids by their ts."""
    return [line(T0 + s + k / per_second, version) for s in range(first, last) for k in range(per_second)]


def ids(path: Path) -> list[str]:
    return [json.loads(x)["request_id"] for x in path.read_text().splitlines()] if path.exists() else []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- rotation ---------------------------------------------------------------------------------------------------
def test_only_a_log_over_the_limit_is_rotated(router: NginxRouter) -> None:
    log = log_of(router)
    assert router.rotate_logs(0, 3) is False  # no log yet
    log.touch()
    assert router.rotate_logs(0, 3) is False  # an empty log is never rotated
    write(log, *seconds(0, 1))
    size = log.stat().st_size
    assert router.rotate_logs(size, 3) is False and not Path(f"{log}.1").exists()  # at the limit: not over it
    assert router.rotate_logs(size - 1, 3) is True
    assert Path(f"{log}.1").stat().st_size == size and log.stat().st_size == 0
    assert not router.error_log.exists()  # the error log had nothing: left alone


def test_keep_drops_the_oldest(router: NginxRouter) -> None:
    log = log_of(router)
    for generation in range(6):
        write(log, line(T0 + generation, request_id=f"gen{generation}"))
        assert router.rotate_logs(0, 3)
    names = sorted(p.name for p in log.parent.iterdir() if p.name.startswith("access.log"))
    assert names == ["access.log", "access.log.1", "access.log.2", "access.log.3"]
    assert [ids(access_log.rotated_path(log, i)) for i in range(4)] == [[], ["gen5"], ["gen4"], ["gen3"]]
    write(log, line(T0 + 9, request_id="gen9"))
    assert router.rotate_logs(0, 1)  # a smaller keep drops the files past it too
    assert sorted(p.name for p in log.parent.iterdir() if p.name.startswith("access.log")) == [
        "access.log", "access.log.1"]
    assert ids(Path(f"{log}.1")) == ["gen9"]


def test_new_logs_are_owner_only_whatever_the_umask(router: NginxRouter) -> None:
    log = log_of(router)
    write(log, line(T0))
    write(router.error_log, "2027/01/15 08:00:00 [warn] something\n")
    dirs = {d: mode(d) for d in (router.paths.root, router.paths.router_dir)}
    old = os.umask(0o022)
    try:
        assert router.rotate_logs(0, 3)
    finally:
        os.umask(old)
    for path in (log, router.error_log):
        assert mode(path) == 0o600 and path.stat().st_size == 0
        assert path.stat().st_uid == os.geteuid()
    assert Path(f"{router.error_log}.1").read_text().endswith("something\n")
    assert {d: mode(d) for d in dirs} == dirs  # the state dir is not loosened


def test_bad_arguments_are_refused(router: NginxRouter) -> None:
    with pytest.raises(ValueError):
        router.rotate_logs(0, 0)
    with pytest.raises(ValueError):
        router.rotate_logs(-1, 3)


# -- metrics windows ------------------------------------------------------------------------------------------
def test_a_window_across_a_rotation_counts_both_files_once(router: NginxRouter) -> None:
    log = log_of(router)
    write(log, *seconds(0, 100))
    source = AccessLogMetrics(log)
    assert source.window("iris", T0 + 50, T0 + 100).lines == 200  # a cursor on the file about to be renamed
    assert router.rotate_logs(0, 3)
    write(log, *seconds(100, 200))
    assert source.window("iris", T0 + 50, T0 + 150).lines == 400
    assert source.window("iris", T0, T0 + 200).get("1").requests == 800
    assert source.window("iris", T0 + 10, T0 + 20).lines == 40  # all in the rotated file
    assert source.window("iris", T0 + 150, T0 + 160).lines == 40  # all in the new one


def test_a_window_spans_every_rotated_file_that_is_kept(router: NginxRouter) -> None:
    log = log_of(router)
    for first in range(0, 400, 100):
        write(log, *seconds(first, first + 100))
        assert router.rotate_logs(0, 3)  # the 4th rotation drops the oldest hundred seconds
    write(log, *seconds(400, 500))
    assert AccessLogMetrics(log).window("iris", T0, T0 + 500).lines == 400 * 4


def test_lines_the_old_workers_add_to_the_rotated_file_are_counted(router: NginxRouter) -> None:
    """A reload's old workers finish their requests after the rename: their lines land in access.log.1."""
    log = log_of(router)
    write(log, *seconds(0, 10))
    assert router.rotate_logs(0, 3)
    write(log, *seconds(10, 20, version="2"))
    write(Path(f"{log}.1"), line(T0 + 10.5, "1", request_id="late"))  # logged after the rename
    win = AccessLogMetrics(log).window("iris", T0 + 10, T0 + 20)
    assert (win.get("1").requests, win.get("2").requests) == (1, 40)


def test_rotated_files_older_than_the_window_are_not_read(router: NginxRouter,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    log = log_of(router)
    write(log, *seconds(0, 100))
    assert router.rotate_logs(0, 3)
    write(log, *seconds(200, 300))
    read: list[int] = []
    real_lines = access_log.lines
    monkeypatch.setattr(access_log, "lines", lambda fh, offset: read.append(fh.fileno()) or real_lines(fh, offset))
    assert AccessLogMetrics(log).window("iris", T0 + 250, T0 + 260).lines == 40
    assert len(read) == 1  # the new file only: access.log.1 ends 150 s before the window


def test_no_line_is_lost_or_counted_twice_when_a_rotation_runs_between_the_opens(
        router: NginxRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    """The readers take no lock: a rotation may rename the files while they are being opened, one rename at a
    time, at any point. Every interleaving still reads each file exactly once."""
    log = log_of(router)
    renames = 0
    real_open = open
    for after_opens in range(6):
        for path in log.parent.glob("access.log*"):
            path.unlink()
        for first in (0, 10, 20):  # access.log.2, .1 and the live file, 10 s of lines each
            write(log, *seconds(first, first + 10))
            if first < 20:
                router.rotate_logs(0, 3)
        steps = [(access_log.rotated_path(log, i), access_log.rotated_path(log, i + 1)) for i in (2, 1, 0)]
        opens = 0

        def rotating_open(name: Any, *args: Any, _after: int = after_opens, _steps: list = steps) -> Any:
            nonlocal opens, renames
            opens += 1
            if opens > _after and _steps:  # one rename of a rotation before each later open
                os.replace(*_steps.pop(0))
                renames += 1
            return real_open(name, *args)

        monkeypatch.setattr(access_log, "open", rotating_open, raising=False)
        win = AccessLogMetrics(log).window("iris", T0, T0 + 30)
        monkeypatch.delattr(access_log, "open")
        assert win.lines == 120, f"rotation after {after_opens} opens"
    assert renames == 3 + 3 + 2 + 1  # the rotations did run between the opens


# -- answer index ---------------------------------------------------------------------------------------------
def test_the_answer_index_reads_the_rest_of_the_rotated_file_first(router: NginxRouter) -> None:
    log = log_of(router)
    write(log, line(T0, request_id="a"), line(T0 + 1, request_id="b"))
    index = AnswerIndex(log, capacity=100)
    index.refresh()
    write(log, line(T0 + 2, request_id="c"), line(T0 + 3, request_id="d"))  # not read before the rename
    assert router.rotate_logs(0, 3)
    write(log, line(T0 + 4, request_id="e"))
    index.refresh()
    assert list(index._answers) == ["a", "b", "c", "d", "e"]  # in order: the rotated file's rest, then the new one
    write(Path(f"{log}.1"), line(T0 + 4.5, request_id="late"))  # an old worker's last line, after the rename
    write(log, line(T0 + 5, request_id="f"))
    index.refresh()
    assert list(index._answers)[-2:] == ["late", "f"] and len(index._answers) == 7


def test_the_answer_index_after_several_rotations_between_refreshes(router: NginxRouter) -> None:
    log = log_of(router)
    write(log, line(T0, request_id="r0"))
    index = AnswerIndex(log)
    index.refresh()
    for n in range(1, 4):
        write(log, line(T0 + n, request_id=f"r{n}"))
        assert router.rotate_logs(0, 3)
    index.refresh()
    assert list(index._answers) == ["r0", "r1", "r2", "r3"]


def test_a_new_answer_index_reads_the_newest_rotated_file_too(router: NginxRouter) -> None:
    log = log_of(router)
    for n in range(3):
        write(log, line(T0 + n, request_id=f"r{n}"))
        assert router.rotate_logs(0, 3)
    write(log, line(T0 + 3, request_id="r3"))
    index = AnswerIndex(log)
    index.refresh()
    assert list(index._answers) == ["r2", "r3"]  # the answers just before the last rotation, not the whole chain


def test_a_new_file_that_reuses_a_known_inode_is_read_from_its_start(router: NginxRouter,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted at rotation frees its inode, which a new log may get: its first bytes tell them apart."""
    log = log_of(router)
    write(log, *(line(T0 + k, request_id=f"old{k}") for k in range(5)))
    index = AnswerIndex(log)
    index.refresh()
    (key,) = index._read
    log.unlink()
    write(log, line(T0 + 10, request_id="new0"), *(line(T0 + 11 + k, request_id=f"new{k + 1}") for k in range(9)))
    real = access_log.LogFile.key
    monkeypatch.setattr(access_log.LogFile, "key", property(lambda f: key if f.path == log else real.fget(f)))
    index.refresh()
    assert index.get("new0") is not None and index.get("new9") is not None


def test_a_rotation_waits_for_the_router_lock(router: NginxRouter) -> None:
    """A route change (apply) holds the lock through its reload: a rotation cannot rename the logs inside it."""
    log = log_of(router)
    write(log, line(T0))
    done: list[bool] = []
    with router._locked():
        rotation = threading.Thread(target=lambda: done.append(router.rotate_logs(0, 3)))
        rotation.start()
        rotation.join(0.3)
        assert rotation.is_alive() and not Path(f"{log}.1").exists()
    rotation.join(10)
    assert done == [True] and Path(f"{log}.1").exists()


# -- the listener ---------------------------------------------------------------------------------------------
def test_the_stack_runs_the_listener_every_minute(tmp_path: Path) -> None:
    from canaryflow.local.stack import LocalStack

    stack = LocalStack(Settings(state_dir=tmp_path / "state"))
    [program] = [p for p in stack.programs() if p.name == "logrotate"]
    assert program.events == "TICK_60" and program.command[1:] == ["-m", "canaryflow.local.logrotate"]
    parser = configparser.RawConfigParser()
    parser.read_string(render_config(stack.paths, stack.programs()))
    assert parser.get("eventlistener:logrotate", "events") == "TICK_60"


def test_rotate_router_logs_uses_the_settings(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state")
    settings = Settings(state_dir=paths.root, router=RouterSettings(access_log_max_mb=0.001, access_log_keep=2))
    assert "nothing to rotate" in logrotate.rotate_router_logs(settings)
    paths.ensure()
    write(paths.router_access_log, line(T0))
    assert logrotate.rotate_router_logs(settings) == ""  # ~400 bytes, under 1 kB
    write(paths.router_access_log, *seconds(1, 5))
    assert "keeping 2" in logrotate.rotate_router_logs(settings)
    write(paths.router_access_log, line(T0 + 9))
    assert logrotate.rotate_router_logs(settings, force=True)
    assert Path(f"{paths.router_access_log}.2").exists()


def test_the_listener_answers_every_event_even_when_rotation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = iter([RuntimeError("disk on fire"), "rotated something"])

    def fake_rotate() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(logrotate, "rotate_router_logs", fake_rotate)
    event = ("ver:3.0 server:supervisor serial:{n} pool:logrotate poolserial:{n} eventname:TICK_60 len:15\n"
             "when:1800000000")
    stdin = io.StringIO("".join(event.format(n=n) for n in (1, 2)))
    stdout, stderr = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    with pytest.raises(Exception):  # noqa: B017 - end of input: supervisord went away
        logrotate.main()
    assert stdout.getvalue().count("RESULT 2\nOK") == 2 and stdout.getvalue().count("READY\n") == 3
    assert "rotation failed: disk on fire" in stderr.getvalue() and "rotated something" in stderr.getvalue()
