"""supervisord config rendering for the local stack (no processes started)."""

from __future__ import annotations

import configparser
from pathlib import Path

from canaryflow.core.paths import StatePaths
from canaryflow.local.supervisor import Program, render_config


def test_render_config_has_private_socket_and_group_stop(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    programs = [Program("mlflow", ["mlflow", "server", "--port", "5000"], tmp_path, {"A": "x%y"}),
                Program("router", ["nginx", "-g", "daemon off;"], tmp_path, autostart=False)]
    parser = configparser.RawConfigParser()
    parser.read_string(render_config(paths, programs))
    assert parser["unix_http_server"]["file"] == str(paths.supervisor_sock)
    assert parser["unix_http_server"]["chmod"] == "0700"
    mlflow = parser["program:mlflow"]
    assert mlflow["command"] == "mlflow server --port 5000"
    assert mlflow["stopasgroup"] == mlflow["killasgroup"] == "true"
    assert mlflow["autorestart"] == "true"
    assert 'A="x%%y"' in mlflow["environment"]  # supervisord would expand a bare %
    router = parser["program:router"]
    assert router["autostart"] == "false"
    assert router["command"] == "nginx -g 'daemon off;'"
