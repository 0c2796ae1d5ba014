"""The traffic router: nginx in front of TorchServe, rendered from a routes file.

``routes.json`` holds what the router serves, as data::

    {"routes": {"iris": {"stable": "3"},
                "wine": {"stable": "1", "canary": "2", "weight": 25.0, "shadow": false}}}

A model without ``canary`` sends all its traffic to ``stable``. With a canary, ``weight`` percent of the unpinned
requests go to it (a hash of model and user header in nginx's Lua: sticky per user), or, with ``shadow: true``,
stable answers all of them and each is copied to the canary (nginx ``mirror``), whose answer is only logged.
``X-Model-Version``
pins a version and beats both, for the pipeline only: a pin without the stack's pin key
(``X-Canaryflow-Pin-Key``, :meth:`NginxRouter.pin_credentials`) is refused with 403.

``nginx.conf`` (``templates/nginx.conf.j2``) holds no route and no key: nginx's Lua code routes from the route
table (:mod:`deployments.route_table`), which a change replaces through the admin socket, at once and with no
reload, so clients keep their keep-alive connections and lose nothing. The same table is written to a 0600 file
that nginx loads when it starts. The config itself is rendered, checked with ``nginx -t`` and reloaded only when
its own text changes (a new stack, an upgrade).
"""

from __future__ import annotations

import fcntl
import grp
import hashlib
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jinja2

from canaryflow.core.errors import ServingError
from canaryflow.core.keys import secret_file
from canaryflow.core.paths import StatePaths
from canaryflow.core.serving_contract import PIN_KEY_HEADER
from canaryflow.core.settings import Settings
from canaryflow.core.state import Route
from deployments import route_table
from deployments.access_log import rotated_indices, rotated_path
from deployments.routes import CANARY_KEYS as _CANARY_KEYS
from deployments.routes import MODEL_PATTERN, VERSION_PATTERN, Routes, validate_routes

# The pin key is written into a double-quoted nginx string: only characters that cannot break out of it.
_TOKEN_RE = route_table.TOKEN_RE
_GENERATION_MARK = "@@CANARYFLOW_GENERATION@@"
_LUA_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/local/nginx/modules")
# A unix socket path must fit sockaddr_un (108 bytes with its NUL).
_MAX_SOCKET_PATH = 100
KEEPALIVE_TIMEOUT_S = 30
# Package data (pyproject: deployments/templates/*). Found next to this module rather than through
# importlib.resources, which fails on the editable install's multiplexed package path.
_TEMPLATE = Path(__file__).with_name("templates") / "nginx.conf.j2"
_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
SHADOW_URI = "/_canaryflow/shadow"
"""The internal location of shadow copies: their access-log lines carry this ``uri`` and ``"shadow": 1``."""
SHADOW_TIMEOUT_S = 5
"""How long a shadow copy may take: its client's request stays open in nginx (and counted) until it is answered."""
_apply_lock = threading.Lock()


class NginxRouter:
    """The local :class:`~deployments.routes.TrafficRouter`: nginx configured from ``paths.router_state``."""

    def __init__(self, settings: Settings, paths: StatePaths, token_provider: Callable[[], str],
                 nginx_bin: str | None = None, reload_timeout_s: float = 10.0,
                 pin_key_provider: Callable[[], str] | None = None,
                 batched_provider: Callable[[], Iterable[tuple[str, str, str]]] | None = None) -> None:
        self.settings = settings
        self.paths = paths
        self.token_provider = token_provider
        # (model, version, TorchServe name of its batched twin) of the versions served with adaptive batching
        self.batched_provider = batched_provider or (lambda: ())
        self.pin_key_provider = pin_key_provider or (lambda: secret_file(paths.pin_key))
        self.nginx_bin = nginx_bin or shutil.which("nginx") or "/usr/sbin/nginx"
        self.reload_timeout_s = reload_timeout_s

    # -- files -------------------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.paths.router_dir / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.paths.router_dir / "error.log"

    @property
    def table_file(self) -> Path:
        """The route table nginx loads at start (0600: it holds the inference key)."""
        return self.paths.router_dir / "routes.table"

    @property
    def admin_socket(self) -> Path:
        """The admin socket: in the router's owner-only dir, or in an owner-only dir under /tmp named after it
        when that path is too long for a unix socket."""
        path = self.paths.router_dir / "admin.sock"
        if len(str(path)) <= _MAX_SOCKET_PATH:
            return path
        digest = hashlib.sha256(str(self.paths.router_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"canaryflow-router-{os.geteuid()}-{digest}" / "admin.sock"

    @property
    def admin(self) -> route_table.AdminSocket:
        return route_table.AdminSocket(self.admin_socket, self.reload_timeout_s)

    def _nginx(self, conf: Path, *extra: str) -> list[str]:
        return [self.nginx_bin, "-c", str(conf), "-p", f"{self.paths.router_dir}/", "-e", str(self.error_log),
                *extra]

    def command(self) -> list[str]:
        """The foreground nginx command line for supervisord. A killed nginx leaves its admin socket behind, and
        nginx cannot bind over it: the shell removes it, then becomes nginx (exec: same pid)."""
        return ["/bin/sh", "-c", 'rm -f -- "$0" && exec "$@"', str(self.admin_socket),
                *self._nginx(self.paths.router_conf, "-g", "daemon off;")]

    # -- state -------------------------------------------------------------------------------------
    def routes(self) -> Routes:
        """The routes in routes.json (empty when there is none yet)."""
        try:
            data = json.loads(self.paths.router_state.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ServingError(f"cannot read {self.paths.router_state}: {exc}; fix or delete it") from exc
        return validate_routes(data.get("routes", {}))

    def route(self, model: str) -> Route | None:
        """What the router serves for ``model`` (None: not routed)."""
        return Route.of(self.routes().get(model))

    def set_route(self, model: str, version: str) -> None:
        """Route all of ``model``'s traffic to ``version``: its canary (and split, shadow) is cleared, other keys
        of its route are kept."""
        routes = self.routes()
        route = {k: v for k, v in routes.get(model, {}).items() if k not in _CANARY_KEYS}
        routes[model] = {**route, "stable": str(version)}
        self.apply(routes)

    def set_split(self, model: str, stable: str, canary: str, weight: float, shadow: bool = False) -> None:
        """``weight`` percent (0 < weight <= 100, 0.01 steps) of ``model``'s unpinned traffic to ``canary``, the
        rest to ``stable``; users with the sticky header stay on one version while the weight holds, and only move
        stable -> canary when it grows. With ``shadow``, stable answers all requests and each is also sent to
        ``canary``, whose answer is only logged; the weight is then kept but ignored (0 allowed)."""
        routes = self.routes()
        routes[model] = {**routes.get(model, {}), "stable": str(stable), "canary": str(canary),
                         "weight": weight, "shadow": shadow}
        self.apply(routes)

    def clear_canary(self, model: str) -> None:
        """All of ``model``'s traffic to its stable version again; a no-op without a canary or route."""
        routes = self.routes()
        route = routes.get(model)
        if route is not None and any(key in route for key in _CANARY_KEYS):
            routes[model] = {k: v for k, v in route.items() if k not in _CANARY_KEYS}
            self.apply(routes)

    def remove_route(self, model: str) -> None:
        """Stop routing ``model``; a no-op when it is not routed."""
        routes = self.routes()
        if routes.pop(model, None) is not None:
            self.apply(routes)

    # -- rendering ---------------------------------------------------------------------------------
    def render(self) -> str:
        """nginx.conf: listeners, guards, logs, the Lua routing and the pin key; no route and no inference key."""
        pin_key = self.pin_key_provider()
        if not pin_key or not _TOKEN_RE.match(pin_key):
            raise ServingError("the router's pin key is empty or has unexpected characters; not rendering it")
        s, d = self.settings, self.paths.router_dir
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                 keep_trailing_newline=True, autoescape=False)
        template = env.from_string(_TEMPLATE.read_text(encoding="utf-8"))
        user_header = s.canary.user_header
        text = template.render(
            pin_key=pin_key, worker_user=_worker_user(), module_dir=_lua_module_dir(),
            lua_dir=_TEMPLATE.parent, table_file=self.table_file, admin_socket=self.admin_socket,
            keepalive_timeout_s=KEEPALIVE_TIMEOUT_S, shadow_uri=SHADOW_URI,
            user_header=user_header, user_var="http_" + user_header.lower().replace("-", "_"),
            listen=_hostport(s.host, s.ports.router),
            upstream=_hostport(s.host, s.ports.torchserve_inference),
            # TorchServe times out at response_timeout_s itself; nginx waits a little longer so that its
            # answer, not a bare 504, reaches the client.
            read_timeout_s=s.serving.response_timeout_s + 5, shadow_timeout_s=SHADOW_TIMEOUT_S,
            pid_file=self.pid_file, error_log=self.error_log, access_log=self.paths.router_access_log,
            temp_dir=d / "tmp", model_pattern=MODEL_PATTERN, version_pattern=VERSION_PATTERN,
            generation=_GENERATION_MARK)
        generation = hashlib.sha256(text.encode()).hexdigest()[:12]
        return text.replace(_GENERATION_MARK, generation)

    def table(self, routes: Mapping[str, Mapping[str, Any]]) -> str:
        """The route table for ``routes`` with TorchServe's current inference key and the versions served with
        adaptive batching; writes nothing."""
        return route_table.build(validate_routes(routes), self.token_provider() or "", self.batched_provider())

    # -- applying ----------------------------------------------------------------------------------
    def write_initial_config(self) -> None:
        """Render nginx.conf and the route table from the current routes (or none) so nginx can start."""
        self.apply(self.routes())

    def refresh(self) -> None:
        """Route with TorchServe's current inference key (after it restarted or the key was renewed): the route
        table again, no reload."""
        self.apply(self.routes())

    def pin_credentials(self) -> dict[str, str]:
        """The header that lets the pipeline's own requests pin a version (``X-Model-Version``)."""
        return {PIN_KEY_HEADER: self.pin_key_provider()}

    def live_table(self) -> str | None:
        """The route table the router routes with: the running nginx's, else the file it starts with (None:
        neither yet)."""
        if self.running_pid() is not None and self.admin_socket.exists():
            return self.admin.live() or None
        try:
            return self.table_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ServingError(f"cannot read {self.table_file}: {exc}") from exc

    def credentials_stale(self) -> bool:
        """Whether the router routes with another table than routes.json with TorchServe's current inference key:
        TorchServe restarted and the router was not refreshed (every request would answer 401), or nginx started
        from the file just before a change reached it. :meth:`refresh` repairs both. False with no table yet."""
        live = self.live_table()
        if live is None or not self.token_provider():
            return False
        return route_table.generation(live) != route_table.generation(self.table(self.routes()))

    def apply(self, routes: Mapping[str, Mapping[str, Any]]) -> None:
        """Make ``routes`` live: write routes.json and the route table, and put the table into a running nginx
        through its admin socket (it routes the next request; no reload). nginx.conf is rendered too and, only
        when its text changed, checked with ``nginx -t`` and reloaded.

        Raises ServingError (with nginx's message) and leaves the old files in place when a new config is invalid.
        """
        checked = validate_routes(routes)
        with self._locked():
            self._ensure_dirs()
            table = self.table(checked)
            self._ensure_config()
            os.replace(_write_tmp(self.table_file, table, mode=0o600), self.table_file)  # it holds the key
            state = json.dumps({"routes": checked}, indent=2, sort_keys=True) + "\n"
            os.replace(_write_tmp(self.paths.router_state, state, mode=0o644), self.paths.router_state)
            if self.running_pid() is not None:
                self.admin.put(table)

    def _ensure_config(self) -> None:
        """nginx.conf as rendered now; a changed one is checked first and a running nginx reloaded with it."""
        text = self.render()
        conf = self.paths.router_conf
        try:
            if conf.read_text() == text:
                return
        except FileNotFoundError:
            pass
        tmp = _write_tmp(conf, text, mode=0o600)
        try:
            self._check(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, conf)
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGHUP)
            self._wait_generation(_generation_of(text))

    # -- logs --------------------------------------------------------------------------------------------
    def rotate_logs(self, max_bytes: int, keep: int) -> bool:
        """Rotate each of the access log and the error log that is over ``max_bytes``: ``access.log`` becomes
        ``access.log.1``, ``.1`` becomes ``.2`` ... up to ``.<keep>`` (the oldest is dropped, as are files past
        ``keep`` left by a larger setting), a new empty owner-only (0600) file takes its place, and a running nginx
        writes to the new files. True when a file was rotated.

        How nginx takes the new files depends on who runs it. Started as a user, its workers run as that user and
        reopen the logs themselves on USR1: no reload, so keep-alive clients lose nothing. Started as root, its
        workers run as nobody and cannot reopen anything in the 0700 state dir (measured: "open() failed (13:
        Permission denied)", and they kept writing to the renamed file), so it is a reload (SIGHUP): the new
        workers get the master's newly opened files, the old ones finish their requests and write those lines to
        the renamed file, where the readers find them (deployments/access_log.py); a reload closes idle keep-alive
        client connections (shared/FACTS.md). Holds the apply lock: a route change cannot interleave. Raises
        ServingError when nginx did not take the new files within ``reload_timeout_s`` (the renamed files stay: no
        line is lost, the readers read them)."""
        if max_bytes < 0 or keep < 1:
            raise ValueError(f"rotate_logs needs max_bytes >= 0 and keep >= 1, not {max_bytes} and {keep}")
        with self._locked():
            logs = [log for log in (self.paths.router_access_log, self.error_log) if _size(log) > max_bytes]
            for log in logs:
                _rotate(log, keep)
            if not logs:
                return False
            pid = self.running_pid()
            if pid is not None:
                os.kill(pid, signal.SIGHUP if _worker_user() else signal.SIGUSR1)
                self._wait_reopened(pid, {_file_id(log) for log in logs})
        return True

    def _wait_reopened(self, master: int, files: set[tuple[int, int]]) -> None:
        """Block until a worker of nginx's ``master`` writes to ``files`` (the new logs)."""
        if not Path("/proc/self/fd").is_dir():
            return  # nothing to look at (not Linux): the reload was asked for, trust it
        deadline = time.monotonic() + self.reload_timeout_s
        while time.monotonic() < deadline:
            if any(files <= _open_files(pid) for pid in _children(master)):
                return
            time.sleep(0.05)
        raise ServingError(f"nginx did not reopen its logs within {self.reload_timeout_s} s after a rotation; see "
                           f"{self.error_log} and {self.error_log}.1")

    def _check(self, conf: Path) -> None:
        """``nginx -t`` on ``conf``; ServingError with nginx's own message when it fails."""
        # nginx -t opens the log files: under umask 077 they are created owner-only, as under supervisord
        proc = subprocess.run(self._nginx(conf, "-t", "-q"), capture_output=True, text=True, timeout=30,
                              preexec_fn=lambda: os.umask(0o077))
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip()
            raise ServingError(f"nginx rejected the new router config, the old one stays live: {msg}")

    def running_pid(self) -> int | None:
        """The nginx master's pid when it is running, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        comm = Path(f"/proc/{pid}/comm")
        # A stale pid file may name an unrelated process now: never signal that one.
        if comm.exists() and not comm.read_text().startswith("nginx"):
            return None
        return pid

    def _wait_generation(self, generation: str) -> None:
        """Block until /ping answers from the new config, so callers know the change is live."""
        deadline = time.monotonic() + self.reload_timeout_s
        while time.monotonic() < deadline:
            # http.client, not urllib: a proxy from the environment must not see loopback traffic.
            conn = http.client.HTTPConnection(self.settings.host, self.settings.ports.router, timeout=1)
            try:
                conn.request("GET", "/ping")
                if json.loads(conn.getresponse().read()).get("generation") == generation:
                    # The master lets old and new workers overlap ~100 ms before it stops the old ones.
                    time.sleep(0.2)
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        raise ServingError(f"nginx did not load config {generation} within {self.reload_timeout_s} s; "
                           f"see {self.error_log}")

    def _ensure_dirs(self) -> None:
        self.paths.router_dir.mkdir(parents=True, exist_ok=True)
        for name in _TEMP_DIRS:
            (self.paths.router_dir / "tmp" / name).mkdir(parents=True, exist_ok=True)
        sockets = self.admin_socket.parent
        if sockets != self.paths.router_dir:
            sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = sockets.stat()  # under /tmp: another user could have made it first
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise ServingError(f"{sockets} (the router's admin socket dir) must be this user's own, mode 0700")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One apply at a time, across threads and processes (CLI and Prefect worker)."""
        self.paths.router_dir.mkdir(parents=True, exist_ok=True)
        with _apply_lock, open(self.paths.router_dir / ".apply.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


def _worker_user() -> str | None:
    """``user`` of nginx's workers when the router starts as root: nobody and its group (None: not root, the
    workers keep the invoking user)."""
    if os.geteuid() != 0:
        return None
    try:
        gid = pwd.getpwnam("nobody").pw_gid
        return f"nobody {grp.getgrgid(gid).gr_name}"
    except KeyError as exc:
        raise ServingError("the router starts as root but this system has no user 'nobody' for its workers") from exc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _rotate(log: Path, keep: int) -> None:
    """``log`` -> ``log.1`` -> ... -> ``log.<keep>`` (renames only: a reader finds each file at its old or its new
    name, access_log.open_rotated); a new empty 0600 ``log`` with the old one's owner in its place."""
    for index in rotated_indices(log):
        if index > keep:
            rotated_path(log, index).unlink(missing_ok=True)
    for index in range(keep - 1, 0, -1):  # oldest first: each rename only moves a file to a higher index
        try:
            os.replace(rotated_path(log, index), rotated_path(log, index + 1))
        except FileNotFoundError:
            pass
    old = log.stat()
    os.replace(log, rotated_path(log, 1))
    # Created here, not by nginx: owner-only whatever the umask of the process that reloads it, and still the
    # owner nginx's master opens it as (a rotation run as root for a stack that is not).
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if os.geteuid() == 0:
            os.fchown(fd, old.st_uid, old.st_gid)
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (nginx's workers), from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses, the fields after the last ")" do not
            if stat[stat.rfind(")") + 2 :].split()[1:2] == [str(pid)]:
                found.append(int(entry.name))
    return found


def _open_files(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the files ``pid`` holds open."""
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def _lua_module_dir() -> str:
    """Where nginx's Lua module (Debian: libnginx-mod-http-lua) and its NDK dependency are installed."""
    for candidate in _LUA_MODULE_DIRS:
        if Path(candidate, "ngx_http_lua_module.so").exists():
            return candidate
    raise ServingError("the router needs nginx's Lua module: apt-get install libnginx-mod-http-lua (`make setup` "
                       "does)")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _generation_of(conf_text: str) -> str:
    match = re.search(r"generation ([0-9a-f]{12})", conf_text)
    if match is None:
        raise ServingError("the router template lost its generation marker")
    return match.group(1)


def _write_tmp(target: Path, text: str, mode: int) -> Path:
    """``text`` in a new file next to ``target`` (same filesystem, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(name, mode)
    return Path(name)
