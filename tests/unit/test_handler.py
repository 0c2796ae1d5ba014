"""Handler unit tests: real exported models, TorchServe's own Context and body decoding, no server."""

from __future__ import annotations

import gc
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import TsModelLoader
from ts.protocol import otf_message_handler
from ts.utils.util import PredictionException

from canaryflow.core.serving_contract import (
    META_FILE,
    PREDICTION_HEADER,
    VERSION_HEADER,
    ServingMeta,
    prediction_summary,
)
from deployments import archive
from deployments.chaos_handler import CHAOS_ERROR, ChaosHandler
from deployments.handler import CanaryflowHandler

FEATURES = ["a", "b", "c", "d"]
ROWS = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-3.0, 0.25, 0.0, 7.0]]
LABELS = ["setosa", "versicolor", "virginica"]


class TinyModel(torch.nn.Module):
    """Linear 4 -> out_features with fixed weights; optional softmax or squeezed output."""

    def __init__(self, out_features: int = 3, softmax: bool = False, squeeze: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, out_features)
        with torch.no_grad():
            self.linear.weight.copy_(torch.linspace(-1.0, 1.0, out_features * 4).reshape(out_features, 4))
            self.linear.bias.copy_(torch.linspace(-0.5, 0.5, out_features))
        self.softmax, self.squeeze = softmax, squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        out = torch.softmax(out, dim=-1) if self.softmax else out
        return out.squeeze(-1) if self.squeeze else out


def make_bundle(root: Path, model: torch.nn.Module, export_batch: int = 2, dynamic: bool = True,
                dim_max: int = 4096, **meta: Any) -> Path:
    """Export ``model`` like the pipeline does and write canaryflow.json next to it."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=dim_max)}} if dynamic else None
    program = torch.export.export(model.eval(), (torch.randn(export_batch, 4),), dynamic_shapes=shapes)
    torch.export.save(program, root / "model.pt2")
    fields = dict(model_name="iris", model_version="7", format="torch_export", model_file="model.pt2",
                  n_features=4, feature_names=FEATURES, max_batch_rows=5) | meta
    ServingMeta(**fields).save(root / META_FILE)
    return root


def make_context(model_dir: Path) -> Context:
    manifest = {"model": {"modelName": "iris", "serializedFile": "model.pt2", "handler": "handler.py"}}
    return Context("iris", str(model_dir), manifest, 1, None, "0.12.0", metrics=mock.MagicMock(),
                   model_yaml_config={})


def load(model_dir: Path) -> tuple[CanaryflowHandler, Context]:
    """The handler the archiver would ship for this bundle (the chaos subclass only for a chaos build)."""
    chaos = ServingMeta.load(model_dir / META_FILE).chaos
    handler, context = (ChaosHandler() if chaos else CanaryflowHandler()), make_context(model_dir)
    handler.initialize(context)
    return handler, context


class _Conn:
    """Just enough socket for TorchServe's frame reader."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def wire_param(body: bytes, content_type: str = "application/json", name: str = "body") -> dict[str, Any]:
    """The input parameter TorchServe's worker decodes from this body (its own code, not a copy)."""
    parts = (name.encode(), content_type.encode(), body)
    frame = b"".join(struct.pack("!i", len(part)) + part for part in parts)
    return otf_message_handler._retrieve_input_data(_Conn(frame))


def wire(body: bytes, content_type: str = "application/json", name: str = "body") -> dict[str, Any]:
    """One request as the handler receives it in ``data``."""
    param = wire_param(body, content_type, name)
    return {param["name"]: param["value"]}


def rows_body(rows: list[Any], key: str = "inputs") -> bytes:
    return json.dumps({key: rows}).encode()


def predict(handler: CanaryflowHandler, context: Context, *requests: dict[str, Any],
            headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    context.request_processor = [RequestProcessor(dict(headers or {})) for _ in requests]
    return handler.handle(list(requests), context)


def probabilities(response: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([p["probabilities"] for p in response["predictions"]])


@pytest.fixture(autouse=True)
def _unfreeze_gc():
    yield
    gc.unfreeze()  # initialize() freezes the heap; do not leave that to other tests in this process


@pytest.fixture(scope="module")
def model() -> TinyModel:
    return TinyModel().eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, model: TinyModel) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"), model)


@pytest.fixture(scope="module")
def nameless_bundle(tmp_path_factory: pytest.TempPathFactory, model: TinyModel) -> Path:
    return make_bundle(tmp_path_factory.mktemp("nameless"), model, feature_names=None)


def test_good_batch_matches_model_softmax(bundle: Path, model: TinyModel) -> None:
    handler, context = load(bundle)
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    expected = torch.softmax(model(torch.tensor(ROWS)), dim=-1).detach()
    assert response["model_name"] == "iris" and response["model_version"] == "7"
    torch.testing.assert_close(probabilities(response), expected)
    assert [p["class_index"] for p in response["predictions"]] == expected.argmax(dim=1).tolist()
    assert [p["class"] for p in response["predictions"]] == expected.argmax(dim=1).tolist()
    assert all(p["model_version"] == "7" for p in response["predictions"])
    assert context.get_response_headers(0)[VERSION_HEADER] == "7"
    assert context.get_response_content_type(0) == "application/json"
    json.dumps(response)  # TorchServe json.dumps what we return


@pytest.mark.parametrize(
    ("content_type", "name", "delivered"),
    [
        ("application/json", "body", dict),
        ("application/json; charset=utf-8", "body", bytearray),  # only the exact type is decoded
        ("text/plain", "body", str),
        ("application/octet-stream", "body", bytearray),
        ("application/json", "data", dict),  # multipart form field "data"
    ],
)
def test_every_body_form_torchserve_delivers(bundle: Path, model: TinyModel, content_type: str, name: str,
                                             delivered: type) -> None:
    request = wire(rows_body(ROWS), content_type, name)
    assert type(request[name]) is delivered
    handler, context = load(bundle)
    [response] = predict(handler, context, request)
    torch.testing.assert_close(probabilities(response), torch.softmax(model(torch.tensor(ROWS)), -1).detach())


def test_malformed_json_is_forwarded_as_bytes_by_torchserve() -> None:
    assert type(wire_param(b'{"inputs": [[1, 2')["value"]) is bytearray


def test_bodies_when_torchserve_decoding_is_off(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "false")
    request = wire(rows_body(ROWS))
    assert type(request["body"]) is bytearray
    handler, context = load(bundle)
    assert len(predict(handler, context, request)[0]["predictions"]) == 3


def test_instances_form_and_object_rows_equal_list_rows(bundle: Path) -> None:
    handler, context = load(bundle)
    objects = [dict(reversed(list(zip(FEATURES, row, strict=True)))) for row in ROWS]  # key order is free
    [by_list] = predict(handler, context, wire(rows_body(ROWS)))
    [by_instances] = predict(handler, context, wire(rows_body(ROWS, key="instances")))
    [by_object] = predict(handler, context, wire(rows_body(objects)))
    assert by_list == by_instances == by_object


@pytest.mark.parametrize("fixed_batch", [1, 2])
def test_fixed_batch_program_is_fed_in_chunks(tmp_path: Path, model: TinyModel, fixed_batch: int) -> None:
    bundle = make_bundle(tmp_path, model, export_batch=fixed_batch, dynamic=False, fixed_batch=fixed_batch)
    with pytest.raises(AssertionError, match="Guard failed"):  # the program itself refuses 3 rows
        torch.export.load(bundle / "model.pt2").module()(torch.zeros(3, 4))
    handler, context = load(bundle)
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    torch.testing.assert_close(probabilities(response), torch.softmax(model(torch.tensor(ROWS)), -1).detach())


def test_probabilities_output_with_class_labels(tmp_path: Path) -> None:
    model = TinyModel(softmax=True).eval()
    handler, context = load(make_bundle(tmp_path, model, output="probabilities", class_labels=LABELS))
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    expected = model(torch.tensor(ROWS)).detach()
    torch.testing.assert_close(probabilities(response), expected)
    assert [p["class"] for p in response["predictions"]] == [LABELS[i] for i in expected.argmax(1).tolist()]


@pytest.mark.parametrize("squeeze", [False, True], ids=["n-by-1", "1-d"])
def test_single_logit_output_becomes_two_sigmoid_classes(tmp_path: Path, squeeze: bool) -> None:
    model = TinyModel(out_features=1, squeeze=squeeze).eval()
    handler, context = load(make_bundle(tmp_path, model, class_labels=["no", "yes"]))
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    p = torch.sigmoid(model(torch.tensor(ROWS)).reshape(-1)).detach()
    torch.testing.assert_close(probabilities(response), torch.stack([1 - p, p], dim=1))
    assert [r["class"] for r in response["predictions"]] == ["yes" if v > 0.5 else "no" for v in p.tolist()]


# (id, body, key words of the message)
BAD_INPUTS: list[tuple[str, bytes, list[str]]] = [
    ("truncated-json", b'{"inputs": [[1, 2', ["malformed JSON"]),
    ("empty-body", b"", ["malformed JSON"]),
    ("not-utf8", b'{"inputs": [[1, 2, 3, \xff]]}', ["malformed JSON", "utf-8"]),
    ("deep-nesting", b"[" * 100_000, ["malformed JSON", "recursion"]),
    ("body-array", b"[[1, 2, 3, 4]]", ["JSON object", "got array"]),
    ("body-number", b"42", ["JSON object", "got number"]),
    ("body-null", b"null", ["JSON object", "got null"]),
    ("no-inputs", b'{"rows": [[1, 2, 3, 4]]}', ["'inputs' or 'instances'", "neither", "rows"]),
    ("both-keys", b'{"inputs": [[1, 2, 3, 4]], "instances": [[1, 2, 3, 4]]}', ["found both"]),
    ("batch-object", b'{"inputs": {"a": 1}}', ["'inputs' must be a list", "got object"]),
    ("batch-string", b'{"instances": "1,2,3,4"}', ["'instances' must be a list", "got string"]),
    ("empty-batch", b'{"inputs": []}', ["'inputs' is empty"]),
    ("too-many-rows", rows_body([[1, 2, 3, 4]] * 6), ["6 rows", "limit of 5"]),
    ("short-row", b'{"inputs": [[1, 2, 3, 4], [1, 2, 3]]}', ["row 1 has 3 values, expected 4"]),
    ("long-row", b'{"inputs": [[1, 2, 3, 4, 5]]}', ["row 0 has 5 values, expected 4"]),
    ("flat-row", b'{"inputs": [1, 2, 3, 4]}', ["row 0 must be a list of 4 numbers", "got number"]),
    ("string", b'{"inputs": [[1, 2, "x", 4]]}', ["row 0, column 2 ('c')", "'x' is not a number"]),
    ("long-string", rows_body([[1, 2, "y" * 500, 4]]), ["row 0, column 2", "'yyy", "..."]),
    ("boolean", b'{"inputs": [[1, true, 3, 4]]}', ["row 0, column 1 ('b')", "True", "boolean"]),
    ("null-value", b'{"inputs": [[1, 2, 3, null]]}', ["row 0, column 3 ('d')", "None"]),
    ("nested-list", b'{"inputs": [[1, [2], 3, 4]]}', ["row 0, column 1", "[2] is not a number"]),
    ("nan", b'{"inputs": [[1, 2, 3, 4], [1, NaN, 3, 4]]}', ["row 1, column 1", "nan", "finite"]),
    ("inf", b'{"inputs": [[Infinity, 2, 3, 4]]}', ["row 0, column 0", "inf", "finite"]),
    ("minus-inf", b'{"inputs": [[1, 2, -Infinity, 4]]}', ["row 0, column 2", "-inf"]),
    ("json-overflow", b'{"inputs": [[1, 2, 3, 1e400]]}', ["row 0, column 3", "inf"]),
    ("float32-overflow", b'{"inputs": [[1, 1e39, 3, 4]]}', ["row 0, column 1", "float32", "range"]),
    ("huge-int", b'{"inputs": [[1, 2, 3, 1' + b"0" * 400 + b"]]}", ["row 0, column 3", "finite"]),
    ("obj-missing", b'{"inputs": [{"a": 1, "b": 2, "c": 3}]}', ["row 0: missing features ['d']"]),
    ("obj-unknown", rows_body([dict(zip("abcde", range(5), strict=True))]), ["unknown features ['e']"]),
    ("obj-string", b'{"inputs": [{"a": 1, "b": "2", "c": 3, "d": 4}]}', ["column 1 ('b')", "'2'"]),
    ("obj-nan", b'{"inputs": [[0, 0, 0, 0], {"a": 1, "b": 2, "c": 3, "d": NaN}]}', ["row 1, column 3 ('d')"]),
]


def assert_bad(excinfo: pytest.ExceptionInfo[PredictionException], words: list[str]) -> None:
    assert excinfo.value.error_code == 400
    assert len(excinfo.value.message) < 300
    for word in words:
        assert word.lower() in excinfo.value.message.lower(), excinfo.value.message


@pytest.mark.parametrize(("body", "words"), [pytest.param(b, w, id=id_) for id_, b, w in BAD_INPUTS])
def test_bad_input_is_a_400_with_a_precise_message(bundle: Path, body: bytes, words: list[str]) -> None:
    handler, context = load(bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(body))
    assert_bad(excinfo, words)
    [response] = predict(handler, context, wire(rows_body(ROWS)))  # nothing left behind
    assert len(response["predictions"]) == 3


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/octet-stream"])
def test_malformed_json_is_a_400_whatever_the_content_type(bundle: Path, content_type: str) -> None:
    handler, context = load(bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(b'{"inputs": [[1, 2, 3, 4]', content_type))
    assert_bad(excinfo, ["malformed JSON"])


@pytest.mark.parametrize(
    ("request_", "words"),
    [({}, ["no body"]), ({"body": None}, ["got null"])],
    ids=["no-body-parameter", "null-body"],
)
def test_requests_without_a_body(bundle: Path, request_: dict[str, Any], words: list[str]) -> None:
    handler, context = load(bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, request_)
    assert_bad(excinfo, words)


def test_object_rows_need_feature_names(nameless_bundle: Path) -> None:
    handler, context = load(nameless_bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(rows_body([dict(zip(FEATURES, ROWS[0], strict=True))])))
    assert_bad(excinfo, ["row 0 must be a list of 4 numbers", "no feature names", "got object"])
    assert len(predict(handler, context, wire(rows_body(ROWS)))[0]["predictions"]) == 3


def test_many_bad_requests_then_a_good_one(bundle: Path, model: TinyModel) -> None:
    handler, context = load(bundle)
    for _, body, _ in BAD_INPUTS:
        with pytest.raises(PredictionException):
            predict(handler, context, wire(body))
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    torch.testing.assert_close(probabilities(response), torch.softmax(model(torch.tensor(ROWS)), -1).detach())


def test_server_side_batch_answers_each_request(bundle: Path) -> None:
    handler, context = load(bundle)
    responses = predict(handler, context, wire(rows_body(ROWS[:1])), wire(rows_body(ROWS, key="instances")))
    assert [len(r["predictions"]) for r in responses] == [1, 3]
    assert responses[0]["predictions"][0] == responses[1]["predictions"][0]
    assert [context.get_response_headers(i)[VERSION_HEADER] for i in range(2)] == ["7", "7"]


def test_one_bad_request_in_a_server_side_batch_gets_its_own_400(bundle: Path, model: TinyModel) -> None:
    handler, context = load(bundle)
    responses = predict(handler, context, wire(rows_body(ROWS)), wire(b'{"inputs": [[1, 2]]}'),
                        wire(rows_body(ROWS[:1])))
    torch.testing.assert_close(probabilities(responses[0]), softmax(model, ROWS))
    assert context.get_response_status(1)[0] == 400 and "row 0 has 2 values, expected 4" in responses[1]["message"]
    assert responses[1]["code"] == 400 and "predictions" not in responses[1]
    assert context.get_response_status(0)[0] != 400 and context.get_response_status(2)[0] != 400
    assert len(responses[2]["predictions"]) == 1


def test_a_server_side_batch_larger_than_the_program_takes_is_fed_in_chunks(tmp_path: Path,
                                                                            model: TinyModel) -> None:
    """The pipeline exports for ``max_batch_rows`` rows (packaging.export_pytorch); TorchServe may group several
    full requests into one batch: more rows than the program's guard allows in one call."""
    handler, context = load(make_bundle(tmp_path / "b", model, dim_max=5, max_batch_rows=5))
    full = [ROWS[i % 3] for i in range(5)]
    responses = predict(handler, context, *(wire(rows_body(full)) for _ in range(3)))
    assert [context.get_response_status(i)[0] for i in range(3)] == [200, 200, 200]
    for response in responses:
        torch.testing.assert_close(probabilities(response), softmax(model, full))


def test_a_batch_of_only_bad_requests_answers_each_its_400(bundle: Path) -> None:
    handler, context = load(bundle)
    responses = predict(handler, context, wire(b'{"inputs": [[1, 2]]}'), wire(b"not json"))
    assert [r["code"] for r in responses] == [400, 400]
    assert [context.get_response_status(i)[0] for i in range(2)] == [400, 400]


def test_a_single_bad_request_is_still_a_400_exception(bundle: Path) -> None:
    handler, context = load(bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(b'{"inputs": [[1, 2]]}'))
    assert_bad(excinfo, ["row 0 has 2 values, expected 4"])


def test_explain_header_is_a_400_and_describe_returns_the_meta(bundle: Path) -> None:
    handler, context = load(bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(rows_body(ROWS)), headers={"explain": "True"})
    assert_bad(excinfo, ["explanations are not supported"])
    [described] = predict(handler, context, wire(rows_body(ROWS)), headers={"describe": "True"})
    assert described == ServingMeta.load(bundle / META_FILE).to_dict()


def test_class_label_count_must_match_the_model(tmp_path: Path, model: TinyModel) -> None:
    bundle = make_bundle(tmp_path, model, class_labels=["only", "two"])
    with pytest.raises(ValueError, match="3 classes but the meta lists 2"):
        load(bundle)


def test_meta_round_trips_through_json_and_files(tmp_path: Path) -> None:
    chaos = {"error_ratio": 0.25, "latency_ms": 5, "flip": {"column": 1, "above": 0.5}, "permute": True}
    meta = ServingMeta("iris", "7", "onnx", "model.onnx", 2, ["x", "y"], "float64", "probabilities",
                       ["no", "yes"], 64, 1, chaos)
    assert ServingMeta.from_json(meta.to_json()) == meta
    meta.save(tmp_path / META_FILE)
    assert ServingMeta.load(tmp_path / META_FILE) == meta
    assert set(json.loads(meta.to_json())) == {
        "model_name", "model_version", "format", "model_file", "n_features", "feature_names", "input_dtype",
        "output", "class_labels", "max_batch_rows", "fixed_batch", "chaos", "batch_rows",
    }
    assert ServingMeta("iris", "7", "onnx", "model.onnx", 2).chaos is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"format": "pickle"}, "format 'pickle'"),
        ({"output": "scores"}, "output 'scores'"),
        ({"input_dtype": "int64"}, "input_dtype 'int64'"),
        ({"n_features": 0}, "n_features"),
        ({"n_features": True}, "n_features"),
        ({"feature_names": ["a", "b"]}, "feature_names"),
        ({"feature_names": ["a", "a", "b", "c"]}, "feature_names"),
        ({"max_batch_rows": -1}, "max_batch_rows"),
        ({"fixed_batch": 0}, "fixed_batch"),
        ({"model_version": 7}, "model_version"),
        ({"class_labels": []}, "class_labels"),
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"chaos": "on"}, "chaos must be None or an object"),
        ({"chaos": {"errors": 1}}, "chaos has unknown keys ['errors']"),
        ({"chaos": {"error_ratio": 1.5}}, "chaos.error_ratio"),
        ({"chaos": {"error_ratio": True}}, "chaos.error_ratio"),
        ({"chaos": {"latency_ms": -1}}, "chaos.latency_ms"),
        ({"chaos": {"armed_by": "../x"}}, "chaos.armed_by"),
        ({"chaos": {"latency_ms": float("nan")}}, "chaos.latency_ms"),
        ({"chaos": {"permute": 1}}, "chaos.permute"),
        ({"chaos": {"flip": {"column": 4, "above": 0}}}, "chaos.flip"),
        ({"chaos": {"flip": {"column": 0}}}, "chaos.flip"),
        ({"chaos": {"flip": {"column": 0, "above": "x"}}}, "chaos.flip"),
        ({"chaos": {"flip": [0, 1]}}, "chaos.flip"),
    ],
)
def test_invalid_meta_is_refused(change: dict[str, Any], words: str) -> None:
    fields = dict(model_name="iris", model_version="7", format="torch_export", model_file="model.pt2",
                  n_features=4, feature_names=FEATURES) | change
    with pytest.raises(ValueError, match="invalid serving meta") as excinfo:
        ServingMeta.from_dict(fields)
    assert words in str(excinfo.value)


def _parse_predict_response(msg: bytes) -> tuple[int, str, list[tuple[int, dict[str, str], bytes]]]:
    """Decode the worker -> frontend predict frame (otf_message_handler.create_predict_response)."""
    pos = 0

    def integer() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from("!i", msg, pos - 4)[0]

    def blob() -> bytes:
        nonlocal pos
        n = integer()
        pos += n
        return bytes(msg[pos - n : pos])

    code, message, responses = integer(), blob().decode(), []
    while (n := integer()) != -1:
        pos += n  # request id
        blob()  # content type
        status = integer()
        blob()  # reason phrase
        headers = {blob().decode(): blob().decode() for _ in range(integer())}
        responses.append((status, headers, blob()))
    return code, message, responses


def test_torchserve_loader_and_service_use_our_entry_point(bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the way TorchServe 0.12 does (handler file in the model dir) and predict through its Service."""
    model_dir = Path(shutil.copytree(bundle, tmp_path / "mar"))
    handler_file, serving_files = archive.handler_files([model_dir / META_FILE])
    for path in [handler_file, *serving_files]:  # as torch-model-archiver lays them out in the model dir
        shutil.copy(path, model_dir / path.name)
    monkeypatch.syspath_prepend(str(model_dir))
    for name in ("handler", "serving_contract", "serving_request"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    metrics = MetricsCacheYamlImpl(config_file_path=str(Path(otf_message_handler.__file__).parents[1]
                                                         / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    try:
        service = TsModelLoader().load("iris", str(model_dir), "handler.py", None, 1, metrics_cache=metrics)
        assert sys.modules["handler"].handle.handler.initialized  # the load call went through handle(None, ctx)
        # the archived serving modules were imported from the model dir, not from the repository
        assert Path(sys.modules["handler"].contract.__file__).parent == model_dir
        service.set_cl_socket(None)

        def request(body: bytes) -> dict[str, Any]:
            return {"requestId": b"req-1", "headers": [], "parameters": [wire_param(body)]}

        code, message, _ = _parse_predict_response(service.predict([request(b'{"inputs": [[1, 2]]}')]))
        assert (code, message) == (400, "row 0 has 2 values, expected 4")
        response = service.predict([request(rows_body(ROWS))])
        code, _, [(status, headers, body)] = _parse_predict_response(response)
        assert (code, status, headers[VERSION_HEADER]) == (200, 200, "7")
        assert len(json.loads(body)["predictions"]) == 3
    finally:
        for name in ("handler", "serving_contract", "serving_request"):
            sys.modules.pop(name, None)


def make_onnx_bundle(root: Path, model: torch.nn.Module, export_batch: int = 2, dynamic: bool = True,
                     **meta: Any) -> Path:
    """Export ``model`` to ONNX the way the optimizer does (dynamo, from the torch.export program)."""
    root.mkdir(parents=True, exist_ok=True)
    dims = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    program = torch.export.export(model.eval(), (torch.randn(export_batch, 4),), dynamic_shapes=dims)
    torch.onnx.export(program, dynamo=True).save(str(root / "model.onnx"))
    fields = dict(model_name="iris", model_version="8", format="onnx", model_file="model.onnx", n_features=4,
                  feature_names=FEATURES, max_batch_rows=5, class_labels=LABELS) | meta
    ServingMeta(**fields).save(root / META_FILE)
    return root


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory, model: TinyModel) -> Path:
    return make_onnx_bundle(tmp_path_factory.mktemp("onnx"), model)


def test_onnx_bundle_served_like_the_model(onnx_bundle: Path, model: TinyModel) -> None:
    handler, context = load(onnx_bundle)
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    expected = torch.softmax(model(torch.tensor(ROWS)), dim=-1).detach()
    torch.testing.assert_close(probabilities(response), expected)
    assert [p["class"] for p in response["predictions"]] == [LABELS[i] for i in expected.argmax(1).tolist()]
    assert response["model_version"] == "8" and context.get_response_headers(0)[VERSION_HEADER] == "8"
    [big] = predict(handler, context, wire(rows_body([ROWS[0]] * 5)))  # batch sizes other than the export's
    assert len(big["predictions"]) == 5
    assert CanaryflowHandler.for_bundle(onnx_bundle).probabilities(torch.tensor(ROWS).numpy()).shape == (3, 3)


@pytest.mark.parametrize("fixed_batch", [1, 2])
def test_onnx_fixed_batch_is_fed_in_chunks(tmp_path: Path, model: TinyModel, fixed_batch: int) -> None:
    bundle = make_onnx_bundle(tmp_path, model, export_batch=fixed_batch, dynamic=False, fixed_batch=fixed_batch)
    import onnxruntime as ort

    with pytest.raises(Exception, match="dimension"):  # the model itself refuses 3 rows
        session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: torch.zeros(3, 4).numpy()})
    handler, context = load(bundle)
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    torch.testing.assert_close(probabilities(response), torch.softmax(model(torch.tensor(ROWS)), -1).detach())


def test_onnx_bad_input_is_a_400(onnx_bundle: Path) -> None:
    handler, context = load(onnx_bundle)
    with pytest.raises(PredictionException) as excinfo:
        predict(handler, context, wire(b'{"inputs": [[1, 2, "x", 4]]}'))
    assert_bad(excinfo, ["row 0, column 2 ('c')", "'x' is not a number"])
    assert len(predict(handler, context, wire(rows_body(ROWS)))[0]["predictions"]) == 3


# -- the prediction summary (X-Prediction) and fault injection (chaos) -----------------------------------------------


def test_prediction_summary_format_and_truncation() -> None:
    probs = [[0.1, 0.9], [0.6666, 0.3334], [0.5, 0.5]]
    assert prediction_summary(probs, [1, 0, 0]) == "1:0.900,0:0.667,0:0.500"
    many = [[0.25, 0.75]] * 40
    summary = prediction_summary(many, [1] * 40)
    assert summary == ",".join(["1:0.750"] * 32) + ",+8"
    assert prediction_summary(many[:32], [1] * 32) == ",".join(["1:0.750"] * 32)


def test_prediction_header_summarizes_each_request(bundle: Path, model: TinyModel) -> None:
    handler, context = load(bundle)
    responses = predict(handler, context, wire(rows_body(ROWS)), wire(rows_body(ROWS[:1])))
    expected = torch.softmax(model(torch.tensor(ROWS)), dim=-1).detach()
    top = expected.argmax(1).tolist()
    want = ",".join(f"{top[r]}:{expected[r, top[r]].item():.3f}" for r in range(3))
    assert context.get_response_headers(0)[PREDICTION_HEADER] == want
    assert context.get_response_headers(1)[PREDICTION_HEADER] == want.split(",")[0]
    assert [p["class_index"] for p in responses[0]["predictions"]] == top


def test_prediction_header_caps_rows(tmp_path: Path, model: TinyModel) -> None:
    handler, context = load(make_bundle(tmp_path, model, max_batch_rows=64))
    predict(handler, context, wire(rows_body([ROWS[0]] * 40)))
    parts = context.get_response_headers(0)[PREDICTION_HEADER].split(",")
    assert len(parts) == 33 and parts[-1] == "+8"


def chaos_handler(tmp_path: Path, model: TinyModel, chaos: dict[str, Any], seed: int = 0) -> tuple[
        CanaryflowHandler, Context]:
    handler, context = load(make_bundle(tmp_path, model, chaos=chaos))
    handler.chaos.rng.seed(seed)
    return handler, context


def softmax(model: TinyModel, rows: list[list[float]]) -> torch.Tensor:
    return torch.softmax(model(torch.tensor(rows)), dim=-1).detach()


PINNED = {"X-Canaryflow-Pinned": "1"}


def test_no_chaos_costs_nothing(bundle: Path) -> None:
    handler, context = load(bundle)
    assert type(handler) is CanaryflowHandler and not hasattr(handler, "chaos")
    predict(handler, context, wire(rows_body(ROWS)))
    assert archive.handler_files([bundle / META_FILE])[0] == archive.HANDLER_FILE  # production builds


def test_chaos_errors_answer_500_and_the_handler_lives_on(tmp_path: Path, model: TinyModel) -> None:
    handler, context = chaos_handler(tmp_path, model, {"error_ratio": 1.0})
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    assert context.get_response_status(0) == (500, CHAOS_ERROR)
    assert response == {"code": 500, "type": "InternalServerException", "message": CHAOS_ERROR}
    assert context.get_response_headers(0)[VERSION_HEADER] == "7"
    assert PREDICTION_HEADER not in context.get_response_headers(0)
    [pinned] = predict(handler, context, wire(rows_body(ROWS)), headers=PINNED)  # the pipeline's own tests
    assert context.get_response_status(0)[0] in (None, 200)
    torch.testing.assert_close(probabilities(pinned), softmax(model, ROWS))


def test_armed_chaos_waits_for_its_file(tmp_path: Path, model: TinyModel,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARYFLOW_TRAFFIC_DIR", str(tmp_path))
    handler, context = chaos_handler(tmp_path, model, {"error_ratio": 1.0, "armed_by": "after-promotion"})
    predict(handler, context, wire(rows_body(ROWS)))
    assert context.get_response_status(0)[0] != 500  # not armed yet
    (tmp_path / "chaos-armed-after-promotion").touch()
    predict(handler, context, wire(rows_body(ROWS)))
    assert context.get_response_status(0)[0] == 500


def test_chaos_error_ratio_is_a_share_of_requests(tmp_path: Path, model: TinyModel) -> None:
    handler, context = chaos_handler(tmp_path, model, {"error_ratio": 0.3}, seed=1)
    failed = 0
    for _ in range(400):
        predict(handler, context, wire(rows_body(ROWS[:1])))
        failed += context.get_response_status(0)[0] == 500
    assert abs(failed / 400 - 0.3) < 4 * (0.3 * 0.7 / 400) ** 0.5


def test_chaos_in_a_server_side_batch_only_hits_live_requests(tmp_path: Path, model: TinyModel) -> None:
    handler, context = chaos_handler(tmp_path, model, {"error_ratio": 1.0, "permute": True})
    context.request_processor = [RequestProcessor(PINNED), RequestProcessor({})]
    responses = handler.handle([wire(rows_body(ROWS)), wire(rows_body(ROWS))], context)
    torch.testing.assert_close(probabilities(responses[0]), softmax(model, ROWS))
    assert context.get_response_status(1)[0] == 500 and context.get_response_status(0)[0] != 500


def test_chaos_latency_delays_live_requests(tmp_path: Path, model: TinyModel) -> None:
    import time

    handler, context = chaos_handler(tmp_path, model, {"latency_ms": 60})
    started = time.perf_counter()
    predict(handler, context, wire(rows_body(ROWS)))
    assert time.perf_counter() - started >= 0.06
    started = time.perf_counter()
    predict(handler, context, wire(rows_body(ROWS)), headers=PINNED)
    assert time.perf_counter() - started < 0.06


def test_chaos_flip_reverses_a_subgroup(tmp_path: Path, model: TinyModel) -> None:
    handler, context = chaos_handler(tmp_path, model, {"flip": {"column": 3, "above": 0.5}})
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    expected = softmax(model, ROWS)
    hit = torch.tensor([row[3] > 0.5 for row in ROWS])
    assert hit.tolist() == [False, True, True]
    want = torch.where(hit.unsqueeze(1), expected.flip(1), expected)
    torch.testing.assert_close(probabilities(response), want)
    assert [p["class_index"] for p in response["predictions"]] == want.argmax(1).tolist()
    top = want.argmax(1).tolist()
    assert context.get_response_headers(0)[PREDICTION_HEADER].split(",")[1].startswith(f"{top[1]}:")


def test_chaos_permute_rolls_every_row(tmp_path: Path, model: TinyModel) -> None:
    handler, context = chaos_handler(tmp_path, model, {"permute": True})
    [response] = predict(handler, context, wire(rows_body(ROWS)))
    expected = softmax(model, ROWS)
    torch.testing.assert_close(probabilities(response), expected.roll(1, dims=1))
    assert [p["class_index"] for p in response["predictions"]] != expected.argmax(1).tolist()


def test_chaos_is_off_for_parity_checks(tmp_path: Path, model: TinyModel) -> None:
    bundle = make_bundle(tmp_path, model, chaos={"permute": True, "error_ratio": 1.0})
    local = CanaryflowHandler.for_bundle(bundle)
    assert archive.handler_files([bundle / META_FILE])[0] == archive.CHAOS_HANDLER_FILE  # only a chaos build
    torch.testing.assert_close(torch.from_numpy(local.probabilities(torch.tensor(ROWS).numpy())),
                               softmax(model, ROWS))


def test_a_chaos_build_is_known_by_its_archive_not_by_a_tag(tmp_path: Path, model: TinyModel) -> None:
    """torch-model-archiver for real: only the chaos build's .mar ships chaos_handler.py, and that is what the
    promotion guard reads (a registry user can edit the tag, not the archive)."""
    store = tmp_path / "store"
    store.mkdir()
    built = {}
    for version, chaos in (("1", None), ("2", {"error_ratio": 0.5})):
        bundle = make_bundle(tmp_path / f"b{version}", model, chaos=chaos)
        built[version] = archive.build_mar(bundle / "model.pt2", [bundle / META_FILE], model="iris",
                                           version=version, model_store=store)
    assert not archive.is_chaos_build(built["1"].path) and archive.is_chaos_build(built["2"].path)
    (store / "junk.mar").write_bytes(b"not a zip")
    assert not archive.is_chaos_build(store / "junk.mar") and not archive.is_chaos_build(store / "missing.mar")
