"""Serving against a real ``mlflow models serve`` process (one for the module) on a published tiny model:
mixed image/text rows in each JSON format, answers equal to in-process ``predict`` and to clip_core,
cached zero-shot classifiers, and bad requests refused with HTTP 400 and a message that names the problem."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from clip_core import build_zero_shot_classifier, load_checkpoint, load_templates
from clip_core.embed import embed_images, embed_texts, images_to_tensor, model_image_size
from workflows.common.runtime import free_port
from workflows.ops.local_mlflow import stop_process_group, wait_http
from workflows.tracking.serving import CLASSIFIER_CACHE_SIZE

from mlflow_helpers import COLORS, jpeg, make_checkpoint, publish, train_tokenizer, training_run, unique_name

BIN = Path(sys.executable).parent
LABELS = list(COLORS)
RED, BLUE = jpeg(COLORS["red"]), jpeg(COLORS["blue"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A published version, served by ``mlflow models serve`` from the registry as a user would run it."""
    mlflow.set_tracking_uri(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    tmp = tmp_path_factory.mktemp("serving")
    checkpoint = make_checkpoint(tmp / "checkpoint_00000010", train_tokenizer(), seed=0, step=10)
    name = unique_name("serve")
    uri = f"models:/{name}/{publish(client, name, training_run(client), checkpoint, step=10)}"
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    with open(tmp / "serve.log", "wb") as log:  # the server execs uvicorn, found on PATH
        proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=300, proc=proc)
        reference = load_checkpoint(checkpoint)
        yield {"url": f"http://127.0.0.1:{port}/invocations", "uri": uri, "model": mlflow.pyfunc.load_model(uri),
               "clip": reference.model.eval(), "tokenizer": reference.tokenizer}
    finally:
        stop_process_group(proc)


def post(served: dict[str, Any], body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(served["url"], json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def column(rows: list[dict[str, Any]], key: str, picked: list[int]) -> torch.Tensor:
    return torch.tensor([rows[i][key] for i in picked])


MIXED_RECORDS = {"dataframe_records": [{"image": b64(RED)}, {"text": "a red square"},
                                       {"image": b64(BLUE), "text": "blue photo"}],
                 "params": {"candidate_labels": LABELS}}


def test_mixed_rows_equal_in_process_predict_and_clip_core(served):
    status, body = post(served, MIXED_RECORDS)
    assert status == 200, body
    rows = body["predictions"]
    assert [sorted(r) for r in rows] == [["image_embedding", "label", "probs", "similarity", "text_embedding"]] * 3
    assert rows[0]["text_embedding"] is None and rows[1]["image_embedding"] is None
    assert rows[0]["similarity"] is None and rows[1]["similarity"] is None
    assert rows[1]["probs"] is None and rows[1]["label"] is None

    model, tokenizer = served["clip"], served["tokenizer"]
    images = embed_images(model, images_to_tensor([RED, BLUE], model_image_size(model)))
    texts = embed_texts(model, tokenizer, ["a red square", "blue photo"])
    assert torch.allclose(column(rows, "image_embedding", [0, 2]), images, atol=1e-5)
    assert torch.allclose(column(rows, "text_embedding", [1, 2]), texts, atol=1e-5)
    assert rows[2]["similarity"] == pytest.approx(float(images[1] @ texts[1]), abs=1e-5)
    classifier = build_zero_shot_classifier(model, tokenizer, LABELS, load_templates())
    expected = (model.logit_scale.exp() * images @ classifier).softmax(dim=-1)
    probs = column(rows, "probs", [0, 2])
    assert probs.shape == (2, len(LABELS)) and torch.allclose(probs, expected, atol=1e-5)
    assert [rows[0]["label"], rows[2]["label"]] == [LABELS[i] for i in expected.argmax(dim=1).tolist()]

    # in-process predict, with raw bytes and None where a row has no image or text, gives the same answer
    local = served["model"].predict(pd.DataFrame({"image": [RED, None, BLUE], "text": [None, "a red square",
                                                                                        "blue photo"]}),
                                    params={"candidate_labels": LABELS})
    assert torch.allclose(torch.tensor(local["image_embedding"][[0, 2]].tolist()), images, atol=1e-5)
    assert torch.allclose(torch.tensor(local["text_embedding"][[1, 2]].tolist()), texts, atol=1e-5)
    assert torch.allclose(torch.tensor(local["probs"][[0, 2]].tolist()), probs, atol=1e-5)
    assert local["image_embedding"][1] is None and local["probs"][1] is None


def test_every_json_format_and_single_modality_requests(served):
    _, reference = post(served, MIXED_RECORDS)
    split = {"dataframe_split": {"columns": ["image", "text"],
                                 "data": [[b64(RED), None], [None, "a red square"], [b64(BLUE), "blue photo"]]},
             "params": {"candidate_labels": LABELS}}
    # MLflow's tensor formats (inputs, instances) turn nulls into the text "None": fine for rows with no nulls
    inputs = {"inputs": {"image": [b64(BLUE)], "text": ["blue photo"]}, "params": {"candidate_labels": LABELS}}
    for body, want_rows in ((split, reference["predictions"]), (inputs, reference["predictions"][2:])):
        status, answer = post(served, body)
        assert status == 200, answer
        assert len(answer["predictions"]) == len(want_rows)
        for got, want in zip(answer["predictions"], want_rows):
            for key in ("image_embedding", "text_embedding", "probs"):
                assert (got[key] is None) == (want[key] is None), key
                if got[key] is not None:
                    assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-6), key
            assert got["label"] == want["label"]
    # texts only, and images only (base64 wrapped at 76 columns, as the `base64` command writes it): no labels
    status, answer = post(served, {"dataframe_records": [{"text": "a red square"}, {"text": "green photo"}]})
    assert status == 200 and [sorted(r) for r in answer["predictions"]] == [
        ["image_embedding", "similarity", "text_embedding"]] * 2
    status, answer = post(served, {"dataframe_records": [{"image": base64.encodebytes(RED).decode()}]})
    assert status == 200, answer
    assert torch.allclose(torch.tensor(answer["predictions"][0]["image_embedding"]),
                          torch.tensor(reference["predictions"][0]["image_embedding"]), atol=1e-6)


def test_zero_shot_classifiers_are_cached_per_label_tuple(served):
    pyfunc = served["model"].unwrap_python_model()
    pyfunc.classifier.cache_clear()
    frame = pd.DataFrame({"image": [RED, BLUE]})
    first = served["model"].predict(frame, params={"candidate_labels": LABELS})
    again = served["model"].predict(frame, params={"candidate_labels": LABELS})
    reordered = served["model"].predict(frame, params={"candidate_labels": LABELS[::-1]})
    info = pyfunc.classifier.cache_info()
    assert (info.hits, info.misses, info.currsize, info.maxsize) == (1, 2, 2, CLASSIFIER_CACHE_SIZE)
    assert first["probs"].tolist() == again["probs"].tolist()
    assert torch.allclose(torch.tensor(reordered["probs"].tolist()).flip(-1), torch.tensor(first["probs"].tolist()),
                          atol=1e-6)
    assert reordered["label"].tolist() == first["label"].tolist()


@pytest.mark.parametrize("request_body, message", [
    ({"dataframe_records": [{"img": b64(RED)}]}, "needs an 'image' column"),
    ({"dataframe_records": [{"image": b64(RED)}, {"image": "not base64!"}]}, "row 1: image is not base64 text"),
    ({"dataframe_records": [{"image": b64(b"plain text, not an image")}]}, "row 0: corrupt: not a readable image"),
    ({"dataframe_records": [{"text": "a red square"}, {"image": None, "text": None}]},
     "row 1: neither an image nor a text"),
    ({"dataframe_records": [{"text": 42}]}, "row 0: text must be a string"),
    ({"inputs": {"image": [b64(RED), None], "text": [None, "a red square"]}},
     "row 1: image is the text 'None'"),
    ({"dataframe_records": [{"image": b64(RED)}], "params": {"candidate_labels": [f"c{i}" for i in range(1001)]}},
     "1001 candidate_labels, more than the 1000"),
    ({"dataframe_records": [{"image": b64(RED)}], "params": {"candidate_labels": ["red", "blue", "red"]}},
     "candidate_labels repeat 'red'"),
    ({"dataframe_records": [{"image": b64(RED)}], "params": {"candidate_labels": ["red", " "]}},
     "every candidate label must be a non-empty string"),
], ids=["no-image-or-text-column", "bad-base64", "not-an-image", "empty-row", "text-not-a-string", "null-in-inputs",
        "too-many-labels", "repeated-label", "blank-label"])
def test_bad_requests_get_400_with_a_message_naming_the_problem(served, request_body, message):
    status, body = post(served, request_body)
    assert status == 400 and message in body["message"], body
