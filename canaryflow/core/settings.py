"""One settings tree for canaryflow (pydantic-settings, env prefix ``CANARYFLOW_``, nested with ``__``).

Examples: ``CANARYFLOW_STATE_DIR=/tmp/cf``, ``CANARYFLOW_PORTS__ROUTER=18000``,
``CANARYFLOW_SERVING__MAX_BATCH_ROWS=512``. Nothing is read until :func:`get_settings` is called.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Ports(BaseModel):
    """Every TCP port the local stack binds, all on ``Settings.host``."""

    router: int = 8000
    mlflow: int = 5000
    prefect: int = 4200
    torchserve_inference: int = 8080
    torchserve_management: int = 8081
    torchserve_metrics: int = 8082
    torchserve_grpc_inference: int = 7070
    torchserve_grpc_management: int = 7071
    torchserve_worker_base: int = 9000
    bridge: int = 8090
    prometheus: int = 9090


class ServingSettings(BaseModel):
    """How models are served by TorchServe and the router."""

    max_batch_rows: int = Field(1024, ge=1, description="rows per request; more is a 400")
    workers_per_version: int = Field(1, ge=1)
    # TorchServe's server-side batching: up to batch_size requests, waiting at most max_batch_delay_ms for more,
    # go to the model in one call (a malformed one still gets its own 400). 1: off. A lone request waits the whole
    # delay: 1 ms (measured: +1 ms at one connection, where 5 ms cost +6). 0 makes TorchServe 0.12 stop at two
    # requests (its poll loop ends when the remaining delay is 0): no wait, pairs only.
    batch_size: int = Field(1, ge=1, le=256)
    max_batch_delay_ms: int = Field(1, ge=0, le=1000)
    # A batched version is served adaptively on the local stack: TorchServe registers it twice (without batching,
    # and batched as `<model>..batched`), and the router sends a request to the batched twin only while another
    # request for that version is in flight. A lone request never waits max_batch_delay_ms for a batch that
    # cannot fill (TorchServe 0.12 waits even with an empty queue); requests that queue are batched. False: one
    # registration with the batch setting. (Kubernetes serves each version as it is.)
    adaptive_batching: bool = True
    response_timeout_s: int = Field(30, ge=1)
    # TorchServe keys expire; the router holds the inference key, so it must outlive a working session.
    token_expiration_min: int = Field(7 * 24 * 60, ge=1)
    key_renew_fraction: float = Field(0.5, gt=0, lt=1, description="a TorchServe key with less than this share of "
                                      "its lifetime left is renewed (canaryflow/local/keyrenew.py)")
    warmup_requests: int = Field(20, ge=0)
    java_heap_mb: int = Field(512, ge=128)

    @property
    def jvm_options(self) -> str:
        """TorchServe's frontend heap: fixed at java_heap_mb (initial = maximum). Grown on demand it stayed near
        110 MB under load, so its ~36 MB young generation filled every ~0.35 s and every young collection started a
        concurrent cycle (old generation above G1's 45 % threshold): 52 of each in 10,000 one-connection
        requests on the bench stack. Fixed: a young collection every ~1.1 s and no concurrent cycle; in a
        same-window A/B at 8 connections +3-5 % requests/s and a lower p95/p99, at one connection no difference
        (README, Benchmarks)."""
        return f"-Xms{self.java_heap_mb}m -Xmx{self.java_heap_mb}m -XX:+UseG1GC"


class PrefectSettings(BaseModel):
    """Names of the Prefect objects canaryflow creates."""

    work_pool: str = "canaryflow"
    release_deployment: str = "release/release"
    poll_frequency_s: int = Field(2, ge=1)


class WebhookSettings(BaseModel):
    """The MLflow -> Prefect bridge."""

    name: str = "canaryflow-release"
    tolerance_s: int = Field(300, ge=1, description="max clock skew of X-MLflow-Timestamp")
    secret: str | None = Field(None, description="HMAC secret; generated into the state dir when unset")


class FeedbackSettings(BaseModel):
    """The bridge's feedback endpoint: labels for answers the router already gave (``POST /feedback/<model>``)."""

    token: str | None = Field(None, description="bearer token; generated into the state dir when unset")
    max_items: int = Field(1000, ge=1, description="labels per request, at most")
    index_answers: int = Field(200_000, ge=1000, description="recent router answers a label can refer to")
    answer_wait_s: float = Field(3.0, ge=0, le=30, description="a label for an answer not yet in the router's log "
                                                              "waits this long for it before a 404")


class ReleaseSettings(BaseModel):
    """The release flow."""

    experiment: str = "canaryflow-releases"
    champion_alias: str = "champion"
    previous_alias: str = "previous"
    smoke_rows: int = Field(8, ge=1)
    allow_policy_loosening: bool = Field(False, description="let a registered model's canaryflow.policy tag loosen "
                                                            "the thresholds, not only tighten them")
    slot_wait_s: float = Field(6 * 3600, gt=0, description="how long a release waits for the one running for the "
                                                          "same model (releases of other models run beside it)")
    sandbox_user: str = Field("nobody", description="the unprivileged user the candidate's own code runs as in the "
                                                   "gates when the stack runs as root (canaryflow.model.sandbox)")
    sandbox_timeout_s: float = Field(600.0, gt=0, le=3600, description="longest one sandboxed load, prediction or "
                                                                      "optimization may take")


class GateSettings(BaseModel):
    """Thresholds of the release gates; per model they can be overridden by the registered model's tag
    ``canaryflow.policy`` (a JSON object with the same keys), see :func:`canaryflow.policy.gate_policy`."""

    allow_contract_change: bool = False
    label_column: str = "label"
    # data gate (Great Expectations): share of failed expectations allowed on the holdout
    data_max_failed_ratio: float = Field(0.0, ge=0, le=1)
    # drift gate (Evidently): share of drifted feature columns allowed, and the per-column test threshold
    drift_max_share: float = Field(0.5, ge=0, le=1)
    drift_stattest_threshold: float | None = None
    # once this many served rows were sampled for the model, the reference is also compared with live traffic
    drift_min_traffic_rows: int = Field(200, ge=1)
    # quality gate: metric on the holdout; absolute floor, and allowed drop against the champion
    quality_metric: str = "accuracy"
    quality_min: float = Field(0.7, ge=0, le=1)
    quality_max_abs_drop: float = Field(0.02, ge=0)
    quality_max_rel_drop: float = Field(0.05, ge=0)
    # the candidate's holdout is cross-checked against the champion's holdout (and an operator-owned evaluation
    # set: a Parquet path with the feature and label columns); sets that disagree by more than this are refused
    quality_max_contradiction: float = Field(0.2, ge=0)
    evaluation_set: str | None = None


class OptimizationSettings(BaseModel):
    """Which serving variants to build and how closely they must agree with the fp32 reference."""

    variants: list[str] = ["torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_static", "torch_int8", "torch_bf16"]
    min_argmax_agreement: float = Field(0.99, ge=0, le=1)
    max_abs_diff: float = Field(0.05, ge=0, description="max |p_variant - p_fp32| over the holdout")
    bench_repeats: int = Field(200, ge=10, le=5000)
    bench_budget_s: float = Field(3.0, gt=0, le=30, description="seconds of micro-benchmark per variant and batch size")
    # a variant must beat the fp32 baseline by this factor to be preferred (noise guard)
    min_speedup: float = Field(1.05, ge=1)
    # batch scoring gets its own variant (a second copy of the weights in the .mar) only when it beats the served
    # variant's rows/s at big batches by this factor
    min_batch_speedup: float = Field(1.25, ge=1)


TUNE_PATTERN = r"^([1-9][0-9]?)x([1-9][0-9]{0,2})$"  # WORKERSxBATCH: 1-99 workers, batch 1-999 (checked below)


class ServingConfig(BaseModel):
    """How TorchServe serves one version: workers, server-side batch size and the batch's wait."""

    model_config = ConfigDict(frozen=True)

    workers: int = Field(1, ge=1, le=16)
    batch_size: int = Field(1, ge=1, le=256)
    max_batch_delay_ms: int = Field(1, ge=0, le=1000)

    @classmethod
    def of(cls, serving: ServingSettings) -> ServingConfig:
        return cls(workers=serving.workers_per_version, batch_size=serving.batch_size,
                   max_batch_delay_ms=serving.max_batch_delay_ms)

    @classmethod
    def parse(cls, text: str, max_batch_delay_ms: int) -> ServingConfig:
        workers, batch = re.fullmatch(TUNE_PATTERN, text).groups()  # type: ignore[union-attr]
        return cls(workers=int(workers), batch_size=int(batch), max_batch_delay_ms=max_batch_delay_ms)

    @property
    def label(self) -> str:
        batch = f"batch {self.batch_size} (wait <= {self.max_batch_delay_ms} ms)" if self.batch_size > 1 else \
            "no batching"
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {batch}"


class LoadTestSettings(BaseModel):
    """The locust load test of a staged candidate, and its gates."""

    users: int = Field(8, ge=1, le=64)
    spawn_rate: float = Field(8, gt=0)
    duration_s: int = Field(10, ge=2, le=300)
    rows_per_request: int = Field(1, ge=1)
    target_rps: float = Field(100.0, ge=0, description="offered load, spread over the users; 0 = closed loop")
    max_p95_ms: float = Field(50.0, gt=0)
    max_failure_ratio: float = Field(0.01, ge=0, le=1)
    min_rps: float = Field(50.0, ge=0)
    # A peer (the champion, or a stack-owned calibration model) is loaded in the same locust run: a busy machine
    # slows both, a slow model only the candidate.
    max_p95_ratio: float = Field(2.0, ge=1, description="candidate p95 over the champion's (+ p95_slack_ms)")
    p95_slack_ms: float = Field(10.0, ge=0)
    peer_busy_share: float = Field(0.5, gt=0, le=1, description="peer p95 above this share of max_p95_ms: "
                                                                 "the machine is busy")
    attempts: int = Field(3, ge=1, le=10, description="measurements while the outcome is inconclusive, error, or "
                                                     "a speed failure a second measurement has not confirmed")
    retry_pause_s: float = Field(5.0, ge=0, le=300)
    busy_max_ratio: float = Field(3.0, ge=1, description="on a busy machine: candidate p95 within peer p95 x this "
                                                          "+ p95_slack_ms (the machine stretches every answer)")
    # Serving settings chosen by measurement (canaryflow/release/tuning.py): before the gate's load test, the staged
    # candidate is served with serving.* and then with each of these ('WORKERSxBATCH'; a batch waits
    # serving.max_batch_delay_ms), each loaded for tune_duration_s at the offered load (target_rps) and closed-loop.
    # serving.* is kept unless another setting within the bars, whose median is at most tune_max_added_ms above
    # serving.*'s, serves tune_min_gain times its closed-loop requests/s; recorded in the release run. Operator
    # settings only (not per-model policy: workers are the machine's). Empty: serving.* as set.
    tune: list[str] = Field(["2x1", "1x8"], description="serving settings to try besides serving.*: WORKERSxBATCH")
    tune_duration_s: int = Field(3, ge=2, le=60)
    # Each setting is measured this many times, interleaved with the others, and counts with its best median and
    # capacity: a release next to another (CPU-heavy optimization, another load test) is a busy moment for one
    # trial, not a slower setting. 2 rounds of the default 3 settings: about 40 s a release.
    tune_rounds: int = Field(2, ge=1, le=5)
    tune_min_gain: float = Field(1.15, ge=1, description="how many times serving.*'s capacity another must serve")
    tune_max_added_ms: float = Field(2.0, ge=0, description="how much another setting may add to the median at "
                                                            "the offered load, in exchange for that capacity")

    @field_validator("tune")
    @classmethod
    def _tune_entries(cls, value: list[str]) -> list[str]:
        for text in value:
            found = re.fullmatch(TUNE_PATTERN, text)
            if found is None or int(found[1]) > 16 or int(found[2]) > 256:
                raise ValueError(f"tune entry {text!r} is not WORKERSxBATCH with 1-16 workers and batch 1-256")
        return value
    on_busy: Literal["relative", "fail"] = Field(
        "relative", description="when every attempt found the machine busy: judge the candidate against the peer "
                                "of the same window (relative), or end the release as failed (fail)")


class CanarySettings(BaseModel):
    """The canary ramp and its analysis (deployments/canary.py); per model overridable like the gates."""

    steps: list[float] = Field([5, 25, 50, 100], description="candidate traffic share per step, percent")
    shadow: bool = Field(False, description="mirror traffic to the candidate (champion answers) before step 1")
    interval_s: float = Field(30.0, gt=0, le=600, description="seconds between analyses")
    min_requests: int = Field(50, ge=1, description="per version and step, before a check means anything")
    step_deadline_s: float = Field(600.0, gt=0, le=7200, description="a step still inconclusive after this rolls back")
    deadline_s: float = Field(3600.0, gt=0, le=6 * 3600,
                              description="the whole ramp; past it the candidate is rolled back")
    max_error_ratio: float = Field(0.01, ge=0, le=1, description="5xx and timeouts over requests")
    max_p95_ms: float = Field(50.0, gt=0)
    max_p95_ratio: float = Field(1.5, ge=1, description="candidate p95 over champion p95 (+ p95_slack_ms)")
    p95_slack_ms: float = Field(5.0, ge=0)
    latency_alpha: float = Field(0.01, gt=0, lt=1, description="Mann-Whitney U: candidate slower at 1-alpha")
    latency_min_shift_ms: float = Field(2.0, ge=0, description="median shift below this is not a failure")
    drift_metric: str = Field("psi", pattern="^(psi|wasserstein)$")
    max_prediction_drift: float = Field(0.2, ge=0, description="PSI of predicted classes (or Wasserstein of scores)")
    min_shadow_agreement: float = Field(0.95, ge=0, le=1)
    # pairwise replay (canaryflow/release/replay.py, deployments/pairwise.py): live rows answered by both versions
    replay: bool = Field(True, description="replay recent live rows to champion and candidate at each analysis")
    replay_rows: int = Field(1000, ge=1, description="new live rows replayed per analysis, at most")
    replay_batch_rows: int = Field(100, ge=1, description="rows per replay request")
    min_pairs: int = Field(100, ge=1, description="distinct replayed rows before agreement is judged")
    min_pair_agreement: float = Field(0.95, ge=0, le=1, description="same class on the same row")
    min_segment_pairs: int = Field(20, ge=1, description="pairs in a segment before it is judged")
    min_segment_agreement: float = Field(0.8, ge=0, le=1, description="agreement in every segment")
    pair_alpha: float = Field(0.05, gt=0, lt=1, description="confidence 1-alpha of the agreement bounds")
    max_mean_prob_delta: float = Field(0.2, ge=0, le=1, description="mean of max |p_candidate - p_champion|")
    # live accuracy from labels sent to the feedback endpoint (deployments/metrics.py joins them to the answers)
    feedback: str = Field("auto", pattern="^(auto|required|off)$",
                          description="auto: judged once min_feedback_labels per version arrived in the window; "
                                      "required: inconclusive (the step holds) until then; off: never")
    min_feedback_labels: int = Field(50, ge=1, description="labelled rows per version before accuracy is judged")
    max_accuracy_drop: float = Field(0.05, ge=0, le=1, description="candidate accuracy below champion's by more")
    accuracy_alpha: float = Field(0.05, gt=0, lt=1, description="Fisher's exact test: candidate less accurate")
    max_failed_checks: int = Field(2, ge=1, description="failed analyses (not source errors) before rollback")
    max_source_errors: int = Field(5, ge=1, description="metrics source failures in a row before rollback")
    user_header: str = Field("X-User-Id", pattern=r"^[A-Za-z0-9-]{1,64}$", description="sticky assignment key")
    bake_s: float = Field(120.0, ge=0, le=3600,
                          description="after 100%: the new champion is still analysed this long, the previous one "
                                      "kept registered; a failure rolls back (0: no watch)")
    retire_grace_s: float = Field(30.0, ge=0, description="old champion stays registered this long after promotion")
    allow_chaos: bool = Field(False, description="honour a version's canaryflow.chaos tag (fault injection)")
    chaos_may_promote: bool = Field(False, description="drills only: a chaos build may be promoted (off: its ramp "
                                                       "ends rolled back where it would promote, and nothing makes "
                                                       "it stable or champion)")


class ReconcileSettings(BaseModel):
    """The reconcile flow (canaryflow/release/reconcile.py), run on an interval by its Prefect deployment."""

    missed_after_s: float = Field(60.0, ge=0, description="a version this old with no status missed its webhook")
    max_attempts: int = Field(3, ge=1, description="release runs of one version before reconcile gives up on it")
    # A release flow writes a heartbeat every heartbeat_s (and at each canary analysis); a RUNNING/PENDING run
    # silent for longer than stale_after_s is taken as dead. Keep it above 5 x canary.interval_s.
    stale_after_s: float = Field(300.0, gt=0, description="a run whose heartbeat is older than this has crashed")
    heartbeat_s: float = Field(30.0, gt=0, description="how often a release flow writes its heartbeat")
    lock_timeout_s: float = Field(180.0, gt=0, description="max wait for a model's state lock (canaryflow.locks)")


class BatchSettings(BaseModel):
    """Batch inference (canaryflow/batch/run.py, flows/batch_inference.py)."""

    chunk_rows: int = Field(65536, ge=1)
    on_bad_rows: str = Field("reject", pattern="^(reject|fail)$")
    output_dir: Path = Field(Path("batch-output"), description="relative paths are under the state dir")
    # the cron of the scheduled deployment in prefect.yaml (kept equal by a unit test; edit both)
    schedule_cron: str = "0 2 * * *"
    # what the scheduled deployment scores when its parameters do not say (unset: the run is skipped, not failed)
    model: str | None = Field(None, description="registered model name")
    input: str | None = Field(None, description="Parquet file or directory: local path or fsspec URI")
    alias: str = "champion"
    allow_unreleased: bool = Field(False, description="score a never-released version (exported, unoptimized)")
    max_parallel: int = Field(2, ge=1, description="chunks scored at once; one more is read ahead")
    score_rows: int | None = Field(None, ge=1, description="rows per model call; unset: what the optimization "
                                                           "measured (ONNX 1,024, a torch.export program as many "
                                                           "as it takes, up to 4,096); a program's limit caps it")
    row_expectations: bool = Field(True, description="reject rows outside the release's expectation ranges")
    drift_sample_rows: int = Field(10000, ge=100, description="scored rows sampled for the drift report")
    experiment: str = "canaryflow-batch"
    dask_address: str | None = Field(None, description="Dask scheduler (needs the [dask] extra); unset: threads")


class RouterSettings(BaseModel):
    """The router's own files: its access and error logs are rotated (canaryflow/local/logrotate.py, every minute)."""

    access_log_max_mb: float = Field(64, gt=0, description="a log over this size is renamed to <log>.1 and nginx "
                                                           "writes a new one")
    access_log_keep: int = Field(3, ge=1, le=100, description="rotated files kept: <log>.1 (newest) to <log>.<keep>")


class MetricsSettings(BaseModel):
    """Where the canary analysis reads per-version measurements (deployments/metrics.py, deployments/prometheus.py)."""

    source: Literal["access_log", "prometheus"] = Field(
        "access_log", description="access_log: the local router's JSON log; prometheus: PromQL over prometheus_url "
                                  "(the kubernetes platform always uses Prometheus)")
    prometheus_url: str | None = Field(None, description="Prometheus HTTP API; unset: the local stack's own "
                                                         "(ports.prometheus), started when source=prometheus")
    scrape_interval_s: float = Field(5.0, gt=0, le=60, description="the local Prometheus' scrape interval")


class HpaSettings(BaseModel):
    """The autoscaling/v2 HorizontalPodAutoscaler of each served version (deployments/kubernetes/objects.py)."""

    min_replicas: int = Field(2, ge=1)
    max_replicas: int = Field(10, ge=1)
    cpu_utilization: int = Field(70, ge=1, le=100, description="target average CPU, percent of requests")
    memory_utilization: int = Field(80, ge=1, le=100, description="target average memory, percent of requests")
    scale_up_percent: int = Field(100, ge=1, description="at most this much more pods per scale_up_period_s")
    scale_up_period_s: int = Field(15, ge=1, le=1800)
    scale_down_stabilization_s: int = Field(300, ge=0, le=3600)
    requests_per_pod: float | None = Field(None, gt=0, description="also scale on this per-pod request rate (a "
                                                                   "Pods metric from a custom metrics adapter)")
    requests_metric: str = "torchserve_requests_per_second"


class KubernetesSettings(BaseModel):
    """The kubernetes platform (``platform=kubernetes``): where and how versions are served on a cluster."""

    kubeconfig: Path | None = Field(None, description="unset: in-cluster config, else $KUBECONFIG / ~/.kube/config")
    context: str | None = None
    namespace: str = Field("canaryflow", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    field_manager: str = "canaryflow"
    image: str = "pytorch/torchserve:0.12.0-gpu"
    proxy_image: str = Field("nginx:1.27-alpine", description="the per-pod key proxy in front of TorchServe")
    fetch_image: str = Field("python:3.11-slim", description="the init container that fetches and checks the .mar")
    gpus_per_pod: int = Field(1, ge=0, description="nvidia.com/gpu per pod; 0 serves on CPU")
    cpu_request: str = "1"
    memory_request: str = "2Gi"
    memory_limit: str = "4Gi"
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, object]] = []
    affinity: dict[str, object] | None = None
    rollout_timeout_s: float = Field(600.0, gt=0, description="a version not Available by then fails to deploy")
    lease_s: int = Field(30, ge=3, le=3600, description="duration of the model locks' Leases (renewed every third "
                                                      "of it): a killed run's lock is free this long after it died")
    mlflow_auth_secret: str | None = Field(None, description="Secret (in the namespace) with MLFLOW_TRACKING_TOKEN "
                                                             "or _USERNAME/_PASSWORD for the pods' .mar fetch")
    replay_from_cidrs: list[str] = Field([], description="addresses of the API servers, allowed to reach inference "
                                                         "for the canary's replay through the service proxy")
    gateway_name: str = "canaryflow"
    gateway_namespace: str | None = Field(None, description="unset: the namespace above")
    gateway_pod_labels: dict[str, str] = Field({"app.kubernetes.io/name": "gateway"},
                                               description="pods allowed to reach inference (NetworkPolicy)")
    prometheus_pod_labels: dict[str, str] = Field({"app.kubernetes.io/name": "prometheus"},
                                                  description="pods allowed to reach metrics (NetworkPolicy)")
    monitoring_namespace: str | None = Field(None, description="namespace of Prometheus; unset: any namespace")
    gateway_url: str | None = Field(None, description="the Gateway's inference URL, what clients and the "
                                                     "pipeline's smoke and load tests call (router_url)")
    hostnames: list[str] = []
    session_persistence: bool = Field(False, description="sticky users through HTTPRoute sessionPersistence "
                                                        "(experimental channel; the standard channel lacks it)")
    hpa: HpaSettings = HpaSettings()


class ExternalServices(BaseModel):
    """Services a team already runs, instead of the ones ``canaryflow up`` starts on loopback. Unset: the embedded
    one. Credentials are read from files (mode 0600, never from the URL), so no secret sits in an environment
    listing, a config file or a log line (canaryflow/core/credentials.py)."""

    mlflow_tracking_uri: str | None = Field(None, description="http(s) URL of an MLflow tracking server")
    mlflow_username: str | None = Field(None, description="basic auth (mlflow server --app-name basic-auth)")
    mlflow_password_file: Path | None = None
    mlflow_token_file: Path | None = Field(None, description="bearer token instead of basic auth")
    prefect_api_url: str | None = Field(None, description="http(s) URL of a Prefect API, ending in /api")
    prefect_api_key_file: Path | None = None

    @field_validator("mlflow_tracking_uri", "prefect_api_url")
    @classmethod
    def _plain_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        url = urlsplit(value)
        if url.scheme not in {"http", "https"} or not url.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if url.username or url.password:
            raise ValueError("credentials in a service URL end up in logs: use the *_password_file / *_token_file / "
                             "*_key_file settings instead")
        if url.query or url.fragment:
            raise ValueError(f"{value!r}: a service URL takes no query or fragment")
        return value.rstrip("/")


class Settings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(env_prefix="CANARYFLOW_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    state_dir: Path = Path(".canaryflow")
    seal_key_file: Path | None = Field(
        None, description="the key that seals the pipeline's serving state (canaryflow/core/seal.py), read from this "
                          "file (e.g. the mounted Secret canaryflow-seal-key on Kubernetes); unset: "
                          "<state_dir>/secrets/state_seal_key, created on first use")
    # which implementations serve the release's interfaces (canaryflow/services.py)
    platform: Literal["local", "kubernetes"] = "local"
    ports: Ports = Ports()
    serving: ServingSettings = ServingSettings()
    prefect: PrefectSettings = PrefectSettings()
    webhook: WebhookSettings = WebhookSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    release: ReleaseSettings = ReleaseSettings()
    gates: GateSettings = GateSettings()
    optimization: OptimizationSettings = OptimizationSettings()
    loadtest: LoadTestSettings = LoadTestSettings()
    canary: CanarySettings = CanarySettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    batch: BatchSettings = BatchSettings()
    router: RouterSettings = RouterSettings()
    metrics: MetricsSettings = MetricsSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    external: ExternalServices = ExternalServices()

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        if not (value.startswith("127.") or value in {"localhost", "::1"}):
            raise ValueError(f"host {value!r} is not a loopback address; the local stack binds loopback only")
        return value

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def url(self, port_name: str, path: str = "") -> str:
        """``http://host:port`` of one of :class:`Ports` plus an optional path."""
        return f"http://{self.host}:{getattr(self.ports, port_name)}{path}"

    @property
    def mlflow_uri(self) -> str:
        """The MLflow tracking server: the team's (``external.mlflow_tracking_uri``) or the embedded one."""
        return self.external.mlflow_tracking_uri or self.url("mlflow")

    @property
    def prefect_api_url(self) -> str:
        """The Prefect API: the team's (``external.prefect_api_url``) or the embedded one."""
        return self.external.prefect_api_url or self.url("prefect", "/api")

    def embedded(self, service: Literal["mlflow", "prefect"]) -> bool:
        """Whether ``canaryflow up`` runs this service itself (no external URL set)."""
        return getattr(self.external, "mlflow_tracking_uri" if service == "mlflow" else "prefect_api_url") is None

    @property
    def router_url(self) -> str:
        """Where inference traffic enters: the local router, or the cluster's Gateway (``kubernetes.gateway_url``)."""
        if self.platform == "kubernetes" and self.kubernetes.gateway_url:
            return self.kubernetes.gateway_url.rstrip("/")
        return self.url("router")

    @property
    def prometheus_url(self) -> str:
        return self.metrics.prometheus_url or self.url("prometheus")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use; the external services' credentials are
    put where the MLflow and Prefect clients look for them (canaryflow/core/credentials.py)."""
    from canaryflow.core.credentials import export_credentials

    settings = Settings()
    export_credentials(settings)
    return settings


def reset_settings() -> None:
    """Forget the cached settings (tests, and the CLI after it changes the environment)."""
    get_settings.cache_clear()
