"""One logging setup for every command, and progress that suits where the output goes.

Stage messages go through ``logging.getLogger("clipflow.<stage>")``; the CLI calls ``setup_logging``
once (``--log-level``, else ``$CLIPFLOW_LOG_LEVEL``, else INFO). Only clipflow's own loggers are
configured: Ray and MLflow keep their own handlers. Ray Train workers are separate processes, so the
training loop calls ``setup_logging`` again with the driver's level.

``Progress`` draws a tqdm bar on a terminal and, anywhere else (Kubernetes and Ray job logs, CI, a
file), logs one line at most every ``interval`` seconds: carriage-return bars make unreadable logs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import TracebackType
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error")
ENV_LEVEL = "CLIPFLOW_LOG_LEVEL"
ROOT = "clipflow"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_level() -> str:
    """``$CLIPFLOW_LOG_LEVEL`` when it names a level, else info."""
    level = os.environ.get(ENV_LEVEL, "").strip().lower()
    return level if level in LEVELS else "info"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test runners and tools swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """StreamHandler assigns it; the current stderr is always used instead."""


def setup_logging(level: str | None = None, *, worker: bool = False) -> None:
    """Send clipflow's loggers to stderr at ``level``; idempotent. In a Ray worker (``worker=True``) the
    records stop there: Ray's own root handler would print each line a second time.

    Off a terminal, MLflow's artifact-download bars are turned off too (unless set): carriage-return
    bars are what makes Kubernetes and Ray job logs unreadable."""
    logger = logging.getLogger(ROOT)
    logger.setLevel((level or default_level()).upper())
    logger.propagate = not worker
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    if not is_terminal():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def current_level() -> str:
    """The level clipflow's loggers run at in this process (for worker processes to match it)."""
    return logging.getLevelName(logging.getLogger(ROOT).getEffectiveLevel()).lower()


def get_logger(name: str) -> logging.Logger:
    """``clipflow.<name>``: under the one configured root."""
    return logging.getLogger(f"{ROOT}.{name}")


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """``with Progress(total, "preprocess: decode", "sources") as bar: bar.update(1, samples=n)``.

    A tqdm bar on a terminal; otherwise a log line ``desc: done/total unit (pct), rate/s, key=value``
    at most every ``interval`` seconds, and one at the end.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "items", interval: float = 30.0,
                 logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0
        self.postfix: dict[str, object] = {}
        self._log = logger or get_logger("progress")
        self._bar = None
        self._emitted = -1  # ``done`` at the last log line
        self._start = self._last = time.monotonic()

    def __enter__(self) -> "Progress":
        if is_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=f" {self.unit}", mininterval=0.5)
        return self

    def update(self, n: int = 1, /, **postfix: object) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(n)
        elif time.monotonic() - self._last >= self.interval:
            self._emit()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.close()
        elif exc_type is None and self.done != self._emitted:
            self._emit()

    def _emit(self) -> None:
        self._last, self._emitted = time.monotonic(), self.done
        elapsed = max(self._last - self._start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        self._log.info("%s: %d%s %s%s, %.1f/s%s", self.desc, self.done, of, self.unit, pct,
                       self.done / elapsed, extra)
