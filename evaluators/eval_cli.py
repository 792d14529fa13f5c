"""``squeezekit eval``: offline quality evaluation through lm-eval, one config or a resumable ``--sweep``."""

from __future__ import annotations

import argparse
from pathlib import Path

from squeezekit.errors import NO_VALUE, ConfigError

SOURCE = "command line"


def add(parser: argparse.ArgumentParser) -> None:
    from squeezekit.cli_options import add_config_flags, add_model_option, positive_int, text_file, threads_option
    from squeezekit.devices import DTYPES

    from .suite import DEFAULT_SUITE
    from .sweep import SWEEP_BUDGETS, default_plugins

    parser.description = (
        "Evaluate quality offline through lm-eval. Without --sweep: the config given by the flags. With --sweep: every "
        "allocator x evictor x head split x budget (budget 1 = full cache, run once), resumable, written to --out "
        "(results.json, results.md, quality_vs_budget.png). An --out holds one setting (model, text, batch size, "
        "device, ...): results of another are refused, never mixed. Without --out (one config only) the scores are "
        "printed and nothing is written."
    )
    add_model_option(parser)
    parser.add_argument(
        "--suite",
        default=DEFAULT_SUITE,
        help="units TASK@LENGTH:N (N samples of TASK at prompts of about LENGTH tokens), comma-separated",
    )
    parser.add_argument("--batch-size", type=positive_int, default=4, help="sequences per batch")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU); part of the results' setting",
    )
    parser.add_argument(
        "--extend-chunk",
        type=positive_int,
        default=None,
        help="tokens per extend forward when scoring (default: the adapter's, 16)",
    )
    parser.add_argument(
        "--text-file",
        metavar="FILE",
        type=text_file,
        help="text for the pass key / perplexity tasks (default: bible-kjv, python3.11-doc, pydoc)",
    )
    parser.add_argument("--install-text", action="store_true", help="apt-get install bible-kjv first if missing")
    parser.add_argument("--sweep", action="store_true", help="run the allocator x evictor x head split x budget sweep")
    # (default: squeezekit's own allocators and evictors, but those that need a parameter, see sweep.default_plugins)
    parser.add_argument("--allocators", default=",".join(default_plugins("allocator")), help="allocators of the sweep")
    parser.add_argument("--evictors", default=",".join(default_plugins("evictor")), help="evictors of the sweep")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in SWEEP_BUDGETS), help="budgets of the sweep")
    parser.add_argument(
        "--heads",
        default=None,
        metavar="NAMES",
        help="the head split (`squeezekit plugins`): one name for one config; with --sweep, a comma-separated list "
        "whose every split is swept (e.g. uniform,adaptive) (default: uniform)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for results.json, results.md and quality_vs_budget.png; required with --sweep (default, one "
        "config only: print the scores, write nothing)",
    )
    parser.add_argument(
        "--shard", default="0/1", metavar="I/N", help="run every N-th config from the I-th (N processes share a sweep)"
    )
    parser.add_argument(
        "--threads",
        type=threads_option(),
        default=None,
        metavar="N",
        help="torch threads, at most this machine's cores (1 per process when sharding a sweep; default: torch's)",
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


def _names(text: str, key: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(key, text, "expected a comma-separated list of names", SOURCE)
    return names


def _budgets(text: str) -> list[float]:
    values = []
    for item in filter(None, (b.strip() for b in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            problem = f"{item!r} is not a number; expected budgets such as 0.1,0.2,1"
            raise ConfigError("--budgets", text, problem, SOURCE) from None
    if not values:
        raise ConfigError("--budgets", text, "expected budgets such as 0.1,0.2,1", SOURCE)
    return values


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    try:
        shard = int(i), int(n)
    except ValueError:
        shard = (0, 0)
    if not 0 <= shard[0] < shard[1]:
        raise ConfigError("--shard", text, "expected I/N with 0 <= I < N, e.g. 0/2", SOURCE)
    return shard


def _install_text() -> None:
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        subprocess.run(["apt-get", "install", "-y", "bible-kjv"], check=False)


def _out(args: argparse.Namespace) -> Path | None:
    """The results folder; a sweep must be told where its results go (they are never written anywhere by default)."""
    if args.out is None and args.sweep:
        raise ConfigError(
            "--out", NO_VALUE, "is required with --sweep: give the folder for results.json, results.md and "
            "quality_vs_budget.png", SOURCE,
        )  # fmt: skip
    return None if args.out is None else Path(args.out)


def run(args: argparse.Namespace) -> int:
    from squeezekit.cli_options import config_from_args, config_values
    from squeezekit.config import LABEL_KEYS
    from squeezekit.devices import resolve

    from .reports import summarize
    from .results import cell_key
    from .suite import parse_suite
    from .sweep import run_sweep, sweep_configs

    out = _out(args)
    units = parse_suite(args.suite)
    shard = _shard(args.shard)
    device, dtype = resolve(args.device, args.dtype)  # before anything loads
    if args.sweep:
        params = {k: v for k, v in config_values(args).items() if k not in (*LABEL_KEYS, "heads")}
        heads = _names(args.heads, "--heads") if args.heads is not None else ["uniform"]
        allocators, evictors = _names(args.allocators, "--allocators"), _names(args.evictors, "--evictors")
        configs = sweep_configs(allocators, evictors, _budgets(args.budgets), params, heads)
    else:
        if args.heads is not None and "," in args.heads:
            raise ConfigError("--heads", args.heads, "takes one head split without --sweep", SOURCE)
        setattr(args, "config:heads", args.heads)
        configs = [config_from_args(args)]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.install_text:
        _install_text()
    text_file = str(args.text_file) if args.text_file else None
    data = run_sweep(
        configs,
        units,
        out,
        args.model,
        args.batch_size,
        text_file,
        args.extend_chunk,
        shard=shard,
        device=device,
        dtype=dtype,
    )
    for config in configs:
        cell = data["cells"].get(cell_key(config))
        if cell is None:
            continue
        s = summarize(cell)
        scores = [f"{k} {u['value']:.3f}±{u['stderr']:.3f}" for k, u in sorted(cell["units"].items())]
        kv = "" if s["kv"] is None else f"; KV kept {100 * s['kv']:.1f}%"
        print(f"{cell_key(config)}: " + ", ".join(scores) + kv)
    if out is not None:
        print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'quality_vs_budget.png'}")
    return 0
