"""`clipflow`: one command per stage, each reading the same validated config.

Every command's handler (``workflows.ops.stages`` for the stages) exposes ``add_arguments(parser)``
and ``main(cfg, args) -> int``; this file only wires them to argparse, so ``clipflow --help`` stays one line per stage and stage code stays testable
without a subprocess. A module that only hands the config on to a cluster (submit, k8s) sets
``PATHS_ARE_REMOTE = True``: its relative paths mean the cluster's, so they are not resolved here.

Exit codes are ``workflows.common.errors.EXIT_*``; a ``UserError`` is printed as one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from workflows.common.config import load_config
from workflows.common.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR, UserError
from workflows.common.log import LEVELS, default_level, setup_logging

# command -> ("module" or "module:attribute" with add_arguments/main, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("workflows.ops.stages:SampleData", "generate the embedded sample data set (deterministic)"),
    "preprocess": ("workflows.ops.stages:Preprocess", "raw image-text shards -> training shards + manifest (Ray Data)"),
    "train": ("workflows.ops.stages:Train", "contrastive pretraining on the training shards (Ray Train)"),
    "eval": ("workflows.ops.stages:Eval", "zero-shot / retrieval eval of registered model versions"),
    "sync": ("workflows.ops.stages:Sync", "deliver what a training run left in its MLflow spool (server was down)"),
    "demo": ("workflows.ops.demo", "run every stage locally on the sample data and print a summary"),
    "submit": ("workflows.ops.submit", "submit a stage to a Ray cluster through the Job Submission API"),
    "k8s": ("workflows.ops.k8s_render", "Kubernetes helpers (`clipflow k8s render|run|status`)"),
}


def command_handler(target: str) -> Any:
    """The object (a module or a class) behind ``"module[:attribute]"``, imported only when chosen."""
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only the chosen one's module is imported (stages import Ray/MLflow)."""
    parser = argparse.ArgumentParser(
        prog="clipflow",
        description="CLIP pretraining as a workflow: preprocess -> train -> register -> eval.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", default=None, help="YAML run config (default: built-in defaults)")
        cmd.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one config value, e.g. --set train.lr=1e-3 (repeatable)",
        )
        cmd.add_argument("--log-level", choices=LEVELS, default=default_level(),
                         help="clipflow's log level (default: $CLIPFLOW_LOG_LEVEL, else info)")
        if name == command:
            handler = command_handler(module_name)
            handler.add_arguments(cmd)
            cmd.set_defaults(_module=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    setup_logging(args.log_level)
    try:
        overrides = list(args.overrides)
        if getattr(args, "home", None):  # `clipflow demo --home DIR` is `--set home=DIR`
            overrides.append(f"home={args.home}")
        remote = getattr(args._module, "PATHS_ARE_REMOTE", False)
        cfg = load_config(args.config, overrides, resolve_paths=not remote)
        return int(args._module.main(cfg, args) or EXIT_OK)
    except UserError as exc:
        print(f"clipflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"clipflow {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
