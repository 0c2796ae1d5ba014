"""The nginx router's rendering, route table and state handling, without starting nginx (the Lua routing itself
runs against the real nginx in tests/integration/test_router_canary.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from canaryflow.core.errors import ServingError
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Ports, Settings
from deployments import route_table
from deployments import router as router_mod
from deployments.router import SHADOW_URI, NginxRouter
from deployments.routes import TrafficRouter, validate_routes

TOKEN = "tok-A1b2.C3_d4"
ROUTER_PORT, INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT = 18777, 18778, 18779, 18780


@pytest.fixture
def router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NginxRouter:
    settings = Settings(state_dir=tmp_path / "state", ports=Ports(
        router=ROUTER_PORT, torchserve_inference=INFERENCE_PORT, torchserve_management=MANAGEMENT_PORT,
        torchserve_metrics=METRICS_PORT))
    r = NginxRouter(settings, StatePaths(settings.state_dir), lambda: TOKEN)
    monkeypatch.setattr(r, "_check", lambda conf: None)  # no nginx binary needed here
    monkeypatch.setattr(router_mod, "_lua_module_dir", lambda: "/usr/lib/nginx/modules")
    return r


def _table(router: NginxRouter) -> str:
    return router.table_file.read_text()


def _route_lines(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("route ")]


def _map_block(conf: str, variable: str) -> str:
    match = re.search(r"map \$\S+ \$" + variable + r" \{(.*?)\n    \}", conf, re.S)
    assert match, f"no map for ${variable}"
    return match.group(1)


def _location(conf: str, name: str) -> str:
    match = re.search(r"\n        location " + re.escape(name) + r" \{(.*?)\n        \}\n", conf, re.S)
    assert match, f"no location {name}"
    return match.group(1)


def test_nginx_router_is_a_traffic_router(router: NginxRouter) -> None:
    assert isinstance(router, NginxRouter)
    _: TrafficRouter = router


def test_the_config_holds_no_route_and_no_key(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "3"}, "wine.v2": {"stable": "12", "canary": "13", "weight": 5}})
    conf = router.paths.router_conf.read_text()
    assert TOKEN not in conf and "iris" not in conf and "wine" not in conf
    assert "proxy_pass http://torchserve/predictions/$cf_upstream_model/$cf_version;" in conf
    assert "proxy_set_header Authorization $cf_auth;" in conf
    assert f'require("canaryflow_router").load("{router.table_file}")' in conf
    assert f"listen unix:{router.admin_socket};" in conf
    assert "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;" in conf
    assert re.search(r"keepalive_timeout \d+s;", conf) and "keepalive_timeout 0;" not in conf


def test_the_route_table_routes_each_model(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "3"}, "wine.v2": {"stable": "12"}})
    table = _table(router)
    assert _route_lines(table) == ["route iris 3 - 0 0", "route wine.v2 12 - 0 0"]
    assert f"\nauth {TOKEN}\n" in table and table.startswith("gen ")
    assert router.table_file.stat().st_mode & 0o077 == 0  # it holds the inference key


def test_render_with_no_routes_is_complete(router: NginxRouter) -> None:
    router.write_initial_config()
    assert _route_lines(_table(router)) == []
    conf = router.paths.router_conf.read_text()
    assert "routed models" not in conf  # a 404 never lists what else is served
    assert "client_header_timeout 5s;" in conf and "limit_conn cf_per_client 512;" in conf


def test_the_table_reads_the_key_at_each_change(router: NginxRouter) -> None:
    tokens = iter(["first", "second", ""])
    router.token_provider = lambda: next(tokens)
    assert "\nauth first\n" in router.table({})
    assert "\nauth second\n" in router.table({})
    assert "\nauth -\n" in router.table({})  # no key: no Authorization header at all


def test_a_key_that_could_break_the_table_is_refused(router: NginxRouter) -> None:
    router.token_provider = lambda: "abc\nroute evil 1 - 0 0"
    with pytest.raises(ServingError, match="unexpected characters"):
        router.table({})


def test_render_refuses_a_pin_key_that_could_break_the_config(router: NginxRouter) -> None:
    router.pin_key_provider = lambda: 'abc"; return 200 "x'
    with pytest.raises(ServingError, match="unexpected characters"):
        router.render()


def test_render_listens_on_the_router_port_and_proxies_to_inference_only(router: NginxRouter) -> None:
    conf = router.render()
    assert re.findall(r"^\s*listen (\S+);", conf, re.M) == [f"127.0.0.1:{ROUTER_PORT}",
                                                             f"unix:{router.admin_socket}"]
    assert re.findall(r"^\s*server (\S+);", conf, re.M) == [f"127.0.0.1:{INFERENCE_PORT}"]
    assert str(MANAGEMENT_PORT) not in conf and str(METRICS_PORT) not in conf


def test_no_location_reaches_the_management_api(router: NginxRouter) -> None:
    conf = router.render()
    locations = re.findall(r"^\s*location (.+?) \{", conf, re.M)
    assert locations == ["= /ping", "/predictions/", f"= {SHADOW_URI}", "/", "@upstream_unavailable",
                         "@upstream_timeout", "@not_found", "@too_large", "= /routes", "/"]
    # $cf_upstream_model: the model, or its batched twin named in the route table
    assert re.findall(r"proxy_pass (\S+);", conf) == ["http://torchserve/predictions/$cf_upstream_model/$cf_version",
                                                      "http://torchserve/predictions/$cf_copy_model/$cf_canary"]
    assert "internal;" in _location(conf, f"= {SHADOW_URI}")
    catch_all = conf.split("location / {", 1)[1].split("}", 1)[0]
    assert "return 404" in catch_all and "proxy_pass" not in catch_all
    assert "/models" not in conf and "/api" not in conf


def test_the_admin_socket_is_owner_only_and_fits_a_unix_socket(router: NginxRouter, tmp_path: Path) -> None:
    assert router.admin_socket.parent == router.paths.router_dir  # the state dir's router dir (0700)
    deep = tmp_path / ("d" * 120)
    long = NginxRouter(router.settings, StatePaths(deep), lambda: TOKEN)
    assert len(str(long.admin_socket)) < 108 and long.admin_socket.parent != long.paths.router_dir
    long._ensure_dirs()
    assert long.admin_socket.parent.stat().st_mode & 0o077 == 0
    assert long.admin_socket == NginxRouter(router.settings, StatePaths(deep), lambda: TOKEN).admin_socket
    long.admin_socket.parent.rmdir()


def test_credentials_are_stale_when_the_live_table_holds_another_key(router: NginxRouter) -> None:
    assert not router.credentials_stale()  # no table yet
    router.write_initial_config()
    assert not router.credentials_stale()
    router.token_provider = lambda: "tok-after-restart"
    assert router.credentials_stale()
    router.refresh()
    assert not router.credentials_stale() and "\nauth tok-after-restart\n" in _table(router)


def test_a_table_behind_routes_json_is_stale_too(router: NginxRouter) -> None:
    router.set_route("iris", "1")
    router.paths.router_state.write_text(json.dumps({"routes": {"iris": {"stable": "2"}}}))
    assert router.credentials_stale()  # nginx started from the file just before a change reached it
    router.refresh()
    assert not router.credentials_stale() and _route_lines(_table(router)) == ["route iris 2 - 0 0"]


def test_render_validates_the_version_pin(router: NginxRouter) -> None:
    conf = router.render()
    assert '"~^[0-9A-Za-z._-]{1,32}$" 0;' in _map_block(conf, "cf_pin_invalid")
    assert "default 1;" in _map_block(conf, "cf_pin_invalid")
    assert '"~^[0-9A-Za-z._-]{1,32}$" $http_x_model_version;' in _map_block(conf, "cf_version")
    assert '"" $cf_routed;' in _map_block(conf, "cf_version")  # a valid pin still wins: tested against nginx
    assert "if ($cf_pin_invalid)" in conf and "return 400" in conf


def test_render_has_a_json_access_log_and_request_ids(router: NginxRouter) -> None:
    conf = router.render()
    assert "log_format canaryflow escape=json" in conf
    assert f"access_log {router.paths.router_access_log} canaryflow buffer=64k flush=1s;" in conf
    assert "add_header X-Request-ID $cf_request_id always;" in conf
    assert "proxy_set_header X-Request-ID $cf_request_id;" in conf


def test_generation_changes_with_routes_and_token(router: NginxRouter) -> None:
    a = route_table.generation(router.table({"iris": {"stable": "1"}}))
    assert a == route_table.generation(router.table({"iris": {"stable": "1"}}))
    assert a != route_table.generation(router.table({"iris": {"stable": "2"}}))
    router.token_provider = lambda: "other"
    assert a != route_table.generation(router.table({"iris": {"stable": "1"}}))


@pytest.mark.parametrize("routes", [
    {"bad name": {"stable": "1"}},
    {"../etc": {"stable": "1"}},
    {"iris": {"stable": "1; evil"}},
    {"iris": {"stable": ""}},
    {"iris": {}},
])
def test_invalid_routes_are_refused(router: NginxRouter, routes: dict) -> None:
    with pytest.raises(ServingError):
        router.apply(routes)
    assert not router.paths.router_state.exists() and not router.table_file.exists()


def test_routes_round_trip_through_routes_json(router: NginxRouter) -> None:
    assert router.routes() == {}
    router.set_route("iris", "3")
    router.set_route("wine", 7)  # type: ignore[arg-type]
    assert json.loads(router.paths.router_state.read_text()) == {
        "routes": {"iris": {"stable": "3"}, "wine": {"stable": "7"}}}
    assert router.routes() == {"iris": {"stable": "3"}, "wine": {"stable": "7"}}
    router.remove_route("wine")
    router.remove_route("absent")
    assert router.routes() == {"iris": {"stable": "3"}}
    assert _route_lines(_table(router)) == ["route iris 3 - 0 0"]


def test_set_route_keeps_other_route_keys_and_clears_the_canary(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "3", "canary": "5", "weight": 5, "future_key": {"x": 1}}})
    router.set_route("iris", "4")
    assert router.routes() == {"iris": {"stable": "4", "future_key": {"x": 1}}}


def test_config_is_private_and_no_temp_files_remain(router: NginxRouter) -> None:
    router.set_route("iris", "1")
    assert router.paths.router_conf.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in router.paths.router_dir.glob(".*.tmp")) == []
    assert all((router.paths.router_dir / "tmp" / d).is_dir() for d in router_mod._TEMP_DIRS)


def test_an_invalid_config_keeps_the_old_files(router: NginxRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    router.set_route("iris", "1")
    conf_before = router.paths.router_conf.read_text()
    state_before = router.paths.router_state.read_text()

    def reject(conf: Path) -> None:
        raise ServingError('nginx rejected the new router config: [emerg] unknown directive "bogus"')

    monkeypatch.setattr(router, "_check", reject)
    router.settings.serving.response_timeout_s += 1  # a config change (a route change alone is not one)
    with pytest.raises(ServingError, match="bogus"):
        router.set_route("iris", "2")
    assert router.paths.router_conf.read_text() == conf_before
    assert router.paths.router_state.read_text() == state_before
    assert list(router.paths.router_dir.glob(".*.tmp")) == []


def test_check_reports_nginx_message(router: NginxRouter, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    class Proc:
        returncode = 1
        stdout = ""
        stderr = 'nginx: [emerg] unknown directive "bogus" in /x/nginx.conf:3'

    calls: list[list[str]] = []
    monkeypatch.setattr(router_mod.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Proc())
    with pytest.raises(ServingError, match='unknown directive "bogus"'):
        NginxRouter._check(router, tmp_path / "candidate.conf")
    assert calls[0][:3] == [router.nginx_bin, "-c", str(tmp_path / "candidate.conf")]
    assert "-t" in calls[0]


def test_a_route_change_never_reloads_a_running_nginx(router: NginxRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    router.set_route("iris", "1")  # nothing running: no signal, no put
    router.paths.router_dir.joinpath("nginx.pid").write_text("999999999\n")
    assert router.running_pid() is None
    signals: list[tuple[int, int]] = []
    waited: list[str] = []
    put: list[str] = []
    monkeypatch.setattr(router, "running_pid", lambda: 4242)
    monkeypatch.setattr(router_mod.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    monkeypatch.setattr(router, "_wait_generation", waited.append)
    monkeypatch.setattr(route_table.AdminSocket, "put", lambda self, text: put.append(text))
    router.set_route("iris", "2")
    router.set_split("iris", "2", "3", 25)
    assert signals == [] and waited == []
    assert [_route_lines(text) for text in put] == [["route iris 2 - 0 0"], ["route iris 2 3 2500 0"]]
    router.settings.serving.response_timeout_s += 1  # the config's own text changed: that one reloads
    router.refresh()
    assert signals == [(4242, router_mod.signal.SIGHUP)]
    assert waited and waited[0] in router.paths.router_conf.read_text()


def test_command_runs_nginx_in_the_foreground(router: NginxRouter) -> None:
    cmd = router.command()
    assert cmd[:2] == ["/bin/sh", "-c"] and cmd[3] == str(router.admin_socket)  # a stale socket is removed first
    nginx = cmd[4:]
    assert nginx[0] == router.nginx_bin
    assert nginx[nginx.index("-c") + 1] == str(router.paths.router_conf)
    assert nginx[nginx.index("-p") + 1].rstrip("/") == str(router.paths.router_dir)
    assert nginx[-2:] == ["-g", "daemon off;"]


def test_write_initial_config_with_no_routes(router: NginxRouter) -> None:
    router.write_initial_config()
    assert router.paths.router_conf.exists() and router.table_file.exists()
    assert json.loads(router.paths.router_state.read_text()) == {"routes": {}}


# -- canary: weighted split, sticky users, shadow --------------------------------------------------------------------


def test_a_split_is_a_share_in_basis_points(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "1", "canary": "2", "weight": 25},
                  "wine.v2": {"stable": "3", "canary": "4", "weight": 0.5}, "plain": {"stable": "9"},
                  "full": {"stable": "1", "canary": "2", "weight": 100}})
    assert _route_lines(_table(router)) == ["route full 1 2 10000 0", "route iris 1 2 2500 0",
                                            "route plain 9 - 0 0", "route wine.v2 3 4 50 0"]


@pytest.mark.parametrize(("weight", "bp"), [(5, 500), (12.25, 1225), (0.01, 1), (99.99, 9999), (50.0, 5000)])
def test_split_shares(router: NginxRouter, weight: float, bp: int) -> None:
    assert _route_lines(router.table({"iris": {"stable": "1", "canary": "2", "weight": weight}})) == [
        f"route iris 1 2 {bp} 0"]


def test_split_key_is_the_user_header_else_the_request_id(router: NginxRouter) -> None:
    key = _map_block(router.render(), "cf_split_key")
    assert '"" $request_id;' in key and "default $http_x_user_id;" in key
    router.settings.canary.user_header = "X-Tenant-Key"
    conf = router.render()
    assert "map $http_x_tenant_key $cf_split_key" in conf
    assert "default $http_x_tenant_key;" in _map_block(conf, "cf_split_key")


def test_shadow_is_a_route_flag_and_the_copy_location_drops_other_models(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "1", "canary": "2", "weight": 30, "shadow": True},
                  "wine": {"stable": "1", "canary": "2", "weight": 30}})
    assert _route_lines(_table(router)) == ["route iris 1 2 3000 1", "route wine 1 2 3000 0"]
    conf = router.paths.router_conf.read_text()
    predictions = _location(conf, "/predictions/")
    assert f"mirror {SHADOW_URI};" in predictions and "mirror_request_body on;" in predictions
    assert conf.count("mirror ") == 1
    copy = _location(conf, f"= {SHADOW_URI}")
    assert re.search(r'if \(\$cf_shadow_on = ""\) \{\s*access_log off;\s*return 204;', copy)
    assert "proxy_pass http://torchserve/predictions/$cf_copy_model/$cf_canary;" in copy
    assert 'proxy_set_header X-Canaryflow-Pinned "";' in copy  # copies are live traffic: chaos applies
    assert re.search(r"if \(\$cf_pinned\) \{\s*access_log off;\s*return 204;", copy)  # pins are never copied
    assert "log_subrequest on;" in conf


def test_access_log_fields_for_the_canary_analysis(router: NginxRouter) -> None:
    conf = router.render()
    fmt = "".join(re.findall(r"'([^']*)'", conf.split("log_format canaryflow escape=json", 1)[1].split(";")[0]))
    record = json.loads(re.sub(r"\$\w+", "0", fmt))
    assert set(record) == {"ts", "time", "request_id", "model", "version", "upstream_version", "status",
                           "request_time", "upstream_time", "upstream_status", "method", "uri", "request_bytes",
                           "body_bytes", "prediction", "pinned", "shadow"}
    assert '"ts":$msec' in fmt and '"prediction":"$upstream_http_x_prediction"' in fmt
    assert '"version":"$cf_answered"' in fmt and '"shadow":$cf_shadow_line' in fmt
    # Subrequests share the main request's cached variables: only volatile maps differ on a shadow line.
    assert "volatile;" in _map_block(conf, "cf_shadow_line") and "volatile;" in _map_block(conf, "cf_answered")
    assert f'"{SHADOW_URI}" 1;' in _map_block(conf, "cf_shadow_line")
    assert "proxy_hide_header X-Prediction;" in conf


@pytest.mark.parametrize(("route", "words"), [
    ({"stable": "1", "canary": "2", "weight": 0}, "0 < weight <= 100"),
    ({"stable": "1", "canary": "2", "weight": -5}, "out of range"),
    ({"stable": "1", "canary": "2", "weight": 100.5}, "out of range"),
    ({"stable": "1", "canary": "2", "weight": "25"}, "not a number"),
    ({"stable": "1", "canary": "2", "weight": True}, "not a number"),
    ({"stable": "1", "canary": "2", "weight": float("nan")}, "not a number"),
    ({"stable": "1", "canary": "2", "weight": 0.001}, "more than 2 decimals"),
    ({"stable": "1", "canary": "2"}, "needs a weight"),
    ({"stable": "1", "canary": "1", "weight": 5}, "both version '1'"),
    ({"stable": "1", "canary": "2; evil", "weight": 5}, "canary version"),
    ({"stable": "1", "canary": "", "weight": 5}, "canary version"),
    ({"stable": "1", "weight": 5}, "without a canary"),
    ({"stable": "1", "shadow": True}, "without a canary"),
    ({"stable": "1", "canary": "2", "weight": 5, "shadow": "yes"}, "shadow must be true or false"),
    ({"stable": "1", "canary": "2", "weight": 101, "shadow": True}, "0 <= weight <= 100 in shadow mode"),
])
def test_invalid_canary_routes_are_refused(router: NginxRouter, route: dict, words: str) -> None:
    with pytest.raises(ServingError, match="route 'iris'") as excinfo:
        router.apply({"iris": route})
    assert words in str(excinfo.value)
    assert not router.paths.router_state.exists()


def test_canary_routes_are_normalized() -> None:
    assert validate_routes({"iris": {"stable": 1, "canary": 2, "weight": 5}}) == {
        "iris": {"stable": "1", "canary": "2", "weight": 5.0, "shadow": False}}
    assert validate_routes({"iris": {"stable": "1", "canary": "2", "shadow": True}}) == {
        "iris": {"stable": "1", "canary": "2", "shadow": True}}
    assert validate_routes({"iris": {"stable": "1", "canary": "2", "weight": 0, "shadow": True}})["iris"][
        "weight"] == 0.0
    assert validate_routes({"iris": {"stable": "1", "canary": None, "shadow": False}}) == {"iris": {"stable": "1"}}


def test_set_split_and_clear_canary_round_trip(router: NginxRouter) -> None:
    router.set_route("iris", "1")
    router.set_split("iris", "1", "2", 25)
    assert router.routes() == {"iris": {"stable": "1", "canary": "2", "weight": 25.0, "shadow": False}}
    assert json.loads(router.paths.router_state.read_text())["routes"]["iris"]["weight"] == 25.0
    assert _route_lines(_table(router)) == ["route iris 1 2 2500 0"]
    router.set_split("iris", "1", "2", 0, shadow=True)
    assert router.routes()["iris"]["shadow"] is True
    assert _route_lines(_table(router)) == ["route iris 1 2 0 1"]
    router.clear_canary("iris")
    assert router.routes() == {"iris": {"stable": "1"}}
    assert _route_lines(_table(router)) == ["route iris 1 - 0 0"]
    before = router.table_file.stat().st_mtime_ns
    router.clear_canary("iris")  # no canary: nothing to apply
    router.clear_canary("absent")
    assert router.table_file.stat().st_mtime_ns == before
    router.set_split("wine", "3", "4", 50)  # a model's first route may come with its canary
    assert router.routes()["wine"] == {"stable": "3", "canary": "4", "weight": 50.0, "shadow": False}


def test_a_refused_split_changes_nothing(router: NginxRouter) -> None:
    router.set_split("iris", "1", "2", 25)
    before = router.paths.router_state.read_text()
    with pytest.raises(ServingError, match="out of range"):
        router.set_split("iris", "1", "2", 250)
    assert router.paths.router_state.read_text() == before


def test_versions_served_with_adaptive_batching_get_a_batched_line(router: NginxRouter) -> None:
    """The backend's batched twins reach the table (pinned staged versions too: they need not be routed), and a
    change of twins changes the generation, so a router routing without them is stale."""
    before = router.table({"iris": {"stable": "1"}})
    twins = [("iris", "1", "iris..batched"), ("wine", "7", "wine..batched")]
    router.batched_provider = lambda: twins
    table = router.table({"iris": {"stable": "1"}})
    assert [line for line in table.splitlines() if line.startswith("batched ")] == [
        "batched iris 1 iris..batched", "batched wine 7 wine..batched"]
    assert route_table.generation(table) != route_table.generation(before)


@pytest.mark.parametrize("twin", [("iris", "1", "iris batched"), ("iris", "1", ""), ("a b", "1", "x..batched"),
                                  ("iris", "1\nauth x", "iris..batched")])
def test_a_batched_line_that_could_break_the_table_is_refused(router: NginxRouter, twin: tuple) -> None:
    router.batched_provider = lambda: [twin]
    with pytest.raises(ServingError, match="batched twin"):
        router.table({})


def test_requests_go_to_the_upstream_model_the_lua_chose_and_copies_to_the_model(router: NginxRouter) -> None:
    conf = router.render()
    assert "proxy_pass http://torchserve/predictions/$cf_upstream_model/$cf_version;" in _location(
        conf, "/predictions/")
    assert "proxy_pass http://torchserve/predictions/$cf_copy_model/$cf_canary;" in _location(
        conf, f"= {SHADOW_URI}")
    # counted out at the server level: a request answered by an error_page location ends there
    server = conf[conf.index("    server {"):conf.index("location = /ping")]
    assert 'require("canaryflow_router").done()' in server
