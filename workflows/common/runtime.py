"""The Ray runtime every stage runs on: attach to a running cluster or start a local one.

Also the process-wide Ray Data settings clipflow's datasets are created with (``ray_data_context``), and
the one table of environment defaults clipflow sets for the libraries it drives (``set_env_defaults``).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

from workflows.common.errors import UserError
from workflows.common.log import get_logger

log = get_logger("ray")

# Environment defaults per role, each with why; ``set_env_defaults(role)`` applies them with setdefault, so a
# value the user set always wins. Roles: "train" (the training driver, before Ray starts the workers: Ray Train
# copies the driver's variables to them), "tracking" (a process that reports a training run to MLflow:
# rank 0, the driver ending a run, `clipflow sync`), "eval" (`clipflow eval`).
ENV_DEFAULTS: dict[str, dict[str, str]] = {
    "train": {
        # Ray 2.60's Train workers show every print() twice: its print patch logs the line AND tees it to
        # stdout, which Ray's workers always wrap. Unpatched, a print reaches the driver once.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    },
    "tracking": {
        # Fail fast on an outage: what the server does not take stays in the buffer and the spool, so a
        # retry inside one request (MLflow's default: 7, with backoff, minutes) only delays the warning.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
        # MLflow prints the run's URL, tracking URI included, each time a run ends: credentials in the URI
        # would land in the job log. clipflow's summaries name the run instead.
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    },
    "eval": {
        # A down server fails the eval job in seconds, not minutes (it has nothing to buffer).
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    },
}


_OWN_DEFAULTS: dict[str, str] = {}  # what set_env_defaults put in this process's environment


def set_env_defaults(role: str) -> None:
    """Apply ``ENV_DEFAULTS[role]`` to this process's environment. A value the user set is kept; one that an
    earlier role set here is replaced (the demo trains, then evaluates, in one process)."""
    for name, value in ENV_DEFAULTS[role].items():
        if name not in os.environ or _OWN_DEFAULTS.get(name) == os.environ[name]:
            os.environ[name] = _OWN_DEFAULTS[name] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray() -> None:
    """Attach to a running cluster, else start a private local runtime.

    The cluster is the one in ``$RAY_ADDRESS``, else the head that ``ray start --head`` recorded on this
    machine (what ``ray.init(address="auto")`` finds), so a stage run beside a ``ray start`` cluster
    uses it rather than starting a second runtime. A cluster with token auth needs ``$RAY_AUTH_TOKEN``
    or ``$RAY_AUTH_TOKEN_PATH`` (``ray start`` writes ``~/.ray/auth_token``, which Ray reads itself).

    A local runtime gets at least 4 logical CPUs: on a 2-core machine two Train workers plus Ray
    Data's map tasks otherwise deadlock waiting for CPU slots. It runs the dashboard (on a free
    loopback port; ``ray.init`` logs its URL): Ray Train's placement-group cleaner asks the state
    API behind it whether the run's controller is alive, and without it warns every few seconds.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or _local_head()
    if not address:
        log.info("no running Ray cluster found; starting a local Ray runtime")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), **local_dashboard())
        return
    log.info("attaching to the Ray cluster at %s", address)
    try:
        # "auto" resolves $RAY_ADDRESS or the recorded head, and (unlike an explicit address) makes Ray
        # send the auth token it finds.
        ray.init(address="auto")
    except ConnectionError as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address} ({exc}); if it uses token auth set "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its token, else check that it is up "
                        "(`ray status`) or unset RAY_ADDRESS to run on a local runtime") from None


def _local_head() -> str | None:
    """The GCS address of the head ``ray start`` last recorded on this machine, if it still answers."""
    from ray._private.utils import read_ray_address  # where `ray start` records it (ray_current_cluster)

    address = read_ray_address()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        log.warning("the Ray head recorded at %s does not answer (stopped?); starting a local runtime", address)
        return None
    return address


def local_dashboard() -> dict[str, object]:
    """``ray.init`` options for a local runtime's dashboard (see ``ensure_ray``)."""
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port()}


@contextmanager
def ray_data_context(preserve_order: bool) -> Iterator[None]:
    """Datasets created inside get clipflow's settings: no Ray Data progress bars (clipflow reports its
    own progress, and one dataset per rank and epoch would drown the log), ordered output where the
    result depends on it. A dataset keeps a copy of the context it was created in, so the process-wide
    settings are restored on exit."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = preserve_order, False
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
