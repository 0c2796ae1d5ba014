"""The local stack's Prometheus (``metrics.source=prometheus``): its config, files and supervised process.

It scrapes the local TorchServe's metrics endpoint (``ports.torchserve_metrics``) every
``metrics.scrape_interval_s``, evaluates the latency recording rules (deployments/prometheus.py
``recording_rules``) as often, listens on ``host:ports.prometheus`` only and keeps a few hours of data under
``<state>/prometheus``. TorchServe 0.12 serves ``/metrics`` without a token (its token auth covers the inference
and management APIs only; checked on 0.12.0), so the scrape sends no credentials.

TorchServe exports the handler's counters only when its ``metrics_config`` declares them: the stack's
config.properties always names that file (deployments/torchserve.py, render_config).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import yaml

from canaryflow.core.paths import StatePaths
from canaryflow.core.settings import Settings
from canaryflow.local.supervisor import Program
from deployments.prometheus import METRIC_RELABEL_CONFIGS, recording_rules

RETENTION = "6h"
"""Local data is for the canary windows of the releases running now, not for history."""
JOB = "torchserve"


def prometheus_dir(paths: StatePaths) -> Path:
    return paths.root / "prometheus"


def config_file(paths: StatePaths) -> Path:
    return prometheus_dir(paths) / "prometheus.yml"


def rules_file(paths: StatePaths) -> Path:
    return prometheus_dir(paths) / "recording-rules.yml"


def data_dir(paths: StatePaths) -> Path:
    return prometheus_dir(paths) / "data"


def render_config(settings: Settings, paths: StatePaths) -> str:
    """prometheus.yml: one scrape job for the local TorchServe, the recording rules, the interval from settings."""
    interval = f"{int(round(settings.metrics.scrape_interval_s * 1000))}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": interval if settings.metrics.scrape_interval_s < 10 else "10s"},
        "rule_files": [str(rules_file(paths))],
        "scrape_configs": [{
            "job_name": JOB, "metrics_path": "/metrics", "scheme": "http",
            "static_configs": [{"targets": [f"{settings.host}:{settings.ports.torchserve_metrics}"]}],
            "metric_relabel_configs": METRIC_RELABEL_CONFIGS,
        }],
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_config(settings: Settings, paths: StatePaths) -> None:
    """The config and the rules into ``<state>/prometheus`` (owner only, as the rest of the state dir)."""
    directory = prometheus_dir(paths)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    data_dir(paths).mkdir(exist_ok=True, mode=0o700)
    rules_file(paths).write_text(recording_rules())
    config_file(paths).write_text(render_config(settings, paths))


def command(settings: Settings, paths: StatePaths) -> list[str]:
    """The foreground command supervisord runs (Debian's ``prometheus``)."""
    return [shutil.which("prometheus") or "prometheus", f"--config.file={config_file(paths)}",
            f"--storage.tsdb.path={data_dir(paths)}", f"--storage.tsdb.retention.time={RETENTION}",
            f"--web.listen-address={settings.host}:{settings.ports.prometheus}", "--log.level=warn"]


def program(settings: Settings, paths: StatePaths) -> Program:
    """Prometheus as one more supervised process of the local stack."""
    return Program("prometheus", command(settings, paths), prometheus_dir(paths), stopwaitsecs=30)


def wanted(settings: Settings) -> bool:
    """Whether the local stack runs its own Prometheus: the source is Prometheus and no other one is named."""
    return settings.metrics.source == "prometheus" and not settings.metrics.prometheus_url


def ready(url: str) -> bool:
    """Whether the Prometheus at ``url`` has loaded its config and answers queries."""
    try:
        return httpx.get(f"{url.rstrip('/')}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
