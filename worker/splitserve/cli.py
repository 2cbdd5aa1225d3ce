"""`splitserve`: one console script for every part (worker roles, router, local runner, operator).

Heavy imports (torch, kopf) happen inside each command, so `splitserve operator` never loads torch
and `--help` is instant. Every failure a user can cause ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from splitserve.contract.config import EngineConfig
from splitserve.contract.errors import one_line
from splitserve.contract.names import DEFAULT_DRAIN_SECONDS

# Flags that map 1:1 onto EngineConfig fields (flag --max-model-len -> field max_model_len).
ENGINE_FLAGS: dict[str, type] = {
    "revision": str,
    "served_model_name": str,
    "dtype": str,
    "device": str,
    "threads": int,
    "max_model_len": int,
    "prefill_chunk_size": int,
    "max_num_seqs": int,
    "kv_cache_bytes": int,
    "block_size": int,
    "kv_cache_dtype": str,
    "kv_timeout_seconds": float,
    "kv_host_bytes": int,
    "kv_host_ttl_seconds": float,
    "kv_disk_path": str,
    "kv_disk_bytes": int,
    "kv_disk_ttl_seconds": float,
}


class CliError(Exception):
    """A mistake the user can fix; printed as one line."""


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """--config FILE (the operator's engine.json) and/or flags; flags win."""
    overrides: dict[str, object] = {name: getattr(args, name) for name in ENGINE_FLAGS}
    overrides["model"] = args.model
    if getattr(args, "chunked_prefill", False):
        overrides["chunked_prefill"] = True
    if getattr(args, "no_prefix_caching", False):
        overrides["enable_prefix_caching"] = False
    if args.config:
        return EngineConfig.from_file(Path(args.config), **overrides)
    if not args.model:
        raise CliError("give --model or --config")
    return EngineConfig.model_validate({key: value for key, value in overrides.items() if value is not None})


def checked_engine_config(args: argparse.Namespace) -> EngineConfig:
    """`engine_config`, with a missing local model directory reported before anything starts."""
    from splitserve.engine.model_info import check_model_source

    config = engine_config(args)
    check_model_source(config.model)
    return config


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face model id or local directory")
    parser.add_argument(
        "--config", help="engine settings file (YAML or JSON, e.g. the operator's engine.json)"
    )
    for name, kind in ENGINE_FLAGS.items():
        field = EngineConfig.model_fields[name]
        help_text = (field.description or "").replace("%", "%%")  # argparse formats help with %
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)


def _add_server_flags(parser: argparse.ArgumentParser, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=port, help="HTTP port")
    parser.add_argument("--pool", default="default", help="InferencePool name: the `pool` metric label")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=float(DEFAULT_DRAIN_SECONDS),
        help="on SIGTERM: stop taking work, let open streams finish for this long, then fail the rest",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"splitserve {version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a prefill, decode or colocated (both) worker")
    worker.add_argument("--role", required=True, choices=["prefill", "decode", "both"])
    _add_engine_flags(worker)
    worker.add_argument(
        "--chunked-prefill",
        action="store_true",
        help="both: interleave prompt chunks with decode steps (Sarathi-Serve)",
    )
    worker.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="forget every KV block when its request ends (no reuse of shared prompt prefixes)",
    )
    worker.add_argument("--kv-port", type=int, default=8001, help="decode: port the KV receiver listens on")
    _add_server_flags(worker, port=8000)

    router = commands.add_parser("router", help="run the OpenAI-compatible router in front of the pools")
    _add_engine_flags(router)
    router.add_argument(
        "--prefill",
        default="",
        help="prefill worker URL(s), comma-separated; hostnames "
        "are re-resolved to all their addresses (headless Services)",
    )
    router.add_argument("--decode", default="", help="decode worker URL(s), comma-separated")
    router.add_argument("--discovery-file", help="JSON {prefill: [urls], decode: [urls]}, re-read on change")
    _add_server_flags(router, port=8000)

    tiny = commands.add_parser("make-tiny-model", help="write a small random Llama + tokenizer (no network)")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--seed", type=int, default=0)

    up = commands.add_parser("up", help="run an InferencePool manifest as local processes")
    up.add_argument(
        "manifest",
        nargs="?",
        type=Path,
        help="InferencePool YAML (default: the tiny demo pool, examples/local.yaml)",
    )
    up.add_argument("--port", type=int, help="router port (default: the manifest's router.service.port)")
    up.add_argument("--workdir", type=Path, help="where logs and generated files go (default: a temp dir)")
    up.add_argument(
        "--prometheus",
        choices=["auto", "off"],
        default="auto",
        help="auto: scrape through a local Prometheus when the binary is installed",
    )
    up.add_argument(
        "--demo", action="store_true", help="once ready, stream one completion and print TTFT/ITL"
    )
    up.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    commands.add_parser(
        "operator", help="run the Kubernetes operator (see `splitserve operator --help`)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["operator"]:
        from splitserve_operator.main import main as operator_main

        return operator_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ValueError, OSError) as error:
        print(f"splitserve {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from splitserve import logs

    if args.command == "make-tiny-model":
        from splitserve.engine.tiny_model import write_tiny_model

        logs.configure("warning")
        logs.silence_transformers()
        path = write_tiny_model(args.directory, seed=args.seed)
        print(f"wrote a tiny random Llama model and tokenizer to {path}")
        return 0
    logs.configure(args.log_level)
    if args.command == "up":
        from splitserve.local.up import run_local

        logs.silence_transformers()
        return run_local(args)
    config = checked_engine_config(args)
    from splitserve.serving import serve

    logs.silence_transformers()
    if args.command == "worker":
        return serve.run_worker(config, args)
    return serve.run_router(config, args)


def version() -> str:
    """The installed distribution's version (pyproject.toml's, for an editable install)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("splitserve")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        return "unknown (not installed)"


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):
        return one_line(error)
    return " ".join(str(error).split())
