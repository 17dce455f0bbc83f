"""MLflow with authentication, as k8s/base/mlflow.yaml runs it, against a real `mlflow server` on loopback.

One `mlflow server --app-name basic-auth` for the module, with the auth config the ConfigMap ships (only its
database moved to a temp SQLite file) and the admin from the environment, as the Deployment passes it. Then
k8s/mlflow_users.py (the mlflow-users Job) creates the two workload identities, and clipflow's own tracking
and registry code runs as each of them with credentials from the environment, as the RayJobs' pods have them:
anonymous requests are refused, train logs and registers, eval claims, records and moves aliases, and
eval can neither rewrite a training run nor delete the model.
"""

from __future__ import annotations

import configparser
import io
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from clip_core import load_checkpoint
from workflows.common.config import load_config
from workflows.common.errors import UserError
from workflows.common.runtime import free_port
from workflows.ops.k8s_checks import load_documents
from workflows.ops.local_mlflow import stop_process_group, wait_http
from workflows.tracking import registry
from workflows.tracking.run import get_or_create_experiment
from workflows.tracking.tracker import Tracker, TrainingTracking

from mlflow_helpers import make_checkpoint, train_tokenizer, unique_name

ROOT = Path(__file__).resolve().parent.parent
MLFLOW_YAML = ROOT / "k8s" / "base" / "mlflow.yaml"
USERS_SCRIPT = ROOT / "k8s" / "mlflow_users.py"
BIN = Path(sys.executable).parent
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def shipped(kind: str) -> dict[str, Any]:
    return next(doc for doc in load_documents(MLFLOW_YAML) if doc["kind"] == kind)


def auth_config(database_uri: str) -> str:
    """The ConfigMap's basic_auth.ini with its database replaced (no PostgreSQL here)."""
    container = shipped("Deployment")["spec"]["template"]["spec"]["containers"][0]
    name = Path(next(v["value"] for v in container["env"] if v["name"] == "MLFLOW_AUTH_CONFIG_PATH")).name
    ini = configparser.ConfigParser()
    ini.read_string(shipped("ConfigMap")["data"][name])
    ini["mlflow"]["database_uri"] = database_uri
    out = io.StringIO()
    ini.write(out)
    return out.getvalue()


class AuthServer:
    """The server, its users' credentials, and a way to run as one of them."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.users = {who: (f"clipflow-{who}", secrets.token_hex(12)) for who in ("admin", "train", "eval")}
        self.proc: subprocess.Popen | None = None

    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV and not k.startswith("MLFLOW_AUTH")}

    def start(self) -> None:
        (self.root / "basic_auth.ini").write_text(auth_config(f"sqlite:///{self.root / 'auth.db'}"))
        admin, password = self.users["admin"]
        env = {**self.base_env(), "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "basic_auth.ini"),
               "MLFLOW_AUTH_ADMIN_USERNAME": admin, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        args = shipped("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        app = [a for a in args if a.startswith("--app-name=")]
        assert app == ["--app-name=basic-auth"]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", *app, "--host", "127.0.0.1", "--port", str(self.port), "--workers",
                 "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=180, proc=self.proc)

    def create_users(self) -> subprocess.CompletedProcess:
        """Run the mlflow-users Job's script with the environment the Job gives it."""
        env = {**self.base_env(), "MLFLOW_TRACKING_URI": self.uri,
               **dict(zip(CREDENTIAL_ENV, self.users["admin"]))}
        for who in ("train", "eval"):
            env[f"CLIPFLOW_{who.upper()}_USERNAME"], env[f"CLIPFLOW_{who.upper()}_PASSWORD"] = self.users[who]
        return subprocess.run([sys.executable, str(USERS_SCRIPT)], env=env, capture_output=True, text=True,
                              timeout=120)

    def login(self, monkeypatch: pytest.MonkeyPatch, who: str) -> None:
        """Credentials in the environment, where MLflow's client reads them (as the pods' secretKeyRef env)."""
        for name, value in zip(CREDENTIAL_ENV, self.users[who]):
            monkeypatch.setenv(name, value)

    def stop(self) -> None:
        stop_process_group(self.proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    server = AuthServer(tmp_path_factory.mktemp("mlflow-auth"))
    server.start()
    try:
        for attempt in range(2):  # the Job runs again after every apply: it must be idempotent
            done = server.create_users()
            assert done.returncode == 0, (attempt, done.stdout, done.stderr)
        assert "clipflow-train: role clipflow-train" in done.stdout
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def published(server: AuthServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A training run's metrics and a registered checkpoint, logged by clipflow's Tracker as clipflow-train."""
    home = tmp_path_factory.mktemp("auth-home")
    checkpoint = make_checkpoint(home / "checkpoint_00000004", train_tokenizer(), seed=0, step=4)
    name, experiment = unique_name("auth"), unique_name("auth-exp")
    cfg = load_config(None, [f"home={home}", f"mlflow.tracking_uri={server.uri}", "mlflow.system_metrics=false",
                             f"mlflow.experiment={experiment}", f"mlflow.registered_model={name}"])
    with pytest.MonkeyPatch.context() as monkeypatch:
        server.login(monkeypatch, "train")
        tracker = Tracker(cfg, run_key="auth-run")
        tracker.log_metrics({"loss": 2.5}, step=4)
        version = tracker.publish_checkpoint(str(checkpoint), step=4, samples_seen=32, final=True)
        tracker.close()
    yield {"name": name, "experiment": experiment, "version": version, "run_id": tracker.run_id,
           "checkpoint": checkpoint, "tracker": tracker, "home": home}


def admin_client(server: AuthServer, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    server.login(monkeypatch, "admin")
    return MlflowClient(server.uri)


def test_anonymous_and_wrong_credentials_are_refused(server: AuthServer) -> None:
    search = f"{server.uri}/api/2.0/mlflow/experiments/search"
    artifacts = f"{server.uri}/api/2.0/mlflow-artifacts/artifacts"
    assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
    assert requests.get(artifacts, timeout=30).status_code == 401  # the artifact proxy: checkpoints
    assert requests.get(search, params={"max_results": 1}, auth=(server.users["eval"][0], "wrong"),
                        timeout=30).status_code == 401
    assert requests.get(search, params={"max_results": 1}, auth=server.users["eval"], timeout=30).status_code == 200
    assert requests.get(f"{server.uri}/health", timeout=30).status_code == 200  # the kubelet's probes need no login


def test_training_with_refused_credentials_stops_before_any_worker(server: AuthServer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong or missing password never heals, unlike an outage: one line on the driver, not a run that
    buffers its metrics forever under an "unreachable" warning."""
    cfg = load_config(None, [f"home={tmp_path}", f"mlflow.tracking_uri={server.uri}"])
    monkeypatch.setenv(CREDENTIAL_ENV[0], server.users["train"][0])
    monkeypatch.setenv(CREDENTIAL_ENV[1], "wrong")
    with pytest.raises(UserError, match=r"refused the credentials \(HTTP 401\).*MLFLOW_TRACKING_PASSWORD"):
        TrainingTracking.for_config(cfg)
    server.login(monkeypatch, "train")
    assert TrainingTracking.for_config(cfg).cfg.mlflow.tracking_uri == server.uri


def test_train_identity_tracks_and_registers_with_credentials_from_the_environment(
        server: AuthServer, published: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = published["tracker"]
    assert published["version"] is not None and tracker.rejected == 0 and tracker.buffered == 0
    client = admin_client(server, monkeypatch)
    run = client.get_run(published["run_id"])
    assert run.data.metrics["loss"] == 2.5
    mv = client.get_model_version(published["name"], published["version"])
    assert mv.tags["eval_status"] == "pending" and mv.tags["step"] == "4"


def test_eval_identity_claims_records_and_promotes_but_cannot_rewrite_training(
        server: AuthServer, published: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server.login(monkeypatch, "eval")
    client = MlflowClient(server.uri)
    name, version = published["name"], published["version"]
    mv = client.get_model_version(name, version)
    loaded = load_checkpoint(registry.download_checkpoint(client, mv, tmp_path / "dl"))  # through the proxy
    assert loaded.load_training_state() is None and loaded.tokenizer.id == mv.tags["tokenizer_id"]  # weights only
    claim = registry.claim_version(client, name, version, "auth-test", lease_seconds=60)
    assert claim is not None
    experiment = get_or_create_experiment(client, f"{published['experiment']}-eval")
    eval_run = client.create_run(experiment, run_name="eval").info.run_id
    model_id = registry.logged_model_id(mv)
    client.log_batch(eval_run, metrics=[Metric("zeroshot/acc1", 0.5, int(time.time() * 1000), 0, model_id=model_id)])
    registry.finish_version(claim, "done", eval_run_id=eval_run)
    assert registry.evaluated_metric(client, client.get_model_version(name, version), "zeroshot/acc1") == 0.5
    assert registry.promote(client, name, version, "zeroshot/acc1", 0.5) == ["champion", "latest-evaluated"]
    assert client.get_model_version(name, version).tags["eval_status"] == "done"

    for forbidden in (lambda: client.log_metric(published["run_id"], "loss", 0.0),  # forge training metrics
                      lambda: client.delete_registered_model(name)):
        with pytest.raises(MlflowException) as refused:
            forbidden()
        assert refused.value.get_http_status_code() == 403
