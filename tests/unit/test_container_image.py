"""The flow-run image (Dockerfile) agrees with what runs it: the Prefect work pool's job template (user, read-only
root with /tmp an emptyDir, the command), prefect.yaml (the project directory its pull step enters) and
pyproject.toml (the torch pin, every package). The image itself is never built here (no container engine): this
is what can be checked without one."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TEMPLATE = json.loads((ROOT / "deployments" / "templates" / "prefect-kubernetes-job-template.json").read_text())
POD = TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]


def _env() -> dict[str, str]:
    block = re.search(r"^ENV (.+?)(?=\n\n)", DOCKERFILE, re.S | re.M)
    assert block
    return dict(re.findall(r"(\w+)=(\S+)", block[1]))


def test_the_image_runs_as_the_job_templates_user() -> None:
    user = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    context = POD["containers"][0]["securityContext"]
    assert user == [(str(context["runAsUser"]), str(context["runAsGroup"]))]
    assert context["readOnlyRootFilesystem"] is True


def test_everything_it_writes_is_under_an_emptydir_of_the_job() -> None:
    mounts = {m["mountPath"] for m in POD["containers"][0]["volumeMounts"]}
    assert "/tmp" in mounts
    for name in ("HOME", "PREFECT_HOME", "MPLCONFIGDIR"):
        assert _env()[name].startswith("/tmp"), name
    state_dir = TEMPLATE["variables"]["properties"]["env"]["default"]["CANARYFLOW_STATE_DIR"]
    assert state_dir in mounts


def test_the_project_dir_is_where_prefect_yaml_pulls_from() -> None:
    project = _env()["CANARYFLOW_PROJECT_DIR"]
    assert re.findall(r"^WORKDIR (\S+)$", DOCKERFILE, re.M) == [project]
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $CANARYFLOW_PROJECT_DIR }}"}}]
    assert "COPY pyproject.toml README.md prefect.yaml ./" in DOCKERFILE


def test_it_installs_the_pinned_torch_first_and_every_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in project["project"]["dependencies"] if d.startswith("torch=="))
    runs = re.findall(r"^RUN (.+)$", DOCKERFILE, re.M)
    assert runs[0].startswith(f"pip install {torch_pin} ") and "whl/cpu" in runs[0]
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = re.findall(r"^COPY (\w+) \1$", DOCKERFILE, re.M)
    assert sorted(copied) == sorted(packages)


def test_its_command_is_the_one_the_worker_gives_a_flow_run() -> None:
    assert re.findall(r"^CMD (.+)$", DOCKERFILE, re.M) == ['["prefect", "flow-run", "execute"]']
