"""``squeezekit bench``: throughput and memory of transformers' full cache and squeezekit configs, side by side in
one process, on random-weight models built from named configs (or a local model directory).

Protocol (the shared Hugging Face baseline's): greedy decoding of ``--new-tokens`` tokens after random
``--prompt-len``-token prompts; see bench_models.run_hf and bench_runs.run_squeezekit. Each method runs at growing
batch sizes (``--batches``) until one runs out of memory, passes ``--memory-cap-gib`` or takes longer than
``--max-seconds-per-run``, so that no method takes the time of the others. ``--peer-kvpress SITE`` first times NVIDIA
kvpress's StreamingLLMPress with the same protocol, in its own process (peer_kvpress.py: kvpress needs
transformers < 5.3).

The markdown table goes to stdout; with ``--out DIR`` the JSON, the table and a PNG are also written there, after
every run (a later crash keeps what was measured). Nothing is written without ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from squeezekit.cli_options import non_negative_float, non_negative_int, positive_int, threads_option
from squeezekit.devices import resolve
from squeezekit.errors import ConfigError, InputError
from squeezekit.files import check_output_dir, read_text

#: ``--batches auto``: on CUDA, growing until a run runs out of memory; on the CPU, short (a minute for tiny)
AUTO_BATCHES = {
    "cuda": [1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024],
    "cpu": [1, 2, 4, 8],
}
#: the longest prompt ``--prompt-len`` defaults to (shorter when the model's positions end before it)
PROMPT_LEN = 4096
NEW_TOKENS = 128
#: ``--max-seconds-per-run`` by default: a method's ladder stops after a run longer than this
MAX_SECONDS = {"cuda": 300.0, "cpu": 20.0}
SOURCE = "command line"


def add(parser: argparse.ArgumentParser) -> None:
    from .bench_models import CONFIGS

    parser.description = __doc__.split("\n\n")[0].split(": ", 1)[1]
    parser.add_argument(
        "--model", default="mistral-7b", metavar="NAME|DIR",
        help=f"a named config with random weights ({', '.join(CONFIGS)}) or a local model directory",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--gpus", type=positive_int, default=1, help="shard the model's layers over this many GPUs")
    parser.add_argument(
        "--prompt-len", type=positive_int, default=None, metavar="N",
        help=f"tokens per random prompt (default: {PROMPT_LEN}, or the model's maximum positions minus --new-tokens "
        f"(or --check-tokens, when more) when that is less: "
        f"{CONFIGS['tiny']['max_position_embeddings'] - NEW_TOKENS} for tiny)",
    )  # fmt: skip
    parser.add_argument(
        "--new-tokens", type=positive_int, default=NEW_TOKENS, metavar="N", help="tokens generated per prompt (>= 2)"
    )
    parser.add_argument(
        "--batches", default="auto", metavar="B1,B2,...|auto",
        help="comma-separated batch sizes, or auto: " + ",".join(map(str, AUTO_BATCHES["cpu"])) + " on the CPU, "
        f"{AUTO_BATCHES['cuda'][0]},{AUTO_BATCHES['cuda'][1]},...,{AUTO_BATCHES['cuda'][-1]} on CUDA (until a run "
        "runs out of memory)",
    )  # fmt: skip
    parser.add_argument(
        "--max-seconds-per-run", type=non_negative_float, default=None, metavar="S",
        help="stop a method's batch sizes after a run that took longer than S seconds, so that every method gets "
        f"its turn (default: {MAX_SECONDS['cpu']:g} on the CPU, {MAX_SECONDS['cuda']:g} on CUDA; 0 = no limit)",
    )  # fmt: skip
    parser.add_argument(
        "--methods", default="hf,squeeze+streaming@0.2",
        help="comma-separated: hf (transformers' full cache), hf@BACKEND[BITS] (transformers' QuantizedCache: "
        "hf@fp8, hf@quanto4, hf@hqq4, ...; a backend that cannot run here is reported as not run), hf-static "
        "(transformers' static cache, its decode compiled on CUDA), hf-cb (transformers' continuous batching, "
        "generate_batch with its paged cache) or a config label "
        "ALLOC+EVICT@BUDGET[/KEY=VALUE...] (e.g. with /kv_bits=8), optionally with its own chunked prefill (~1024) "
        "and batch sizes (:8/16/32)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=threads_option(), default=None, metavar="N",
        help="CPU threads of torch (default: 1 for the tiny config on the CPU, whose operations are too small to "
        "share; torch's own otherwise, usually one per core)",
    )  # fmt: skip
    parser.add_argument("--micro-batch", type=positive_int, default=16, help="squeezekit prefill micro-batch")
    parser.add_argument(
        "--prefill-chunk", type=non_negative_int, default=0, metavar="TOKENS",
        help="squeezekit chunked prefill: tokens per chunk, for methods without their own ~CHUNK (default: 0, off)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-cap-gib", type=non_negative_float, default=0.0, metavar="GIB",
        help="stop a method's batch sizes after a run whose peak passed this, on CUDA (default: 0, no cap)",
    )  # fmt: skip
    parser.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false",
        help="decode without CUDA graphs (default: squeezekit's decoder replays a CUDA graph on CUDA)",
    )  # fmt: skip
    parser.add_argument(
        "--check-batch", type=non_negative_int, default=2, help="batch of the correctness checks (0 skips them)"
    )
    parser.add_argument("--check-tokens", type=positive_int, default=16, help="tokens generated by the checks")
    parser.add_argument(
        "--profile-batch", type=non_negative_int, default=0, metavar="B",
        help="also profile eager decode steps at this batch size (default: 0, no profile)",
    )  # fmt: skip
    parser.add_argument(
        "--peer-kvpress", default=None, metavar="SITE",
        help="also time kvpress's StreamingLLMPress, in its own process with SITE (kvpress + transformers<5.3) first "
        "on PYTHONPATH, before squeezekit's runs (default: no peer)",
    )  # fmt: skip
    parser.add_argument("--peer-batches", default="48,64,96", help="batch sizes of the kvpress peer")
    parser.add_argument(
        "--peer-budget", type=float, default=0.2, help="fraction of the prompt's KV the kvpress peer keeps"
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR",
        help="also write bench-MODEL.{json,md,png} into DIR, after every run (default: none: the table is printed "
        "and nothing is written)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def _batch_sizes(text: str, key: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(key, text, "expected comma-separated batch sizes >= 1, e.g. 8,16,32", SOURCE)
    return sizes


def max_positions(model: str) -> int | None:
    """The model's maximum positions (``max_position_embeddings`` of its config or its text config), None when
    its config does not say. A config.json that cannot be read is left to the model's loading to report."""
    from .bench_models import CONFIGS

    if model in CONFIGS:
        return CONFIGS[model].get("max_position_embeddings")
    try:
        config = json.loads(read_text(Path(model) / "config.json", "--model", 1 << 24, SOURCE))
    except (ConfigError, ValueError):
        return None
    for part in (config, config.get("text_config") if isinstance(config, dict) else None):
        value = part.get("max_position_embeddings") if isinstance(part, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(args: argparse.Namespace) -> None:
    """Fill in ``--prompt-len``'s default, or refuse a prompt plus new tokens past the model's positions (the run
    would stop with an error at its first decode step, after the model was built). The new tokens are the more of
    ``--new-tokens`` and, when the correctness checks run, ``--check-tokens``: both generate after the same prompts."""
    from .bench_models import model_name

    limit = max_positions(args.model)
    name = model_name(args.model)
    checks = args.check_tokens if args.check_batch > 0 else 0
    key, new = ("--check-tokens", checks) if checks > args.new_tokens else ("--new-tokens", args.new_tokens)
    if limit is not None and new >= limit:
        raise ConfigError(
            key,
            new,
            f"leaves no room for a prompt in the model's maximum of {limit} positions (max_position_embeddings of "
            f"{name}); use at most {limit - 1}",
            SOURCE,
        )
    if args.prompt_len is None:
        args.prompt_len = PROMPT_LEN if limit is None else min(PROMPT_LEN, limit - new)
    elif limit is not None and args.prompt_len + new > limit:
        raise ConfigError(
            "--prompt-len",
            args.prompt_len,
            f"with {key} {new} the sequences reach {args.prompt_len + new} positions, past the model's maximum of "
            f"{limit} (max_position_embeddings of {name}); use --prompt-len {limit - new} or less",
            SOURCE,
        )


def check_args(args: argparse.Namespace):
    """Every argument checked before anything is built or run: a bad one is a one-line error, never lost work.
    Fills in the defaults that depend on the device and the model."""
    import torch

    from .bench_models import CONFIGS
    from .bench_runs import parse_methods

    args.device, args.dtype = resolve(args.device, args.dtype)
    on_cuda = args.device.startswith("cuda")
    if args.gpus > 1 and (not on_cuda or torch.cuda.device_count() < args.gpus):
        raise InputError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices are available")
    if args.model not in CONFIGS and not (Path(args.model) / "config.json").is_file():
        raise ConfigError(
            "--model",
            args.model,
            f"expected a named config ({', '.join(CONFIGS)}) or a local model directory with a config.json",
            SOURCE,
        )
    if args.new_tokens < 2:
        raise ConfigError(
            "--new-tokens", args.new_tokens, "must be at least 2 (decode throughput needs a step)", SOURCE
        )
    check_lengths(args)
    if args.peer_kvpress and args.model not in CONFIGS:
        raise ConfigError(
            "--peer-kvpress", args.peer_kvpress, "needs a named --model (the peer builds the same random model)", SOURCE
        )
    if args.max_seconds_per_run is None:
        args.max_seconds_per_run = MAX_SECONDS["cuda" if on_cuda else "cpu"]
    if args.threads is None and args.model == "tiny" and not on_cuda:
        args.threads = 1  # two threads made tiny's decode steps ~10x slower on 2 busy cores
    methods = parse_methods(args.methods)
    auto = AUTO_BATCHES["cuda" if on_cuda else "cpu"]
    batches = auto if args.batches == "auto" else _batch_sizes(args.batches, "--batches")
    if args.peer_kvpress:
        _batch_sizes(args.peer_batches, "--peer-batches")
    if args.out is not None:  # last: it creates the folder, which a refused argument should not leave behind
        check_output_dir(args.out, "--out", SOURCE)
    return methods, batches


def run_peer_kvpress(args: argparse.Namespace) -> list[dict]:
    """kvpress's StreamingLLMPress at the same budget, in its own process (it needs transformers < 5.3): one run
    per ``--peer-batches`` size, until one runs out of memory. Runs before squeezekit's model exists, so both see
    the whole GPU."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.peer_kvpress, os.environ.get("PYTHONPATH")]))}
    cmd = [
        sys.executable, "-m", "squeezekit.evaluators.peer_kvpress", "--config", args.model,
        "--device", args.device, "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--batches", args.peer_batches, "--budget", str(args.peer_budget),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InputError(f"the kvpress peer failed (exit {done.returncode}): {last}")
    return runs


def run(args: argparse.Namespace) -> int:
    """Check every argument, run the benchmark, print the markdown report (and write the files with ``--out``)."""
    from squeezekit.progress import quiet_transformers, status

    from .bench_report import markdown, stem, write_reports

    methods, batches = check_args(args)
    quiet_transformers()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = None if args.out is None else Path(args.out)
    results = bench(args, methods, batches, out)
    text = markdown(results)
    if out is not None:
        write_reports(results, out)
    elif "profile" in results:
        text += "\nEager decode steps, profiled:\n\n```\n" + results["profile"] + "\n```\n"
    print(text, end="", flush=True)
    if out is not None:
        status(f"wrote {out / stem(results)}.{{json,md,png}}")
    return 0


def setting(args: argparse.Namespace, model, bandwidth: float) -> dict:
    """The results' header: what was measured, on what; ``runs``, ``checks`` and ``notes`` still empty."""
    import torch
    import transformers

    from .bench_models import model_name

    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(args.device)
        device = f"{args.gpus} x {name}" if args.gpus > 1 else name
    else:
        threads = torch.get_num_threads()
        device = f"cpu ({threads} thread{'s' if threads > 1 else ''})"
    return {
        "config": model_name(args.model),
        "device": device,
        "gpus": args.gpus,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "max_seconds_per_run": args.max_seconds_per_run,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "copy_bandwidth_Bps": bandwidth,
        "runs": [],
        "checks": [],
        "notes": [],
    }


def floor_step_ms(results: dict, kv_bytes: int) -> float:
    """The fastest a decode step could be: it reads every weight and every kept KV byte once, at the copy
    bandwidth (three significant digits: a tiny model's floor is a fraction of a millisecond)."""
    return float(f"{1000 * (results['weight_bytes'] + kv_bytes) / results['copy_bandwidth_Bps']:.3g}")


def bench(args: argparse.Namespace, methods, batches: list[int], out: Path | None) -> dict:
    """The whole benchmark: the kvpress peer, the correctness checks, every method's batch sizes, the profile."""
    import torch

    from squeezekit.progress import status

    from .bench_models import build_model, copy_bandwidth
    from .bench_runs import correctness_checks, profile_decode

    peer = []
    if args.peer_kvpress:
        status("timing kvpress's StreamingLLMPress in its own process")
        peer = run_peer_kvpress(args)
    status(f"building {args.model} on {args.device} ({args.dtype}) and measuring its copy bandwidth")
    model = build_model(args.model, args.device, getattr(torch, args.dtype), args.gpus)
    results = setting(args, model, copy_bandwidth(args.device))
    for r in peer:  # measured first, in their own process (see run_peer_kvpress)
        if not r.get("oom"):
            r["floor_step_ms"] = floor_step_ms(results, r["kv_bytes"])
        results["runs"].append(r)
    g = torch.Generator().manual_seed(0)
    if args.check_batch > 0:
        status(f"correctness checks: batch {args.check_batch}, {args.check_tokens} new tokens")
        ids = random_prompts(model, args.check_batch, args.prompt_len, g).to(args.device)
        results["checks"] += correctness_checks(model, ids, args.check_tokens, args.device, methods, args.cuda_graph)
    run_ladders(args, model, methods, batches, results, g, out)
    if args.profile_batch:
        method = next((m for m in methods if not m.is_hf), None)
        if method is not None:
            status(f"profiling decode steps of {method.name} at batch {args.profile_batch}")
            ids = random_prompts(model, args.profile_batch, args.prompt_len, g).to(args.device)
            results["profile"] = profile_decode(model, ids, args.device, method.config, args.micro_batch)
    return results


def random_prompts(model, batch: int, length: int, g):
    """``batch`` random prompts of ``length`` tokens (token 0, the padding id, never drawn)."""
    import torch

    return torch.randint(1, model.config.vocab_size, (batch, length), generator=g)


def run_ladders(args: argparse.Namespace, model, methods, batches: list[int], results: dict, g, out) -> None:
    """Each method at its batch sizes in turn, until a run runs out of memory, passes ``--memory-cap-gib`` or takes
    longer than ``--max-seconds-per-run`` (a note in the report says which sizes were skipped, and why). The
    reports are rewritten after every run when there is an ``--out``."""
    from squeezekit.progress import progress

    from .bench_report import write_reports

    plan = [(method, list(method.batches or batches)) for method in methods]
    with progress(sum(len(sizes) for _, sizes in plan), "bench", unit="run") as bar:
        for method, sizes in plan:
            for i, B in enumerate(sizes):
                bar.set_note(f"running {method.name} at batch {B}")
                r, seconds = measure(args, model, method, B, g)
                if r.get("not_run"):  # a QuantizedCache backend that cannot run here: said once, not timed
                    results["notes"].append(f"{method.name} not run: {r['not_run']}")
                    bar.set_note(results["notes"][-1])
                    bar.update(len(sizes) - i)
                    break
                if not r.get("oom"):
                    r["floor_step_ms"] = floor_step_ms(results, r["kv_bytes"])
                results["runs"].append(r)
                bar.set_note(f"{method.name} at batch {B}: {run_summary(r, seconds)}")
                bar.update()
                if out is not None:
                    write_reports(results, out)  # after every run: a later crash keeps what was measured
                why = stop_reason(args, r, seconds)
                if why:
                    rest = sizes[i + 1 :]
                    if rest:
                        note = f"{method.name}: batch {', '.join(map(str, rest))} not run: {why}"
                        if not r.get("oom"):  # an OOM row says it itself
                            results["notes"].append(note)
                        bar.set_note(note)
                        bar.update(len(rest))
                    break


def run_summary(r: dict, seconds: float) -> str:
    """A finished run in a few words, for the progress line."""
    if r.get("oom"):
        return "out of memory"
    return f"{r['decode_tok_s']} decode tok/s, {r['step_ms']} ms a step, {seconds:.1f} s"


def stop_reason(args: argparse.Namespace, r: dict, seconds: float) -> str:
    """Why a method's batch sizes stop after the run ``r`` that took ``seconds``: '' when they go on."""
    if r.get("oom"):
        return f"batch {r['B']} ran out of memory"
    if args.max_seconds_per_run and seconds > args.max_seconds_per_run:
        return f"batch {r['B']} took {seconds:.1f} s, longer than --max-seconds-per-run {args.max_seconds_per_run:g}"
    peak = r.get("peak_gib")
    if args.memory_cap_gib and peak is not None and peak > args.memory_cap_gib:
        return f"batch {r['B']} peaked at {peak} GiB, past --memory-cap-gib {args.memory_cap_gib:g}"
    return ""


def measure(args: argparse.Namespace, model, method, B: int, g) -> tuple[dict, float]:
    """One run of ``method`` at batch ``B`` (``{"oom": True}`` when it runs out of memory) and its seconds."""
    import time

    import torch

    from .bench_models import BaselineMissing, is_oom, peak_reset, run_hf
    from .bench_runs import run_squeezekit
    from .bench_serving import serve

    ids = random_prompts(model, B, args.prompt_len, g).to(args.device)
    start = time.perf_counter()
    r = None
    try:
        if method.serving is not None:
            r = serve(method.serving, model, ids, args.new_tokens, args.device)
        elif method.is_hf:
            r = run_hf(model, ids, args.new_tokens, args.device, method.quantized)
        else:
            chunk = method.chunk or args.prefill_chunk or None
            r = run_squeezekit(
                model, ids, args.new_tokens, args.device, method.config, args.micro_batch, args.cuda_graph, chunk
            )
    except BaselineMissing as exc:
        return {"method": method.name, "B": B, "not_run": str(exc)}, time.perf_counter() - start
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
    seconds = time.perf_counter() - start
    del ids
    if r is None:  # outside the except block, so the traceback's frames (and their tensors) can be freed
        peak_reset(args.device)
        return {"method": method.name, "B": B, "oom": True}, seconds
    r.pop("tokens")
    r.update(method=method.name, B=B)
    return r, seconds


def main(argv: list[str] | None = None) -> int:
    """``python -m squeezekit.evaluators.bench_cli ...``: the same as ``squeezekit bench ...``."""
    from squeezekit.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
