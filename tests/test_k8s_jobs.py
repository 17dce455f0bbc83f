"""`clipflow k8s run` / `clipflow k8s status` against a fake Kubernetes API server.

No cluster runs here, so a small HTTP server on loopback plays the API server for the RayJob paths the
`kubernetes` client calls (GET, LIST, merge PATCH), seeded with the committed
k8s/overlays/paper-vit-b32/rayjob-*.yaml as `kubectl apply -k k8s/` creates them (suspended). A resumed
RayJob moves one status step per GET, the way the KubeRay operator would over minutes. The client reaches
it through a generated kubeconfig with a bearer token, exactly as it reaches a real cluster.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from workflows.ops.cli import main
from workflows.ops.k8s_checks import load_documents

PROJECT_ROOT = Path(__file__).resolve().parent.parent
K8S = PROJECT_ROOT / "k8s"
CONFIG = str(PROJECT_ROOT / "configs" / "vit_b32_laion400m.yaml")
STAGES = ("preprocess", "train", "eval")
TOKEN = "fake-token-5f0c1d"  # must never appear in any output
NAMESPACE = "clipflow"
FAST = ["--poll", "0.01"]

# (jobDeploymentStatus, jobStatus) a resumed RayJob goes through, one step per GET.
SUCCEEDS = [("Initializing", ""), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
FAILS = [("Initializing", ""), ("Running", "RUNNING"), ("Failed", "FAILED")]
# backoffLimit: the first attempt's FAILED is retried (Retrying), so it is not the RayJob's end.
RETRIES_THEN_SUCCEEDS = [("Initializing", ""), ("Running", "RUNNING"), ("Retrying", "FAILED"),
                         ("Initializing", ""), ("Running", "RUNNING"), ("Complete", "SUCCEEDED")]
STUCK = [("Initializing", "")]
RAYJOBS = re.compile(r"/apis/ray\.io/v1/namespaces/(?P<ns>[^/?]+)/rayjobs(?:/(?P<name>[^/?]+))?(?:\?.*)?")


@dataclass
class Seen:
    """One request as the fake API server received it."""

    method: str
    name: str | None
    authorization: str | None
    content_type: str | None
    body: Any
    deployment: str | None = None  # the status the answer carried

    @property
    def verb(self) -> str:
        """The RBAC verb Kubernetes checks for this request."""
        return {"PATCH": "patch"}.get(self.method, "get" if self.name else "list")


class FakeKube(ThreadingHTTPServer):
    """RayJobs in memory behind the paths the client uses; records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.scripts: dict[str, list[tuple[str, str]]] = {}
        self.seen: list[Seen] = []
        self.deny: int | None = None  # answer every request with this status (401, 403)
        self.serves_rayjobs = True  # False: the KubeRay CRDs are not installed
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, stage: str, script: list[tuple[str, str]] = SUCCEEDS, suspended: bool = True,
            **status: str) -> str:
        """The committed RayJob of ``stage`` as `kubectl apply -k k8s/` creates it; returns its name."""
        (doc,) = load_documents(K8S / "overlays" / "paper-vit-b32" / f"rayjob-{stage}.yaml")
        doc = copy.deepcopy(doc)
        doc["spec"]["suspend"] = suspended
        doc["status"] = status or {"jobDeploymentStatus": "Suspended"}
        name = doc["metadata"]["name"]
        self.jobs[name] = doc
        self.scripts[name] = list(script)
        return name

    def patches(self) -> list[str]:
        return [s.name for s in self.seen if s.method == "PATCH"]

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        with self.lock:
            match = RAYJOBS.fullmatch(path)
            name = match["name"] if match else None
            seen = Seen(method, name, headers.get("Authorization"), headers.get("Content-Type"),
                        json.loads(body) if body else None)
            self.seen.append(seen)
            if self.deny or seen.authorization != f"Bearer {TOKEN}":
                code = self.deny or 401
                return code, _status(code, "Forbidden" if code == 403 else "Unauthorized", "denied")
            if not (match and self.serves_rayjobs):
                return 404, "404 page not found"
            if name is None:
                items = [j for j in self.jobs.values() if j["metadata"]["namespace"] == match["ns"]]
                return 200, {"apiVersion": "ray.io/v1", "kind": "RayJobList", "metadata": {}, "items": items}
            job = self.jobs.get(name)
            if job is None or job["metadata"]["namespace"] != match["ns"]:
                return 404, _status(404, "NotFound", f'rayjobs.ray.io "{name}" not found',
                                    {"name": name, "group": "ray.io", "kind": "rayjobs"})
            if method == "PATCH":
                if seen.content_type != "application/merge-patch+json":
                    return 415, _status(415, "UnsupportedMediaType", seen.content_type or "")
                _merge(job, seen.body)
            else:
                self._advance(name, job)
            seen.deployment = job["status"].get("jobDeploymentStatus")
            return 200, job

    def _advance(self, name: str, job: dict[str, Any]) -> None:
        """One operator step for a resumed RayJob: the next scripted status, with start and end times."""
        script = self.scripts[name]
        if job["spec"].get("suspend") or job["status"].get("jobDeploymentStatus") in ("Complete", "Failed"):
            return
        deployment, job_status = script.pop(0) if len(script) > 1 else script[0]
        status = job["status"]
        status.update(jobDeploymentStatus=deployment, jobStatus=job_status)
        status.setdefault("startTime", "2026-08-20T10:00:00Z")
        if deployment in ("Complete", "Failed"):
            status["endTime"] = "2026-08-20T11:02:03Z"
        if deployment == "Failed":
            status.update(reason="AppFailed", message="Job entrypoint command failed with exit code 1\nmore")


def _status(code: int, reason: str, message: str, details: dict[str, str] | None = None) -> dict[str, Any]:
    """A metav1.Status, the body the API server sends with an error."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class _Handler(BaseHTTPRequestHandler):
    server: FakeKube

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._reply("GET")

    def do_PATCH(self) -> None:
        self._reply("PATCH")

    def _reply(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code, payload = self.server.answer(method, self.path, self.headers, body)
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKube]:
    """A running fake API server, and $KUBECONFIG pointing at it (current context)."""
    server = FakeKube()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    write_kubeconfig(tmp_path / "kubeconfig", {"fake": server.url}, current="fake", monkeypatch=monkeypatch)
    yield server
    server.shutdown()
    server.server_close()


def write_kubeconfig(path: Path, servers: dict[str, str], current: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig with one context per server, all with the bearer token; sets $KUBECONFIG to it."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": n, "cluster": {"server": url}} for n, url in servers.items()],
        "users": [{"name": "deployer", "user": {"token": TOKEN}}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": "deployer", "namespace": NAMESPACE}}
                     for n in servers],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr, asserted to be exactly one line that leaks no credential."""
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1, err
    assert TOKEN not in out.out + out.err
    return err


# --- clipflow k8s run -------------------------------------------------------------------------------

def test_run_resumes_each_stage_after_the_previous_succeeded(kube: FakeKube, capsys) -> None:
    names = [kube.add(stage) for stage in STAGES]
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 0
    assert kube.patches() == names
    for before, after in itertools.pairwise(names):  # a stage is resumed only once the previous one completed
        completed = next(i for i, s in enumerate(kube.seen) if s.name == before and s.deployment == "Complete")
        resumed = next(i for i, s in enumerate(kube.seen) if s.name == after and s.method == "PATCH")
        assert completed < resumed
    assert all(s.authorization == f"Bearer {TOKEN}" for s in kube.seen)
    for patch in (s for s in kube.seen if s.method == "PATCH"):
        assert patch.content_type == "application/merge-patch+json"
        assert patch.body == {"spec": {"suspend": False}}
    assert all(job["spec"]["suspend"] is False for job in kube.jobs.values())
    out = capsys.readouterr().out
    assert TOKEN not in out
    for name in names:
        steps = [f"{name}: resumed", f"{name}: Initializing (job -)", f"{name}: Running (job RUNNING)",
                 f"{name}: Complete (job SUCCEEDED)"]
        positions = [out.index(step) for step in steps]
        assert positions == sorted(positions), out
    summary = out[out.index("summary"):].splitlines()[1:]
    assert summary[0].split() == ["STAGE", "RAYJOB", "STATUS", "DURATION"]
    assert [row.split()[:4] for row in summary[1:]] == [
        [stage, name, "SUCCEEDED", "1h"] for stage, name in zip(STAGES, names)]
    assert summary[1].split()[3:6] == ["1h", "02m", "03s"]


def test_run_skips_a_stage_that_already_succeeded(kube: FakeKube, capsys) -> None:
    done = kube.add("preprocess", suspended=False, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                    startTime="2026-08-19T08:00:00Z", endTime="2026-08-19T08:12:05Z")
    train, ev = kube.add("train"), kube.add("eval")
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 0
    assert kube.patches() == [train, ev]
    out = capsys.readouterr().out
    assert f"{done}: already SUCCEEDED, skipping" in out
    row = next(line for line in out.splitlines() if line.startswith("preprocess "))
    assert row.split() == ["preprocess", done, "SUCCEEDED", "12m", "05s", "(earlier", "run)"]


def test_run_stops_at_a_failed_job_and_resumes_nothing_after_it(kube: FakeKube, capsys) -> None:
    pre, train, ev = kube.add("preprocess"), kube.add("train", script=FAILS), kube.add("eval")
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 1
    assert kube.patches() == [pre, train]
    assert kube.jobs[ev]["spec"]["suspend"] is True
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1
    assert f"RayJob {NAMESPACE}/{train} FAILED (AppFailed: Job entrypoint command failed" in err
    assert f"kubectl -n {NAMESPACE} logs job/{train}" in err
    rows = {line.split()[0]: line.split()[1:3] for line in out.out.splitlines()[-3:]}
    assert rows == {"preprocess": [pre, "SUCCEEDED"], "train": [train, "FAILED"], "eval": [ev, "not"]}


def test_a_retried_attempt_is_not_the_end_of_the_job(kube: FakeKube, capsys) -> None:
    kube.add("preprocess", script=RETRIES_THEN_SUCCEEDS)
    assert main(["k8s", "run", "--config", CONFIG, "--stages", "preprocess", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Retrying (job FAILED)" in out and "Complete (job SUCCEEDED)" in out


def test_a_job_that_failed_in_an_earlier_run_is_reported_not_resumed(kube: FakeKube, capsys) -> None:
    pre = kube.add("preprocess", suspended=False, jobDeploymentStatus="Failed", jobStatus="FAILED",
                   reason="AppFailed")
    kube.add("train")
    kube.add("eval")
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 1
    assert kube.patches() == []
    err = capsys.readouterr().err
    assert "already FAILED in an earlier run (AppFailed)" in err and f"delete rayjob {pre}" in err


def test_stages_run_in_pipeline_order_whatever_order_they_are_given(kube: FakeKube) -> None:
    pre, train, ev = (kube.add(stage) for stage in STAGES)
    assert main(["k8s", "run", "--config", CONFIG, "--stages", "eval,preprocess", *FAST]) == 0
    assert kube.patches() == [pre, ev]
    assert kube.jobs[train]["spec"]["suspend"] is True
    with pytest.raises(SystemExit) as exit_info:
        main(["k8s", "run", "--config", CONFIG, "--stages", "train,deploy"])
    assert exit_info.value.code == 2


def test_timeout_stops_following_and_leaves_the_job_running(kube: FakeKube, capsys) -> None:
    pre, train = kube.add("preprocess", script=STUCK), kube.add("train")
    kube.add("eval")
    assert main(["k8s", "run", "--config", CONFIG, "--timeout", "0.3", *FAST]) == 1
    assert kube.patches() == [pre]
    assert kube.jobs[train]["spec"]["suspend"] is True
    err = one_line_error(capsys)
    assert f"stopped waiting; RayJob {NAMESPACE}/{pre} is still Initializing" in err


def test_missing_rayjob_is_one_line_and_nothing_is_resumed(kube: FakeKube, capsys) -> None:
    kube.add("preprocess")
    kube.add("train")
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 2
    assert kube.patches() == []  # checked before the first stage is resumed
    err = one_line_error(capsys)
    assert "RayJob clipflow/vit-b32-laion400m-eval not found" in err and "kubectl apply -k k8s/" in err


def test_unreachable_api_server_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    write_kubeconfig(tmp_path / "kubeconfig", {"dead": f"http://127.0.0.1:{closed_port()}"}, "dead", monkeypatch)
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 2
    err = one_line_error(capsys)
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:" in err and "Connection refused" in err


@pytest.mark.parametrize("code, expected", [(401, "rejected the credentials (401 Unauthorized)"),
                                            (403, "(403 Forbidden): use credentials bound to the clipflow-deployer")])
def test_rejected_credentials_are_one_line(kube: FakeKube, capsys, code: int, expected: str) -> None:
    for stage in STAGES:
        kube.add(stage)
    kube.deny = code
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 2
    assert expected in one_line_error(capsys)
    assert kube.seen[0].authorization == f"Bearer {TOKEN}"


# --- kubeconfig ---------------------------------------------------------------------------------------

def test_context_flag_picks_the_kubeconfig_context(kube: FakeKube, tmp_path: Path, monkeypatch, capsys) -> None:
    kube.add("train")
    servers = {"fake": kube.url, "dead": f"http://127.0.0.1:{closed_port()}"}
    write_kubeconfig(tmp_path / "two-contexts", servers, current="dead", monkeypatch=monkeypatch)
    assert main(["k8s", "status", "--config", CONFIG]) == 2
    assert "cannot reach" in one_line_error(capsys)
    assert main(["k8s", "status", "--config", CONFIG, "--context", "fake"]) == 0
    assert "vit-b32-laion400m-train" in capsys.readouterr().out


def test_missing_or_broken_kubeconfig_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["k8s", "status", "--config", CONFIG]) == 2
    assert f"no kubeconfig at {tmp_path / 'absent'}" in one_line_error(capsys)
    write_kubeconfig(tmp_path / "kubeconfig", {"fake": "http://127.0.0.1:1"}, current="fake", monkeypatch=monkeypatch)
    assert main(["k8s", "status", "--config", CONFIG, "--context", "nope"]) == 2
    assert "cannot use context 'nope' of the kubeconfig" in one_line_error(capsys)


@pytest.mark.skipif(Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists(),
                    reason="runs inside a pod with a ServiceAccount token")
def test_in_cluster_without_a_token_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert main(["k8s", "status", "--config", CONFIG]) == 2
    assert "cannot use the pod's ServiceAccount (Service token file does not exist.)" in one_line_error(capsys)


# --- clipflow k8s status ------------------------------------------------------------------------------

def test_status_prints_every_stage(kube: FakeKube, capsys) -> None:
    pre = kube.add("preprocess", suspended=False, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED",
                   startTime="2026-08-19T08:00:00Z", endTime="2026-08-19T08:12:05Z")
    train = kube.add("train", suspended=False, jobDeploymentStatus="Running", jobStatus="RUNNING",
                     startTime="2026-08-19T08:13:00Z")
    assert main(["k8s", "status", "--config", CONFIG]) == 0
    assert [(s.method, s.name) for s in kube.seen] == [("GET", None)]  # one LIST
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"RayJobs in namespace {NAMESPACE} at {kube.url}"
    assert lines[1].split() == ["STAGE", "RAYJOB", "SUSPENDED", "DEPLOYMENT", "JOB", "START", "END"]
    assert [line.split() for line in lines[2:]] == [
        ["preprocess", pre, "no", "Complete", "SUCCEEDED", "2026-08-19T08:00:00Z", "2026-08-19T08:12:05Z"],
        ["train", train, "no", "Running", "RUNNING", "2026-08-19T08:13:00Z", "-"],
        ["eval", "vit-b32-laion400m-eval", "not", "applied"],
    ]


def test_status_without_the_kuberay_crds_says_to_install_the_operator(kube: FakeKube, capsys) -> None:
    kube.serves_rayjobs = False
    assert main(["k8s", "status", "--config", CONFIG]) == 2
    assert "serves no ray.io/v1 RayJobs: install the KubeRay operator" in one_line_error(capsys)


# --- what the commands need from the cluster and the CLI ---------------------------------------------

def test_deployer_role_grants_every_verb_the_commands_use(kube: FakeKube) -> None:
    for stage in STAGES:
        kube.add(stage)
    assert main(["k8s", "run", "--config", CONFIG, *FAST]) == 0
    assert main(["k8s", "status", "--config", CONFIG]) == 0
    used = {s.verb for s in kube.seen}
    assert used == {"get", "list", "patch"}
    role = next(d for d in load_documents(K8S / "base" / "rbac.yaml") if d["kind"] == "Role"
                and d["metadata"]["name"] == "clipflow-deployer")
    granted = {verb for rule in role["rules"] if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]
               for verb in rule["verbs"]}
    assert used <= granted


def test_k8s_commands_do_not_import_the_kubernetes_client_to_parse() -> None:
    """`clipflow k8s render` and `--help` stay fast: only talking to the API imports the client."""
    code = ("import sys; from workflows.ops.cli import build_parser; "
            "build_parser('k8s').parse_args(['k8s', 'status', '--config', 'c.yaml']); "
            "assert 'kubernetes' not in sys.modules, 'kubernetes imported'; "
            "build_parser('k8s').parse_args(['k8s', 'run', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         check=False)
    assert out.returncode == 0, out.stderr
    for flag in ("--stages", "--timeout", "--poll", "--context", "--config"):
        assert flag in out.stdout
