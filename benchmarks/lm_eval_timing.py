"""Wall time of lm-eval's ``hf`` model against ``squeezekit`` (budget 1.0 and a compressed config), in one process, on
the same tasks, through lm-eval's own ``evaluate``:

    python benchmarks/lm_eval_timing.py --out docs/benchmarks --models smollm2
    python benchmarks/lm_eval_timing.py --out docs/benchmarks --models mistral-7b

Per model, each method evaluates every unit (``niah_single_1`` and ``squeezekit_ppl`` at each of ``--lengths``) after
a short untimed warm-up; only ``evaluate`` is timed (the model and the task data are built once, before, and shared).
Models: ``smollm2`` (SmolLM2-135M-Instruct, real weights), ``mistral-7b`` (Mistral-7B shapes with random weights,
built directly on the device, with SmolLM2's tokenizer and vocabulary; handed to HFLM as a model object) and
``tiny`` (a random tiny Llama with its own tokenizer: the CPU smoke test). Each run merges its rows into
``OUT/lm-eval-timing.json`` (rows of the same model are replaced) after every unit, then writes
``OUT/lm-eval-timing.md``: the wall times, the scores, the ratios squeezekit / hf, and each target of issue 15 stated
as met or not from these numbers (budget 1.0 <= 1.1x hf over all units; the compressed config <= 0.6x hf on the units
at the largest length).

Checks: per-sample agreement of ``hf`` and ``squeezekit`` at budget 1.0 in the timed runs (generated text, and
log-likelihoods within 1e-3 relative; bf16 kernels differ, so this is a rate, not an identity), and, on the first
``--check`` samples of each unit (both runs batched alike), the compressed config as it runs now against the same
config run the previous way: ``model.generate`` (``fast=false``) for generation, the previous scoring code
(`lm_eval_reference.PreviousScoringLM`, beside this script) for perplexity (log-likelihoods within 1e-5 relative).
These should agree on every sample when ``--micro-batch`` is not set (with it, a batch-level allocator shares the
first micro-batch's allocation, and bf16 kernels of other shapes may round differently).

Needs nothing beyond ``lm-eval[hf,ruler]==0.4.13``, squeezekit (as installed) and lm_eval_reference.py beside this
script; no network (``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("hf", "squeezekit@1.0", "squeezekit@compressed")
MODELS = ("smollm2", "mistral-7b", "tiny")
FILE = "lm-eval-timing"
#: issue 15's targets: squeezekit at budget 1.0 within this factor of hf (all units), compressed within this
#: (long units)
TARGET_FULL, TARGET_COMPRESSED = 1.1, 0.6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/lm_eval_timing.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for lm-eval-timing.json and .md")
    p.add_argument("--models", default="smollm2,mistral-7b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU by default")
    p.add_argument("--tasks", default="niah_single_1,squeezekit_ppl")
    p.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens, for every task")
    p.add_argument("--limit", type=int, default=100, help="samples per niah unit")
    p.add_argument("--ppl-limit", type=int, default=32, help="documents per perplexity unit")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size of hf and squeezekit@1.0")
    p.add_argument(
        "--compressed-batch-size", type=int, default=None, help="of the compressed config (default: --batch-size)"
    )
    p.add_argument(
        "--micro-batch", type=int, default=None, help="squeezekit's prefill rows per forward (default: the batch)"
    )
    p.add_argument(
        "--compressed",
        default="allocator=squeeze,evictor=streaming,budget=0.2",
        help="the compressed squeezekit config, k=v,... (model_args syntax)",
    )
    p.add_argument("--max-gen-toks", type=int, default=None, help="override the generation tasks' own max_gen_toks")
    p.add_argument(
        "--fast",
        default="auto",
        choices=("auto", "true", "false"),
        help="squeezekit's serving path for greedy generation (auto: on CUDA; true: also on the CPU)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="model folder whose tokenizer drives mistral-7b (its config and tokenizer files suffice; default: "
        "SmolLM2's, converted from the GGUF)",
    )
    p.add_argument("--check", type=int, default=8, help="samples per unit run again through model.generate (0: none)")
    p.add_argument("--warmup", type=int, default=2, help="untimed samples per method before timing (0: none)")
    p.add_argument(
        "--text-file", default=None, help="text for squeezekit_ppl (default: see squeezekit/evaluators/tasks)"
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# -- models ------------------------------------------------------------------------------------------------------------
def tokenizer_dir(name: str, scratch: Path, given: str | None = None) -> str:
    if name == "tiny":
        from squeezekit.evaluators.testing import make_tiny_model

        target = scratch / "tiny"
        if not (target / "config.json").exists():
            make_tiny_model(target)
        return str(target)
    if given is not None and name == "mistral-7b":
        return given  # the random 7B needs only the tokenizer and the vocabulary's config, no weights
    from squeezekit.models import default_model_dir

    return str(default_model_dir())  # SmolLM2's: also the random 7B's tokenizer


def evaluated_model(name: str, tok_dir: str, device: str, dtype):
    """The model lm-eval evaluates: ``mistral-7b``'s shapes with random weights and the vocabulary and special ids of
    ``tok_dir``'s model (SmolLM2's), or ``tok_dir``'s own weights; generations stop at its end token."""
    from squeezekit.evaluators import bench_models as bench

    if name == "mistral-7b":
        return bench.build_model(name, device, dtype, vocab_from=tok_dir, fixed_length=False)
    return bench.build_model(tok_dir, device, dtype, fixed_length=False)


def make_lm(method: str, model, tok_dir: str, args, previous: bool = False):
    """The lm-eval model of ``method``; ``previous``: squeezekit as before the serving path (``model.generate`` for
    generation, `lm_eval_reference.PreviousScoringLM` for scoring)."""
    from lm_eval.models.huggingface import HFLM

    if method == "hf":
        return HFLM(pretrained=model, tokenizer=tok_dir, batch_size=args.batch_size)
    from lm_eval_reference import PreviousScoringLM  # beside this script
    from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM

    cls, extra = SqueezekitLM, {"fast": args.fast}
    if previous:
        cls, extra = PreviousScoringLM, {"fast": False}
    elif args.micro_batch is not None:
        extra["micro_batch"] = args.micro_batch
    if method == "squeezekit@1.0":
        return cls(pretrained=model, tokenizer=tok_dir, batch_size=args.batch_size, budget=1.0, **extra)
    config = compressed_config(args.compressed)
    bs = args.compressed_batch_size or args.batch_size
    return cls(pretrained=model, tokenizer=tok_dir, batch_size=bs, **config, **extra)


def compressed_config(text: str) -> dict:
    from lm_eval.utils import simple_parse_args_string

    return simple_parse_args_string(text)


# -- tasks -------------------------------------------------------------------------------------------------------------
class Tasks:
    """lm-eval task dicts, one per (task, length), built once per tokenizer (as squeezekit eval's sweep loads them)."""

    def __init__(self, tok_dir: str, n_max: int, text_file: str | None, max_gen_toks: int | None):
        self.tok_dir, self.text_file, self.max_gen_toks = tok_dir, text_file, max_gen_toks
        self.n_max = n_max
        self._loaded: dict[tuple[str, int], dict] = {}

    def get(self, task: str, length: int, n: int) -> dict:
        """The task dict of ``task`` at ``length`` with ``n_max`` samples (callers take the first ``n``)."""
        from squeezekit.evaluators.suite import Unit, load_unit

        key = (task, length)
        if key not in self._loaded:
            self._loaded[key] = load_unit(
                Unit(task, length, self.n_max), self.tok_dir, self.text_file, self.max_gen_toks
            )
        return self._loaded[key]


def score_of(task: str, length: int, results: dict) -> tuple[str, float]:
    res = next(iter(results["results"].values()))
    if task == "squeezekit_ppl":
        return "word_perplexity", float(res["word_perplexity,none"])
    return f"accuracy@{length}", float(res[f"{length},none"])


def per_sample(out: dict) -> list:
    """Each sample's response (generated text, or log-likelihood), by doc_id."""
    samples = sorted(next(iter(out["samples"].values())), key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


def agreement(a: list, b: list, tol: float = 1e-3) -> dict:
    n = min(len(a), len(b))
    if n == 0:
        return {"n": 0, "agree": None}
    if isinstance(a[0], str):
        same = sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
        return {"n": n, "agree": same / n}
    rel = [abs(x - y) / max(1.0, abs(x)) for x, y in zip(a[:n], b[:n], strict=True)]
    return {"n": n, "agree": sum(r <= tol for r in rel) / n, "max_rel_diff": max(rel)}


# -- the run -----------------------------------------------------------------------------------------------------------
def environment(device: str, dtype: str) -> dict:
    import lm_eval
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__,
        "device": device,
        "dtype": dtype,
        "host": platform.node(),
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{FILE}.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": [], "checks": [], "meta": {}}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    for name in models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; models: {', '.join(MODELS)}")
    # a run replaces the rows of the (model, task, length) units it runs, and keeps the others: long runs can be split
    # by --lengths or --tasks over several invocations (each unit still compares its methods within one process)
    ran = {(m, t, L) for m in models for t in tasks for L in lengths}
    data["runs"] = [r for r in data["runs"] if (r["model"], r["task"], r["length"]) not in ran]
    data["checks"] = [c for c in data["checks"] if (c["model"], c["task"], c["length"]) not in ran]
    meta = data["meta"].setdefault("invocations", [])
    for inv in meta:
        inv["units"] = [u for u in inv["units"] if (inv["model"], *_unit_key(u)) not in ran]
    meta[:] = [inv for inv in meta if inv["units"]]
    with tempfile.TemporaryDirectory(prefix="lm-eval-timing-") as scratch:
        return _run_models(args, data, models, tasks, lengths, meta, Path(scratch), device, dtype, dtype_name, out_dir)


def _run_models(args, data, models, tasks, lengths, meta, scratch, device, dtype, dtype_name, out_dir) -> dict:
    import torch
    from squeezekit.evaluators import bench_models as bench

    task_sets: dict[str, Tasks] = {}
    for name in models:
        tok_dir = tokenizer_dir(name, scratch, args.tokenizer)
        if tok_dir not in task_sets:
            task_sets[tok_dir] = Tasks(tok_dir, max(args.limit, args.ppl_limit), args.text_file, args.max_gen_toks)
        loader = task_sets[tok_dir]
        units = [(t, L, args.ppl_limit if t == "squeezekit_ppl" else args.limit) for t in tasks for L in lengths]
        t0 = time.time()
        for task, L, n in units:  # task data first: not part of any timing
            loader.get(task, L, n)
        print(f"[{name}] task data built in {time.time() - t0:.1f} s", flush=True)
        t0 = time.time()
        model = evaluated_model(name, tok_dir, device, dtype)
        bench.sync(device)
        print(f"[{name}] model built in {time.time() - t0:.1f} s", flush=True)
        meta.append({
            "model": name,
            "command": " ".join(["python benchmarks/lm_eval_timing.py", *args.argv]),
            "environment": environment(device, dtype_name),
            "batch_size": args.batch_size, "compressed_batch_size": args.compressed_batch_size or args.batch_size,
            "micro_batch": args.micro_batch, "compressed": args.compressed, "max_gen_toks": args.max_gen_toks,
            "units": [f"{t}@{L}:{n}" for t, L, n in units],
            "parameters": sum(p.numel() for p in model.parameters()),
        })  # fmt: skip
        responses: dict[tuple[str, str, int], list] = {}

        for method in METHODS:
            lm = make_lm(method, model, tok_dir, args)
            if args.warmup:
                task, L, _ = min(units, key=lambda u: u[1])
                _evaluate(loader, lm, task, L, args.warmup, log_samples=False)
            for task, L, n in units:
                if hasattr(lm, "kv_bytes"):
                    lm.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
                    lm.generate_batches = {"serving": 0, "generate": 0}
                bench.sync(device)
                t0 = time.perf_counter()
                out = _evaluate(loader, lm, task, L, n)
                bench.sync(device)
                seconds = time.perf_counter() - t0
                metric, value = score_of(task, L, out)
                responses[(method, task, L)] = per_sample(out)
                kv = getattr(lm, "kv_bytes", None)
                row = {"model": name, "method": method, "task": task, "length": L,
                       "n": len(responses[(method, task, L)]), "seconds": round(seconds, 3),
                       "metric": metric, "value": value,
                       "kv_fraction": kv["kept"] / kv["full"] if kv and kv["full"] else None,
                       "describe": lm.squeeze_config.describe() if hasattr(lm, "squeeze_config") else "transformers",
                       "generate_batches": dict(getattr(lm, "generate_batches", {}))}  # fmt: skip
                if device.startswith("cuda"):
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                    torch.cuda.reset_peak_memory_stats()
                data["runs"].append(row)
                print(f"[{name}] {method:22s} {task}@{L}: {seconds:8.2f} s  {metric} {value:.4f}", flush=True)
                save(data, out_dir)
            del lm
            bench.peak_reset(device)
        for task, L, _ in units:  # hf vs squeezekit at budget 1.0, every sample
            c = agreement(responses[("hf", task, L)], responses[("squeezekit@1.0", task, L)])
            data["checks"].append({"model": name, "task": task, "length": L, "what": "hf vs squeezekit@1.0", **c})
        if args.check:  # the compressed config, serving path vs the previous one, on the same first samples
            for task, L, _ in units:
                pair = []
                for previous in (True, False):
                    lm = make_lm("squeezekit@compressed", model, tok_dir, args, previous=previous)
                    pair.append(per_sample(_evaluate(loader, lm, task, L, args.check)))
                    del lm
                what = "scoring" if task == "squeezekit_ppl" else "serving path vs model.generate"
                c = agreement(*pair, tol=1e-5)
                data["checks"].append({"model": name, "task": task, "length": L, "what": f"compressed, {what}", **c})
                print(f"[{name}] check {task}@{L}: compressed, {what}: {c['agree']:.0%} of {c['n']} agree", flush=True)
        save(data, out_dir)
        del model
        bench.peak_reset(device)
    return data


def _evaluate(loader, lm, task: str, L: int, n: int, log_samples: bool = True) -> dict:
    """lm-eval's ``evaluate`` on ``n`` samples of ``task`` at prompts of ``L`` tokens (no bootstrap)."""
    from lm_eval.evaluator import evaluate

    return evaluate(lm=lm, task_dict=loader.get(task, L, n), limit=n, bootstrap_iters=0, log_samples=log_samples,
                    verbosity="ERROR")  # fmt: skip


def _unit_key(unit: str) -> tuple[str, int]:
    """``task@length:n`` -> (task, length)."""
    task, rest = unit.split("@")
    return task, int(rest.split(":")[0])


def save(data: dict, out_dir: Path) -> None:
    path = out_dir / f"{FILE}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    (out_dir / f"{FILE}.md").write_text(markdown(data))


# -- report ------------------------------------------------------------------------------------------------------------
def targets(data: dict, model: str) -> list[dict]:
    """Issue 15's wall-time targets for one model, from its rows: budget 1.0 over all units, the compressed config
    over the units at the largest length."""
    rows = [r for r in data["runs"] if r["model"] == model]
    by = {(r["method"], r["task"], r["length"]): r["seconds"] for r in rows}
    units = sorted({(r["task"], r["length"]) for r in rows})
    out = []
    longest = max((L for _, L in units), default=None)
    for method, goal, chosen, scope in (
        ("squeezekit@1.0", TARGET_FULL, units, "all units"),
        (
            "squeezekit@compressed",
            TARGET_COMPRESSED,
            [u for u in units if u[1] == longest],
            f"the {longest}-token units",
        ),
    ):
        pairs = [(by.get(("hf", *u)), by.get((method, *u))) for u in chosen]
        if not pairs or any(a is None or b is None for a, b in pairs):
            continue
        hf, sk = sum(a for a, _ in pairs), sum(b for _, b in pairs)
        ratio = sk / hf if hf else math.inf
        per_unit = {f"{t}@{L}": b / a if a else math.inf for (t, L), (a, b) in zip(chosen, pairs, strict=True)}
        out.append({"method": method, "scope": scope, "goal": goal, "hf_seconds": hf, "seconds": sk, "ratio": ratio,
                    "met": ratio <= goal, "per_unit": per_unit,
                    "met_every_unit": all(x <= goal for x in per_unit.values())})  # fmt: skip
    return out


def markdown(data: dict) -> str:
    lines = ["# lm-eval wall time: `hf` vs `squeezekit` (issue 15)", ""]
    invocations = data.get("meta", {}).get("invocations", [])
    for model in dict.fromkeys(inv["model"] for inv in invocations):
        rows = [r for r in data["runs"] if r["model"] == model]
        if not rows:
            continue
        lines += [f"## {model}", ""]
        for meta in (inv for inv in invocations if inv["model"] == model):
            env = meta["environment"]
            compressed = next(
                (r["describe"] for r in rows if r["method"] == "squeezekit@compressed"), meta["compressed"]
            )
            lines += [
                f"`{meta['command']}`",
                "",
                f"Units {', '.join(meta['units'])}: {env.get('gpu', env['device'])}, {env['dtype']}; torch "
                f"{env['torch']}, transformers {env['transformers']}, lm-eval {env['lm_eval']}; "
                f"{meta['parameters'] / 1e9:.2f} B parameters. Batch size {meta['batch_size']} (compressed: "
                f"{meta['compressed_batch_size']}), prefill micro-batch {meta['micro_batch'] or 'the batch'}, "
                f"max_gen_toks {meta['max_gen_toks'] or 'the task’s own'}. Compressed config: {compressed}.",
                "",
            ]
        lines += [
            "| task | length | n | hf s | squeezekit@1.0 s | x hf | compressed s | x hf | hf score | @1.0 score "
            "| compressed score | KV kept |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        by = {(r["method"], r["task"], r["length"]): r for r in rows}
        for task, L in sorted({(r["task"], r["length"]) for r in rows}):
            hf, full, comp = (by.get((m, task, L)) for m in METHODS)

            def sec(r):
                return "" if r is None else f"{r['seconds']:.1f}"

            def ratio(r, hf=hf):
                return "" if r is None or hf is None or not hf["seconds"] else f"{r['seconds'] / hf['seconds']:.2f}"

            def val(r):
                return "" if r is None else f"{r['value']:.4g}"

            kv = "" if comp is None or comp.get("kv_fraction") is None else f"{100 * comp['kv_fraction']:.1f}%"
            n = (hf or full or comp)["n"]
            lines.append(
                f"| {task} | {L} | {n} | {sec(hf)} | {sec(full)} | {ratio(full)} | {sec(comp)} | {ratio(comp)} | "
                f"{val(hf)} | {val(full)} | {val(comp)} | {kv} |"
            )
        paths = [
            f"{r['method']} {r['task']}@{r['length']}: {r['generate_batches']['serving']} of "
            f"{sum(r['generate_batches'].values())}"
            for r in rows
            if sum(r.get("generate_batches", {}).values())
        ]
        if paths:
            lines += ["", "generate_until batches through the serving path (the rest through model.generate): "
                      + "; ".join(paths) + "."]  # fmt: skip
        lines += ["", "Targets (wall time of `evaluate`, summed over the units named):", ""]
        for t in targets(data, model):
            verdict = "**met**" if t["met"] else "**not met**"
            each = ", ".join(f"{u} {r:.2f}x {'met' if r <= t['goal'] else 'not met'}" for u, r in t["per_unit"].items())
            lines.append(
                f"- {t['method']} <= {t['goal']}x hf on {t['scope']}: "
                f"{t['seconds']:.1f} s vs {t['hf_seconds']:.1f} s = {t['ratio']:.2f}x: {verdict} (per unit: {each})"
            )
        checks = [c for c in data["checks"] if c["model"] == model]
        if checks:
            lines += ["", "Per-sample checks:", ""]
            for c in checks:
                extra = f", max relative difference {c['max_rel_diff']:.2e}" if "max_rel_diff" in c else ""
                agree = "n/a" if c["agree"] is None else f"{c['agree']:.0%}"
                lines.append(f"- {c['task']}@{c['length']}, {c['what']}: {agree} of {c['n']} samples agree{extra}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = run(args)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
