"""The nginx router's rendering and state handling, without starting nginx."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from canaryflow.core.errors import ServingError
from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Ports, Settings
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
    return r


def _map_block(conf: str, variable: str) -> str:
    match = re.search(r"map \$\S+ \$" + variable + r" \{(.*?)\n    \}", conf, re.S)
    assert match, f"no map for ${variable}"
    return match.group(1)


def _location(conf: str, name: str) -> str:
    match = re.search(r"\n        location " + re.escape(name) + r" \{(.*?)\n        \}\n", conf, re.S)
    assert match, f"no location {name}"
    return match.group(1)


def _splits(conf: str) -> dict[str, tuple[str, list[str]]]:
    """{variable: (key, bucket lines)} of every split_clients block."""
    blocks = re.findall(r'split_clients "(.*?)" \$(\S+) \{(.*?)\n    \}', conf, re.S)
    return {var: (key, [line.strip() for line in body.strip().splitlines()]) for key, var, body in blocks}


def test_nginx_router_is_a_traffic_router(router: NginxRouter) -> None:
    assert isinstance(router, NginxRouter)
    _: TrafficRouter = router


def test_render_routes_each_model_to_its_stable_version(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "3"}, "wine.v2": {"stable": "12"}})
    stable = _map_block(conf, "cf_stable")
    assert '"~^iris$" "3";' in stable
    assert '"~^wine[.]v2$" "12";' in stable
    assert "proxy_pass http://torchserve/predictions/$cf_model/$cf_version;" in conf


def test_render_with_no_routes_is_complete(router: NginxRouter) -> None:
    conf = router.render({})
    assert 'default "";' in _map_block(conf, "cf_stable")
    assert "routed models" not in conf  # a 404 never lists what else is served
    assert "client_header_timeout 5s;" in conf and "limit_conn cf_per_client 512;" in conf


def test_render_injects_the_token_and_replaces_the_clients(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1"}, "wine": {"stable": "1", "canary": "2", "shadow": True}})
    headers = re.findall(r"proxy_set_header Authorization (.*);", conf)
    assert headers == [f'"Bearer {TOKEN}"'] * 3  # /predictions/, wine's shadow location, the shadow copy
    assert conf.count("Authorization") == 3


def test_render_reads_the_token_at_each_render(router: NginxRouter) -> None:
    tokens = iter(["first", "second"])
    router.token_provider = lambda: next(tokens)
    assert "Bearer first" in router.render({})
    assert "Bearer second" in router.render({})


def test_render_refuses_a_token_that_could_break_the_config(router: NginxRouter) -> None:
    router.token_provider = lambda: 'abc"; return 200 "x'
    with pytest.raises(ServingError, match="unexpected characters"):
        router.render({})


def test_render_listens_on_the_router_port_and_proxies_to_inference_only(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1"}})
    assert re.findall(r"^\s*listen (\S+);", conf, re.M) == [f"127.0.0.1:{ROUTER_PORT}"]
    assert re.findall(r"^\s*server (\S+);", conf, re.M) == [f"127.0.0.1:{INFERENCE_PORT}"]
    assert str(MANAGEMENT_PORT) not in conf and str(METRICS_PORT) not in conf


def test_no_location_reaches_the_management_api(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1"}})
    locations = re.findall(r"^\s*location (.+?) \{", conf, re.M)
    assert locations == ["= /ping", "/predictions/", f"= {SHADOW_URI}", "/", "@upstream_unavailable",
                         "@upstream_timeout", "@not_found", "@too_large"]
    assert re.findall(r"proxy_pass (\S+);", conf) == ["http://torchserve/predictions/$cf_model/$cf_version",
                                                      "http://torchserve/predictions/$cf_model/$cf_canary"]
    assert "internal;" in _location(conf, f"= {SHADOW_URI}")
    catch_all = conf.split("location / {", 1)[1].split("}", 1)[0]
    assert "return 404" in catch_all and "proxy_pass" not in catch_all
    assert "/models" not in conf and "/api" not in conf


def test_credentials_are_stale_when_the_live_config_holds_another_key(router: NginxRouter) -> None:
    assert not router.credentials_stale()  # no config yet
    router.write_initial_config()
    assert not router.credentials_stale()
    router.token_provider = lambda: "tok-after-restart"
    assert router.credentials_stale()
    router.refresh()
    assert not router.credentials_stale() and "tok-after-restart" in router.paths.router_conf.read_text()


def test_render_validates_the_version_pin(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1"}})
    assert '"~^[0-9A-Za-z._-]{1,32}$" 0;' in _map_block(conf, "cf_pin_invalid")
    assert "default 1;" in _map_block(conf, "cf_pin_invalid")
    assert '"~^[0-9A-Za-z._-]{1,32}$" $http_x_model_version;' in _map_block(conf, "cf_version")
    assert "if ($cf_pin_invalid)" in conf and "return 400" in conf


def test_render_has_a_json_access_log_and_request_ids(router: NginxRouter) -> None:
    conf = router.render({})
    assert "log_format canaryflow escape=json" in conf
    assert f"access_log {router.paths.router_access_log} canaryflow buffer=64k flush=1s;" in conf
    assert "add_header X-Request-ID $cf_request_id always;" in conf
    assert "proxy_set_header X-Request-ID $cf_request_id;" in conf


def test_generation_changes_with_routes_and_token(router: NginxRouter) -> None:
    def generation(conf: str) -> str:
        return re.search(r"generation ([0-9a-f]{12})", conf).group(1)

    a = generation(router.render({"iris": {"stable": "1"}}))
    assert a == generation(router.render({"iris": {"stable": "1"}}))
    assert a != generation(router.render({"iris": {"stable": "2"}}))
    router.token_provider = lambda: "other"
    assert a != generation(router.render({"iris": {"stable": "1"}}))


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
    assert not router.paths.router_state.exists()


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
    assert '"~^iris$" "3";' in router.paths.router_conf.read_text()
    assert "wine" not in router.paths.router_conf.read_text()


def test_set_route_keeps_other_route_keys_and_clears_the_canary(router: NginxRouter) -> None:
    router.apply({"iris": {"stable": "3", "canary": "5", "weight": 5, "future_key": {"x": 1}}})
    router.set_route("iris", "4")
    assert router.routes() == {"iris": {"stable": "4", "future_key": {"x": 1}}}


def test_config_is_private_and_no_temp_files_remain(router: NginxRouter) -> None:
    router.set_route("iris", "1")
    assert router.paths.router_conf.stat().st_mode & 0o077 == 0
    assert sorted(p.name for p in router.paths.router_dir.glob(".*.tmp")) == []
    assert all((router.paths.router_dir / "tmp" / d).is_dir() for d in router_mod._TEMP_DIRS)


def test_apply_with_an_invalid_config_keeps_the_old_one(router: NginxRouter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    router.set_route("iris", "1")
    conf_before = router.paths.router_conf.read_text()
    state_before = router.paths.router_state.read_text()

    def reject(conf: Path) -> None:
        raise ServingError('nginx rejected the new router config: [emerg] unknown directive "bogus"')

    monkeypatch.setattr(router, "_check", reject)
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


def test_apply_reloads_only_a_running_nginx(router: NginxRouter, monkeypatch: pytest.MonkeyPatch) -> None:
    router.set_route("iris", "1")  # nothing running: no signal, no wait
    router.paths.router_dir.joinpath("nginx.pid").write_text("999999999\n")
    assert router.running_pid() is None
    signals: list[tuple[int, int]] = []
    waited: list[str] = []
    monkeypatch.setattr(router, "running_pid", lambda: 4242)
    monkeypatch.setattr(router_mod.os, "kill", lambda pid, sig: signals.append((pid, sig)))
    monkeypatch.setattr(router, "_wait_generation", waited.append)
    router.set_route("iris", "2")
    assert signals == [(4242, router_mod.signal.SIGHUP)]
    assert waited and waited[0] in router.paths.router_conf.read_text()


def test_command_runs_nginx_in_the_foreground(router: NginxRouter) -> None:
    cmd = router.command()
    assert cmd[0] == router.nginx_bin
    assert cmd[cmd.index("-c") + 1] == str(router.paths.router_conf)
    assert cmd[cmd.index("-p") + 1].rstrip("/") == str(router.paths.router_dir)
    assert cmd[-2:] == ["-g", "daemon off;"]


def test_write_initial_config_with_no_routes(router: NginxRouter) -> None:
    router.write_initial_config()
    assert router.paths.router_conf.exists()
    assert json.loads(router.paths.router_state.read_text()) == {"routes": {}}


# -- canary: weighted split, sticky users, shadow --------------------------------------------------------------------


def test_split_renders_a_sticky_split_with_the_canary_first(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1", "canary": "2", "weight": 25},
                          "wine.v2": {"stable": "3", "canary": "4", "weight": 0.5}, "plain": {"stable": "9"}})
    assert _splits(conf) == {
        "cf_split_0": ("${cf_model}:${cf_split_key}", ['25% "2";', '* "1";']),
        "cf_split_1": ("${cf_model}:${cf_split_key}", ['0.5% "4";', '* "3";']),
    }
    routed = _map_block(conf, "cf_routed")
    assert "default $cf_stable;" in routed
    assert '"~^iris$" $cf_split_0;' in routed and '"~^wine[.]v2$" $cf_split_1;' in routed
    assert "plain" not in routed
    assert '"" $cf_routed;' in _map_block(conf, "cf_version")  # a valid pin still wins: tested against nginx
    assert '"~^iris$" "2";' in _map_block(conf, "cf_canary")
    assert "mirror" not in conf.replace("mirrored", "")


def test_split_key_is_the_user_header_else_the_request_id(router: NginxRouter) -> None:
    key = _map_block(router.render({}), "cf_split_key")
    assert '"" $request_id;' in key and "default $http_x_user_id;" in key
    router.settings.canary.user_header = "X-Tenant-Key"
    key = _map_block(router.render({}), "cf_split_key")
    assert "map $http_x_tenant_key $cf_split_key" in router.render({})
    assert "default $http_x_tenant_key;" in key


@pytest.mark.parametrize(("weight", "bucket"), [(5, '5% "2";'), (12.25, '12.25% "2";'), (0.01, '0.01% "2";'),
                                                (99.99, '99.99% "2";'), (50.0, '50% "2";')])
def test_split_percent_formats(router: NginxRouter, weight: float, bucket: str) -> None:
    conf = router.render({"iris": {"stable": "1", "canary": "2", "weight": weight}})
    assert _splits(conf)["cf_split_0"][1] == [bucket, '* "1";']


def test_full_weight_sends_everything_to_the_canary_without_a_split(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1", "canary": "2", "weight": 100}})
    assert _splits(conf) == {}
    assert '"~^iris$" "2";' in _map_block(conf, "cf_routed")


def test_shadow_mirrors_only_the_shadowed_model(router: NginxRouter) -> None:
    conf = router.render({"iris": {"stable": "1", "canary": "2", "weight": 30, "shadow": True},
                          "wine": {"stable": "1", "canary": "2", "weight": 30}})
    shadow = _location(conf, '~ "^/predictions/iris/?$"')
    assert f"mirror {SHADOW_URI};" in shadow and "mirror_request_body on;" in shadow
    assert "proxy_pass http://torchserve/predictions/$cf_model/$cf_version;" in shadow
    assert "if ($cf_pin_invalid)" in shadow  # same guards as /predictions/
    assert "mirror" not in _location(conf, "/predictions/")
    assert conf.count("mirror ") == 1
    assert list(_splits(conf)) == ["cf_split_0"]  # wine splits; iris answers from stable only
    routed = _map_block(conf, "cf_routed")
    assert "iris" not in routed and '"~^wine$" $cf_split_0;' in routed
    copy = _location(conf, f"= {SHADOW_URI}")
    assert "proxy_pass http://torchserve/predictions/$cf_model/$cf_canary;" in copy
    assert 'proxy_set_header X-Canaryflow-Pinned "";' in copy  # copies are live traffic: chaos applies
    assert re.search(r"if \(\$cf_pinned\) \{\s*access_log off;\s*return 204;", copy)  # pins are never copied
    assert "log_subrequest on;" in conf


def test_access_log_fields_for_the_canary_analysis(router: NginxRouter) -> None:
    conf = router.render({})
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
    assert "cf_split_0" in router.paths.router_conf.read_text()
    router.set_split("iris", "1", "2", 0, shadow=True)
    assert router.routes()["iris"]["shadow"] is True
    assert f"mirror {SHADOW_URI};" in router.paths.router_conf.read_text()
    router.clear_canary("iris")
    assert router.routes() == {"iris": {"stable": "1"}}
    conf = router.paths.router_conf.read_text()
    assert "mirror " not in conf and "split_clients" not in conf
    before = router.paths.router_conf.stat().st_mtime_ns
    router.clear_canary("iris")  # no canary: nothing to apply
    router.clear_canary("absent")
    assert router.paths.router_conf.stat().st_mtime_ns == before
    router.set_split("wine", "3", "4", 50)  # a model's first route may come with its canary
    assert router.routes()["wine"] == {"stable": "3", "canary": "4", "weight": 50.0, "shadow": False}


def test_a_refused_split_changes_nothing(router: NginxRouter) -> None:
    router.set_split("iris", "1", "2", 25)
    before = router.paths.router_state.read_text()
    with pytest.raises(ServingError, match="out of range"):
        router.set_split("iris", "1", "2", 250)
    assert router.paths.router_state.read_text() == before
