"""The Ray runtime every stage runs on: attach to a running cluster or start a local one.

Also the process-wide Ray Data settings clipflow's datasets are created with (``ray_data_context``).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator

from workflows.common.errors import UserError
from workflows.common.log import get_logger

log = get_logger("ray")


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
