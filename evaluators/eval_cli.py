"""``squeezekit eval``: offline quality evaluation through lm-eval, one config or a resumable ``--sweep``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    from squeezekit.cli import add_config_flags

    from .sweep import DEFAULT_SUITE, SWEEP_ALLOCATORS, SWEEP_BUDGETS, SWEEP_EVICTORS

    p = sub.add_parser(
        "eval",
        help="offline quality evaluation (lm-eval RULER, pass key, perplexity); --sweep for allocator x evictor x budget",
        description=(
            "Evaluate quality offline through lm-eval. Without --sweep: the config given by the flags. With --sweep: "
            "every allocator x evictor x budget (budget 1 = full cache, run once), resumable, written to --out "
            "(results.json, results.md, quality_vs_budget.png)."
        ),
    )
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--suite", default=DEFAULT_SUITE, help=f"units TASK@LENGTH:N, comma-separated (default: {DEFAULT_SUITE})")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU); recorded in the results")
    p.add_argument("--extend-chunk", type=int, default=None, help="tokens per extend forward when scoring (default 16)")
    p.add_argument("--text-file", metavar="FILE", help="text for the pass key / perplexity tasks (default: bible-kjv, ...)")
    p.add_argument("--install-text", action="store_true", help="apt-get install bible-kjv first if `bible` is missing")
    p.add_argument("--sweep", action="store_true", help="run the allocator x evictor x budget sweep")
    p.add_argument("--allocators", default=",".join(SWEEP_ALLOCATORS))
    p.add_argument("--evictors", default=",".join(SWEEP_EVICTORS))
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in SWEEP_BUDGETS))
    p.add_argument("--out", default="docs/results", help="output folder (sweep and single runs alike)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th config from the I-th (N processes share a sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 per process when sharding a sweep)")
    add_config_flags(p)
    p.set_defaults(func=run)


def _install_text() -> None:
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        subprocess.run(["apt-get", "install", "-y", "bible-kjv"], check=False)


def run(args: argparse.Namespace) -> int:
    from squeezekit.cli import config_from_args

    from .sweep import parse_suite, run_sweep, summarize, sweep_configs

    units = parse_suite(args.suite)
    try:
        i, n = (int(x) for x in args.shard.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        from squeezekit.errors import ConfigError

        raise ConfigError("--shard", args.shard, "expected I/N with 0 <= I < N, e.g. 0/2", "command line") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.install_text:
        _install_text()
    if args.sweep:
        base = config_from_args(args).as_dict()
        extra = {k: v for k, v in base.items() if k not in ("allocator", "evictor", "budget")}
        configs = sweep_configs(
            [a.strip() for a in args.allocators.split(",") if a.strip()],
            [e.strip() for e in args.evictors.split(",") if e.strip()],
            [float(b) for b in args.budgets.split(",") if b.strip()],
            extra,
        )
    else:
        configs = [config_from_args(args)]
    data = run_sweep(configs, units, Path(args.out), args.model, args.batch_size, args.text_file, args.extend_chunk,
                     shard=(i, n), device=args.device, dtype=args.dtype)
    from .sweep import cell_key

    for config in configs:
        cell = data["cells"].get(cell_key(config))
        if cell is None:
            continue
        s = summarize(cell)
        parts = [f"{k} {u['value']:.3f}±{u['stderr']:.3f}" for k, u in sorted(cell["units"].items())]
        kv = "" if s["kv"] is None else f"; KV kept {100 * s['kv']:.1f}%"
        print(f"{cell_key(config)}: " + ", ".join(parts) + kv)
    print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}, {Path(args.out) / 'quality_vs_budget.png'}")
    return 0
