"""`clipflow sync`: deliver what a training run left in its MLflow spool, once its server takes it."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, replace

from workflows.common import storage
from workflows.common.config import Config, load_config
from workflows.common.errors import UserError
from workflows.common.runtime import set_env_defaults
from workflows.tracking.delivery import Delivery
from workflows.tracking.spool import Spool

log = logging.getLogger("clipflow.tracking")


@dataclass
class SyncResult:
    spool: str
    run_id: str = ""
    metric_points: int = 0
    versions: dict[int, str] = dataclasses.field(default_factory=dict)  # step -> registered version
    status: str = ""  # the end status delivered ("" when the spool recorded none)


def sync(path: str, cfg: Config) -> SyncResult:
    """Deliver the spool at ``path`` (a run directory or its spool) to the run's tracking server (see
    ``_sync_uri``). UserError when nothing can be delivered now; what is left stays in the spool."""
    set_env_defaults("tracking")
    spool = Spool.find(path, cfg.storage.s3_endpoint)
    contents = spool.read()
    if contents is None:
        return SyncResult(spool.directory)
    with tempfile.TemporaryDirectory(prefix="clipflow-sync-") as tmp:
        run_cfg = load_config(storage.local_copy(spool.config_uri, tmp, spool.endpoint), resolve_paths=False)
    uri = _sync_uri(cfg, contents.tracking_uri)
    run_cfg = replace(run_cfg, mlflow=replace(run_cfg.mlflow, tracking_uri=uri), storage=replace(
        run_cfg.storage, s3_endpoint=cfg.storage.s3_endpoint or run_cfg.storage.s3_endpoint))
    delivery = Delivery(run_cfg, contents.run_key, contents.tags, resume=False, create=True)
    delivery.spool = spool  # where it was found (the run directory may have moved since)
    delivery.recorded_uri = contents.tracking_uri  # a sync elsewhere that fails does not move the run
    delivery.restore(contents, with_end=True)
    delivery.publisher.seal()
    points = delivery.buffered
    log.info("MLflow: delivering the spool %s to %s", spool.directory, delivery.calls.uri)
    if not delivery.deliver():
        delivery.save(last=True)
        raise UserError(delivery.pending_line(f"the server at {delivery.calls.uri} is unreachable or failing")
                        + " again once it is up (or pass --set mlflow.tracking_uri=URL)")
    delivery.save(last=True)
    return SyncResult(spool.directory, delivery.run_id, points,
                      {p.step: delivery.publisher.published[p.checkpoint_uri] for p in contents.publications
                       if p.checkpoint_uri in delivery.publisher.published}, delivery.end)


def _sync_uri(cfg: Config, spooled: str) -> str:
    """Where the spooled run lives: ``--set mlflow.tracking_uri`` if given (the server moved), else the URI the
    run used. The spool keeps it without credentials: then ``$MLFLOW_TRACKING_URI`` (the same server with
    them) if set, else the bare URI, and MLflow's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` supply them."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if "***@" not in spooled:
        return spooled
    return os.environ.get("MLFLOW_TRACKING_URI") or spooled.replace("***@", "")
