"""The router's live route table: the text nginx's Lua code (templates/router.lua) routes from, and the admin
socket that replaces it at runtime.

One line per fact, names already checked by :func:`deployments.routes.validate_routes`::

    gen 3f2a9c01b7de
    auth <TorchServe inference key, or ->
    route wine 1 2 2500 0        # model stable canary(-) share-in-basis-points shadow(0|1)
    batched wine 2 wine..batched # model version TorchServe-name-of-its-batched-twin

A ``batched`` line makes the version adaptive: a request for it goes to the twin only while another request for the
version is in flight (counted per nginx worker), otherwise to the version's own, unbatched registration
(deployments/torchserve.py ``TorchServeClient.register``). Pinned requests too: the pipeline's load test measures
what clients get.

The table is kept in an nginx shared dict, so a route change or a new inference key is one PUT on the admin socket:
no reload, which would reset requests sent on idle keep-alive client connections (shared/FACTS.md). The socket is a
unix socket in the router's owner-only dir; the same text is written to a 0600 file that nginx loads at start.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from canaryflow.core.errors import ServingError
from canaryflow.core.names import name_problem
from deployments.routes import canary_basis_points

TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]*$")
"""What an inference key may hold: written into the table's ``auth`` line and a header, nothing may break out."""
TWIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""What a batched twin's TorchServe name may hold (a model name and ``..batched``)."""
_GEN = re.compile(r"^gen ([0-9a-f]+)$", re.M)


def build(routes: Mapping[str, Mapping[str, Any]], token: str,
          batched: Iterable[tuple[str, str, str]] = ()) -> str:
    """The table text for checked ``routes`` and the inference key ``token`` (empty: no Authorization header);
    ``batched``: ``(model, version, twin)`` of the versions served with adaptive batching."""
    if not TOKEN_RE.match(token):
        raise ServingError("the TorchServe inference key has unexpected characters; not routing with it")
    lines = [f"auth {token or '-'}"]
    for model, route in sorted(routes.items()):
        canary = route.get("canary")
        bp = canary_basis_points(float(route.get("weight", 0))) if canary else 0
        shadow = 1 if canary and route.get("shadow") else 0
        lines.append(f"route {model} {route['stable']} {canary or '-'} {bp} {shadow}")
    for model, version, twin in sorted(set(batched)):
        if name_problem(model, version) or not TWIN_RE.match(twin):
            raise ServingError(f"not routing to the batched twin {twin!r} of {model!r} v{version!r}: bad name")
        lines.append(f"batched {model} {version} {twin}")
    body = "\n".join(lines) + "\n"
    return f"gen {hashlib.sha256(body.encode()).hexdigest()[:12]}\n{body}"


def generation(text: str) -> str:
    """The ``gen`` of a table text ("" when it has none)."""
    match = _GEN.search(text)
    return match.group(1) if match else ""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AdminSocket:
    """The running router's admin endpoint: its unix socket, owner-only."""

    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def _call(self, method: str, body: str | None = None) -> str:
        conn = _UnixConnection(self.path, self.timeout_s)
        try:
            conn.request(method, "/routes", body=body.encode() if body is not None else None,
                         headers={"Content-Type": "text/plain"})
            resp = conn.getresponse()
            text = resp.read().decode()
        except OSError as exc:
            raise ServingError(f"the router's admin socket {self.path} did not answer: {exc}") from exc
        finally:
            conn.close()
        if resp.status != 200:
            raise ServingError(f"the router refused the route table (HTTP {resp.status}): {text.strip()}")
        return text

    def live(self) -> str:
        """The table the router routes with now."""
        return self._call("GET")

    def put(self, text: str) -> None:
        """Make ``text`` the live table; it routes the next request (the dict is shared by nginx's workers)."""
        answer = self._call("PUT", text)
        if answer.strip() != f"gen {generation(text)}":
            raise ServingError(f"the router answered {answer.strip()!r} to route table {generation(text)}")
