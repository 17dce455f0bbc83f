"""Registry against a real ``mlflow server``: published versions (tags, a lean self-contained source, a pyfunc
logged in the training run's experiment), atomic claims with leases, and alias promotion on the logged
models' eval metrics."""

from __future__ import annotations

import threading
import time

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric

from clip_core import build_zero_shot_classifier, load_checkpoint, load_templates, save_checkpoint
from clip_core.checkpoint import MANIFEST, TRAINER_STATE_FILE, TRAINING_STATE_FILE
from clip_core.embed import embed_images, embed_texts, images_to_tensor
from workflows.common import storage
from workflows.common.errors import UserError
from workflows.tracking import claims, registry
from workflows.tracking.run import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

from mlflow_helpers import COLORS, jpeg, make_checkpoint, publish, train_tokenizer, training_run, unique_name


def with_training_state(checkpoint, tokenizer):
    """The checkpoint again, with the AdamW state a training checkpoint carries (after one real step)."""
    model = load_checkpoint(checkpoint).model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 32, 32), tokenizer(["a red square"]))[0].sum().backward()
    optimizer.step()
    return save_checkpoint(checkpoint, model, tokenizer, trainer_state={"step": 10, "samples_seen": 80},
                           training_state={"optimizer": optimizer.state_dict()})


def record_eval(client, name: str, version: str, metrics: dict[str, float]) -> str:
    """What a finished eval leaves: an eval run whose metrics are the version's logged model's too."""
    mv = client.get_model_version(name, version)
    run = client.create_run(client.get_run(mv.run_id).info.experiment_id).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run, metrics=[Metric(k, v, now, 0, model_id=registry.logged_model_id(mv))
                                   for k, v in metrics.items()])
    return run


@pytest.fixture(scope="module")
def env(mlflow_server, tmp_path_factory):
    mlflow.set_tracking_uri(mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    tokenizer = train_tokenizer()
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_00000010", tokenizer, seed=0, step=10)
    checkpoint = with_training_state(checkpoint, tokenizer)
    run_id = training_run(client)
    name = unique_name("reg")
    version = publish(client, name, run_id, checkpoint, step=10)
    return {"client": client, "name": name, "run_id": run_id, "checkpoint": checkpoint, "version": version,
            "tokenizer": tokenizer, "tmp": tmp_path_factory.mktemp("reg")}


def test_published_version_has_tags_and_loads_from_its_source_alone(env):
    client, name = env["client"], env["name"]
    mv = client.get_model_version(name, env["version"])
    assert mv.tags["eval_status"] == "pending"
    assert mv.tags["run_id"] == env["run_id"] and mv.run_id == env["run_id"]
    assert mv.tags["step"] == "10" and mv.tags["samples_seen"] == "80"
    assert mv.tags["checkpoint_uri"] == str(env["checkpoint"])
    assert mv.tags["tokenizer_id"] == env["tokenizer"].id
    assert mv.source.startswith("models:/m-")
    model_id = registry.logged_model_id(mv)
    assert model_id == mv.source.removeprefix("models:/")
    downloaded = registry.download_checkpoint(client, mv, env["tmp"] / "dl")
    loaded = load_checkpoint(downloaded)
    original = load_checkpoint(env["checkpoint"])
    for key, tensor in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    assert loaded.tokenizer.id == original.tokenizer.id
    # the version is the weights-only export: the optimizer and trainer state stayed in storage
    assert original.load_training_state() is not None
    assert loaded.load_training_state() is None and loaded.trainer_state == {}
    assert not {TRAINING_STATE_FILE, TRAINER_STATE_FILE} & {p.name for p in downloaded.iterdir()}
    assert (downloaded / MANIFEST).is_file()
    # the logged model belongs to the training run's experiment (its Models tab, the run's "Logged models"),
    # a model-training experiment, and carries the run's params
    run = client.get_run(env["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.experiment_id != "0" and experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{env['run_id']}'")
    assert model_id in {m.model_id for m in found}
    logged = client.get_logged_model(model_id)
    assert logged.experiment_id == run.info.experiment_id and logged.status == LoggedModelStatus.READY
    assert model_id in {o.model_id for o in run.outputs.model_outputs}
    # publishing the same (run, step) again is idempotent (a retry after a timeout)
    assert publish(client, name, env["run_id"], env["checkpoint"], step=10) == env["version"]


def test_publishing_from_s3_downloads_only_what_the_version_keeps(env, s3_server, tmp_path):
    """The AdamW state (two thirds of a training checkpoint) stays in storage: a checkpoint on S3 whose training
    state is damaged still publishes its intact weights, which it could not if publishing fetched that file."""
    client, name = env["client"], env["name"]
    bucket = s3_server.create_bucket("publish-lean")
    uri = f"s3://{bucket}/run/checkpoint_00000020"
    for file in sorted(p for p in env["checkpoint"].rglob("*") if p.is_file()):
        relative = file.relative_to(env["checkpoint"]).as_posix()
        data = b"damaged" if relative == TRAINING_STATE_FILE else file.read_bytes()
        storage.write_bytes(f"{uri}/{relative}", data, s3_server.endpoint)
    staged = registry.stage_weights(uri, s3_server.endpoint, tmp_path, wait_s=0)
    assert not (tmp_path / "staged" / TRAINING_STATE_FILE).exists()
    assert TRAINING_STATE_FILE not in {p.name for p in staged.iterdir()}
    mv = registry.publish_checkpoint(client, name=name, run_id=env["run_id"], checkpoint_uri=uri, step=20,
                                     samples_seen=160, templates=load_templates(), endpoint=s3_server.endpoint)
    assert mv.tags["checkpoint_uri"] == uri and mv.tags["step"] == "20"
    loaded = load_checkpoint(registry.download_checkpoint(client, mv, tmp_path / "dl"))
    original = load_checkpoint(env["checkpoint"])
    for key, tensor in original.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key


def test_pyfunc_serves_texts_and_images_with_candidate_labels(env):
    uri = f"models:/{env['name']}/{env['version']}"
    flavor = mlflow.models.get_model_info(uri).flavors["python_function"]
    # logged as code, not as a pickle: loading runs serving_model.py, with the templates from the config
    assert flavor["model_code_path"].endswith("serving_model.py") and "python_model" not in flavor
    assert flavor["config"]["templates"] == load_templates()
    model = mlflow.pyfunc.load_model(uri)
    reference = load_checkpoint(env["checkpoint"])
    texts = ["a red square", "green photo"]
    out = model.predict(pd.DataFrame({"text": texts}))
    expected = embed_texts(reference.model.eval(), reference.tokenizer, texts)
    assert torch.allclose(torch.tensor(out["text_embedding"].tolist()), expected, atol=1e-5)

    labels = list(COLORS)
    images = [jpeg(COLORS["red"]), jpeg(COLORS["blue"])]
    out = model.predict(pd.DataFrame({"image": images}), params={"candidate_labels": labels})
    probs = torch.tensor(out["probs"].tolist())
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)
    features = embed_images(reference.model, images_to_tensor(images, 32))
    classifier = build_zero_shot_classifier(reference.model, reference.tokenizer, labels, load_templates())
    expected = (reference.model.logit_scale.exp() * features @ classifier).softmax(dim=-1)
    assert torch.allclose(probs, expected, atol=1e-4)
    assert out["label"].tolist() == [labels[i] for i in expected.argmax(dim=1).tolist()]
    # base64 text (what `mlflow models serve` receives in JSON) gives the same answer as bytes
    import base64

    out64 = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]}),
                          params={"candidate_labels": labels})
    assert torch.allclose(torch.tensor(out64["probs"].tolist()), probs)


def test_concurrent_claims_have_exactly_one_winner(env):
    client, name, version = env["client"], env["name"], env["version"]
    attempts: list = []
    barrier = threading.Barrier(4)

    def attempt(i: int) -> None:
        barrier.wait()
        attempts.append(registry.claim_version(MlflowClient(client.tracking_uri), name, version, f"job-{i}", 60))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in attempts if c is not None]
    assert len(attempts) == 4 and len(winners) == 1
    mv = client.get_model_version(name, version)
    assert mv.tags["eval_status"] == "running" and mv.tags["eval_claimant"] == winners[0].claimant
    assert not registry.claimable(mv)
    # a finished version is not claimed again by --pending jobs, even once its claim is released
    eval_run = record_eval(client, name, version, {"zeroshot/acc1": 0.5})
    registry.finish_version(winners[0], registry.DONE, eval_run_id=eval_run)
    assert registry.claim_version(client, name, version, "late-job", 60) is None
    mv = client.get_model_version(name, version)
    assert registry.evaluated_metric(client, mv, "zeroshot/acc1") == 0.5
    assert not [key for key in mv.tags if key.startswith("eval.")]  # results are metrics, not tags
    # the claims record is a registered model marked as clipflow's own, not the user's
    lock = client.get_registered_model(name + claims.CLAIMS_SUFFIX)
    assert lock.tags == claims.lock_model_tags(name) and lock.description.startswith("Internal to clipflow")


def test_expired_lease_is_reclaimed(env):
    client, name = env["client"], env["name"]
    version = publish(client, name, env["run_id"], env["checkpoint"], step=20)
    dead = registry.claim_version(client, name, version, "dead-job", lease_seconds=60)
    assert dead is not None
    assert registry.claim_version(client, name, version, "early-job", 60) is None  # lease still live
    # The claimant dies: it stops renewing, and its lease runs out (written as time having passed,
    # so the test does not depend on how fast a loaded CI machine answers).
    past = claims.lease_until(-1)
    client.set_model_version_tag(dead.lock_model, dead.number, "lease_expiry", past)
    client.set_model_version_tag(name, version, registry.LEASE, past)
    assert registry.claimable(client.get_model_version(name, version))
    assert version in [mv.version for mv in registry.pending_versions(client, name)]
    alive = registry.claim_version(client, name, version, "new-job", 60)
    assert alive is not None and alive.held()
    assert not dead.held()
    assert client.get_model_version(name, version).tags["eval_claimant"] == "new-job"


def test_promotion_moves_latest_always_and_champion_only_on_improvement(env):
    client, name = env["client"], env["name"]
    v = [publish(client, name, env["run_id"], env["checkpoint"], step=s) for s in (30, 40, 50)]
    metric = "zeroshot/acc1"
    for version, value in zip(v, (0.5, 0.4, 0.9)):
        claim = registry.claim_version(client, name, version, "promoter", 60, force=True)
        registry.finish_version(claim, registry.DONE, eval_run_id=record_eval(client, name, version, {metric: value}))
        aliases = registry.promote(client, name, version, metric, value)
        assert registry.LATEST_ALIAS in aliases
        if version == v[1]:
            assert registry.CHAMPION_ALIAS not in aliases
            assert client.get_model_version_by_alias(name, "champion").version == v[0]
    assert client.get_model_version_by_alias(name, "champion").version == v[2]
    assert client.get_model_version_by_alias(name, "latest-evaluated").version == v[2]
    # a champion evaluated before results were metrics still counts by its eval.<metric> tag
    legacy = publish(client, name, env["run_id"], env["checkpoint"], step=60)
    client.set_model_version_tag(name, legacy, registry.LEGACY_RESULT_PREFIX + metric, "0.95")
    client.set_registered_model_alias(name, registry.CHAMPION_ALIAS, legacy)
    assert registry.promote(client, name, v[2], metric, 0.9) == [registry.LATEST_ALIAS]


def test_unknown_model_version_or_alias_is_a_clear_error(env):
    client = env["client"]
    with pytest.raises(UserError, match="does not exist"):
        registry.resolve_version(client, "no-such-model", version=1)
    with pytest.raises(UserError, match="has no alias 'nope'"):
        registry.resolve_version(client, env["name"], alias="nope")
    with pytest.raises(UserError, match="has no version 999"):
        registry.resolve_version(client, env["name"], version=999)


def test_a_lease_is_kept_alive_through_a_long_pass_and_never_revived(env):
    """A pass longer than the lease keeps its claim (renewed on a timer); a lease that ran out is not
    renewed back to life, so the job that claimed the version since keeps it and the first one records nothing."""
    import time

    client, name = env["client"], env["name"]
    version = publish(client, name, env["run_id"], env["checkpoint"], step=70)
    claim = registry.claim_version(client, name, version, "slow-job", lease_seconds=6)
    with claims.kept_alive(lambda: registry.renew_version(claim), every=1) as lost:
        time.sleep(8)  # longer than the lease
        assert registry.claim_version(client, name, version, "eager-job", 6) is None
    assert not lost.is_set() and claim.held()
    time.sleep(7)  # no renewals now: the lease runs out
    other = registry.claim_version(client, name, version, "next-job", 60)
    assert other is not None and not claim.held()
    with pytest.raises(claims.LeaseLost):
        registry.renew_version(claim)
    assert other.held() and client.get_model_version(name, version).tags["eval_claimant"] == "next-job"
    with claims.kept_alive(lambda: registry.renew_version(claim), every=0.2) as lost:
        assert lost.wait(30)  # the timer stops at the first refusal
