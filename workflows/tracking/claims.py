"""Leases on a registered model's versions, built from the registry's one atomic primitive.

The registry has no compare-and-swap, but it has one atomic, ordered primitive: ``create_model_version``
gives each new version of a registered model the number max+1, and (name, version) is the primary key,
so two concurrent creations never get the same number (the loser's insert fails and retries with the
next one). A number k is only handed out once k-1 is committed, hence *when my claim k is visible,
every claim numbered below k is visible too*. A claim is therefore a new version of the lock model
``<name>-eval-claims`` (source ``models:/<name>/<v>``) tagged ``target_version``, ``claimant``,
``lease_expiry``. After creating it, the claimant lists the claims on the same target and ignores those
that are expired or marked ``outcome=lost|released|skipped``; the lowest remaining number wins. Every
participant computes the same winner: a later claimant sees the winner's claim (lower number, already
visible), and the winner cannot be overtaken by a claim created after its own. Losers mark their claim
``lost`` and move on. A claimant that dies stops renewing its lease; once ``lease_expiry`` has passed its
claim is ignored and the next claimant wins (leases assume clocks agree to well within the lease). So a
lease is renewed on a timer while the work runs (``kept_alive``), and never once it has run out:
renewing an expired claim would revive it over a job that has claimed the target since.
The lock model doubles as an audit log of who evaluated what, visible in the MLflow UI.

It stays a registered model, named after the one it serves and tagged ``clipflow.internal=true``,
``clipflow.purpose=eval-claims`` and ``clipflow.claims_for=<name>``, with a description that says so. MLflow
3.17 offers no other home with this guarantee: its tags have no compare-and-swap (last writer wins), and the
only registered models its Models list hides are prompts (``mlflow.prompt.is_prompt``), which would file
the claims under Prompts and let the prompt APIs treat them as prompts.

What a claim protects is the caller's business: ``workflows.tracking.registry`` claims versions for
eval and takes the ``promote`` target around alias moves.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from workflows.common.log import get_logger

CLAIMS_SUFFIX = "-eval-claims"
log = get_logger(__name__)


def lock_model_tags(name: str) -> dict[str, str]:
    """What marks ``name``'s lock model as clipflow's internal claims record (see the module docstring)."""
    return {"clipflow.internal": "true", "clipflow.purpose": "eval-claims", "clipflow.claims_for": name}


class LeaseLost(Exception):
    """The lease ran out before it was renewed: another job may hold the target now."""


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def lease_until(seconds: float) -> str:
    return (now_utc() + datetime.timedelta(seconds=seconds)).isoformat(timespec="seconds")


def lease_expired(value: str | None) -> bool:
    """Unparseable or absent leases count as expired: nobody can be holding them."""
    try:
        return datetime.datetime.fromisoformat(value or "") <= now_utc()
    except ValueError:
        return True


def claimant_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def ensure_registered_model(client: MlflowClient, name: str, description: str = "",
                            tags: dict[str, str] | None = None) -> None:
    """Create the registered model unless it exists (``tags`` and ``description`` are set at creation only)."""
    try:
        client.create_registered_model(name, tags=tags, description=description or None)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


@dataclass
class Claim:
    """A won claim: ``number`` is the claim's version in the lock model."""

    client: MlflowClient
    name: str
    target: str
    number: str
    claimant: str
    lease_seconds: float
    expiry: str  # of the lease as last written

    @property
    def lock_model(self) -> str:
        return self.name + CLAIMS_SUFFIX

    def renew(self) -> str:
        """Extend the lease; ``LeaseLost`` once it has run out (see the module docstring)."""
        if lease_expired(self.expiry):
            raise LeaseLost(f"the lease of {self.claimant} on {self.name} {self.target} ran out at {self.expiry}")
        expiry = lease_until(self.lease_seconds)
        self.client.set_model_version_tag(self.lock_model, self.number, "lease_expiry", expiry)
        self.expiry = expiry
        return expiry

    def held(self) -> bool:
        """Still the lowest live claim on the target (false if it expired and someone reclaimed)."""
        return _winner(self.client, self.lock_model, self.target) == self.number

    def release(self, outcome: str = "released") -> None:
        """End the claim; ``outcome`` says how (``released`` after work, ``skipped`` when there was none)."""
        self.client.set_model_version_tag(self.lock_model, self.number, "outcome", outcome)


def _winner(client: MlflowClient, lock_model: str, target: str) -> str | None:
    """The lowest-numbered live claim on ``target`` (None when there is none)."""
    live = [int(mv.version)
            for mv in client.search_model_versions(f"name='{lock_model}' and tags.target_version='{target}'")
            if mv.tags.get("outcome") not in ("lost", "released", "skipped")
            and not lease_expired(mv.tags.get("lease_expiry"))]
    return str(min(live)) if live else None


def try_claim(client: MlflowClient, name: str, target: str, source_version: str, claimant: str,
              lease_seconds: float) -> Claim | None:
    """Create a claim on ``target`` and return it if it is the lowest live one, else mark it lost."""
    lock_model = name + CLAIMS_SUFFIX
    ensure_registered_model(client, lock_model, f"Internal to clipflow, not a model: the claim records of "
                                                f"`clipflow eval` jobs on {name!r} versions (one version per "
                                                f"attempt; see workflows/tracking/claims.py). Do not serve or "
                                                f"delete it while eval jobs run.", tags=lock_model_tags(name))
    expiry = lease_until(lease_seconds)
    mv = client.create_model_version(
        lock_model, source=f"models:/{name}/{source_version}",
        tags={"target_version": target, "claimant": claimant, "lease_expiry": expiry},
        description=f"claim on {target} by {claimant}", await_creation_for=0)
    if _winner(client, lock_model, target) != mv.version:
        client.set_model_version_tag(lock_model, mv.version, "outcome", "lost")
        return None
    client.set_model_version_tag(lock_model, mv.version, "outcome", "won")
    return Claim(client, name, target, mv.version, claimant, lease_seconds, expiry)


@contextmanager
def kept_alive(renew: Callable[[], object], every: float) -> Iterator[threading.Event]:
    """Call ``renew`` every ``every`` seconds while the block runs; the event is set (and renewing stops)
    when the lease was lost. A failed call (the server unreachable) is retried at the next tick."""
    lost, stop = threading.Event(), threading.Event()

    def keep() -> None:
        while not stop.wait(every):
            try:
                renew()
            except LeaseLost as exc:
                log.warning("%s; the result will not be recorded", exc)
                lost.set()
                return
            except (MlflowException, OSError) as exc:
                log.warning("could not renew the lease (%s); trying again in %.0f s", exc, every)

    thread = threading.Thread(target=keep, name="clipflow-lease", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
