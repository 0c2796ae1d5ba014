"""supervisord for the local stack: config rendering, start, XML-RPC control, shutdown by pid."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from canaryflow.core.errors import StackError
from canaryflow.core.paths import StatePaths


@dataclass(frozen=True)
class Program:
    """One supervised process."""

    name: str
    command: list[str]
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    autostart: bool = True
    startsecs: int = 2
    stopwaitsecs: int = 20
    events: str | None = None  # set: an [eventlistener:] (stdout is supervisord's protocol)


def _escape(value: str) -> str:
    # supervisord expands %(name)s in values, so literal percent signs are doubled.
    return value.replace("%", "%%")


def render_config(paths: StatePaths, programs: list[Program]) -> str:
    """supervisord.conf: a private unix socket (0700), logs under the state dir, one section a program."""
    sup = paths.supervisor_dir
    out = [
        "[unix_http_server]", f"file={paths.supervisor_sock}", "chmod=0700", "",
        "[supervisord]", f"logfile={sup / 'supervisord.log'}", f"pidfile={paths.supervisor_pid}",
        f"childlogdir={paths.logs}", "loglevel=info", "minfds=4096",
        # Every file the stack writes (registry db, TorchServe's key file from its first byte, logs, models,
        # batch outputs) is the owner's only.
        "umask=077", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{paths.supervisor_sock}", "",
    ]
    for p in programs:
        env = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(p.env.items()))
        kind = "eventlistener" if p.events else "program"
        out += [
            f"[{kind}:{p.name}]", f"command={_escape(shlex.join(p.command))}", f"directory={p.directory}",
            f"autostart={'true' if p.autostart else 'false'}", "autorestart=true",
            f"startsecs={p.startsecs}", "startretries=5",
            # Whole process groups: TorchServe's Java frontend and Python workers, Prefect's flow runs.
            "stopasgroup=true", "killasgroup=true", f"stopwaitsecs={p.stopwaitsecs}",
        ]
        log = paths.logs / (p.name + ".log")
        if p.events:
            out += [f"events={p.events}", f"stderr_logfile={log}", "stderr_logfile_maxbytes=5MB"]
        else:
            out += ["redirect_stderr=true", f"stdout_logfile={log}", "stdout_logfile_maxbytes=20MB",
                    "stdout_logfile_backups=2"]
        if env:
            out.append(f"environment={env}")
        out.append("")
    return "\n".join(out)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, sock: Path) -> None:
        super().__init__()
        self._sock = str(sock)

    def make_connection(self, host: Any) -> Any:
        import http.client
        import socket

        sock_path = self._sock

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(30)
                self.sock.connect(sock_path)

        return _Conn("localhost")


class Supervisor:
    """Start/stop supervisord and its programs for one state dir."""

    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    def _rpc(self) -> Any:
        proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(self.paths.supervisor_sock))
        return proxy.supervisor

    def pid(self) -> int | None:
        """supervisord's pid when it is running for this state dir."""
        try:
            pid = int(self.paths.supervisor_pid.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    def running(self) -> bool:
        if self.pid() is None:
            return False
        try:
            return self._rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self, config: str, env: dict[str, str], timeout_s: float = 30.0) -> None:
        """Write the config and start supervisord, or make a running one re-read it."""
        # The config holds the programs' environment (the MLflow webhook secrets' Fernet key): owner only.
        fd = os.open(self.paths.supervisor_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(config)
        if self.running():
            added, changed, removed = self._rpc().reloadConfig()[0]
            for name in removed + changed:
                self._safe(lambda n=name: self._rpc().stopProcess(n))
                self._safe(lambda n=name: self._rpc().removeProcessGroup(n))
            for name in added + changed:
                self._safe(lambda n=name: self._rpc().addProcessGroup(n))
            return
        exe = str(Path(sys.executable).parent / "supervisord")
        subprocess.run([exe, "-c", str(self.paths.supervisor_conf)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not self.running():
            if time.monotonic() > deadline:
                raise StackError(f"supervisord did not answer on {self.paths.supervisor_sock} in {timeout_s:.0f} s")
            time.sleep(0.2)

    @staticmethod
    def _safe(call: Any) -> None:
        try:
            call()
        except xmlrpc.client.Fault:
            pass

    def start_program(self, name: str) -> None:
        """Start a program unless it is already running."""
        info = self._rpc().getProcessInfo(name)
        if info["statename"] not in ("RUNNING", "STARTING"):
            self._rpc().startProcess(name, True)

    def stop_program(self, name: str) -> None:
        """Stop a program (waits until it stopped); one that is not running is left alone."""
        info = self._rpc().getProcessInfo(name)
        if info["statename"] in ("RUNNING", "STARTING", "BACKOFF"):
            self._rpc().stopProcess(name, True)

    def processes(self) -> list[dict[str, Any]]:
        """supervisord's view of every program (name, statename, pid, ...); [] when it is down."""
        if not self.running():
            return []
        return list(self._rpc().getAllProcessInfo())

    def shutdown(self, timeout_s: float = 60.0) -> list[int]:
        """Stop everything; then kill by pid whatever survived. Returns the pids that had to be killed."""
        pid = self.pid()
        if pid is None:
            return []
        tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        try:
            self._rpc().shutdown()
        except (OSError, xmlrpc.client.Error):
            os.kill(pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(_procs(tree), timeout=timeout_s)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        return [p.pid for p in alive]


def _procs(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return out
