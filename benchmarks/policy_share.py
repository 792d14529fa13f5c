"""The policy share of prefill (issue 24, part 4): what measuring importance, allocating and evicting cost there.

Mistral-7B shapes with random bf16 weights, ``--batch`` random prompts of ``--prompt-len`` tokens prefilled in
micro-batches (the bench's model and protocol). For each kernel setting (``--kernels``: ``SQUEEZEKIT_KERNELS``
values separated by ``;``) and method (config labels), ``--repeats`` prefills with the device synchronized around
the policy work (the bench's ``policy % of prefill``): the seconds of ``importance``, ``allocation`` and
``eviction``, and their share of the prefill's wall time (after one untimed micro-batch of every method). First,
one layer's importance on a micro-batch of activations, the plain torch path against the fused kernel (time per
call, largest difference of the importance), and lost_attention's allocation over all layers from random keys,
values and window queries of the model's shapes, the plain window outputs against the fused ``window`` kernel,
with each rule (time per call, whether the budgets are the same). ``--profile``: one micro-batch's prefill of the
first method, and one fused lost_attention allocation (``sqrt``), under torch.profiler: what took the most time.

    python benchmarks/policy_share.py --out DIR
    python benchmarks/policy_share.py --out DIR --device cpu --config tiny --batch 4 --prompt-len 256 --micro-batch 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from squeezekit.evaluators import bench_models as bench

DEFAULT_METHODS = "uniform+streaming@0.2,squeeze+streaming@0.2,lost_attention+streaming@0.2"
#: the default kernels, and the same without the fused window outputs (lost_attention's allocation)
DEFAULT_KERNELS = "auto;attention,steady,evict,importance,pooled"


def _timed(fn, device: str, reps: int) -> float:
    """Seconds per call of ``fn`` (after one warm-up call)."""
    fn()
    bench.sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    bench.sync(device)
    return (time.perf_counter() - t0) / reps


def importance_micro(model, micro_batch: int, prompt_len: int, device: str, reps: int) -> dict:
    """One layer's importance on (micro_batch, prompt_len, hidden) activations: plain path vs the fused kernel."""
    from squeezekit import kernels
    from squeezekit.statistics import IMPORTANCE, Importance

    E = model.config.hidden_size
    g = torch.Generator(device=device).manual_seed(0)
    dtype = model.dtype
    hidden = torch.randn(micro_batch, prompt_len, E, generator=g, device=device).to(dtype)
    attended = (0.3 * torch.randn(micro_batch, prompt_len, E, generator=g, device=device)).to(dtype)
    valid = torch.ones(micro_batch, prompt_len, dtype=torch.bool, device=device)
    stat = Importance([])
    out: dict = dict(shape=[micro_batch, prompt_len, E], dtype=str(dtype).removeprefix("torch."))
    results = {}
    for name, setting in (("plain", "off"), ("fused", "importance")):
        stats: dict = {}
        calls = kernels.settings.calls["importance"]
        with kernels.configured(setting):
            out[f"{name}_ms"] = round(1000 * _timed(lambda s=stats: stat.observe_residual(s, hidden, attended, valid),
                                                     device, reps), 3)  # fmt: skip
        results[name] = stats[IMPORTANCE]
        if name == "fused":  # (every timed call took the kernel, or none did)
            out["fused_ran"] = kernels.settings.calls["importance"] > calls
    out["max_abs_diff_importance"] = float((results["fused"] - results["plain"]).abs().max())
    out["speedup"] = round(out["plain_ms"] / max(out["fused_ms"], 1e-9), 2)
    return out


@torch.inference_mode()
def window_micro(model, micro_batch: int, prompt_len: int, device: str, reps: int, profile: bool = False) -> dict:
    """lost_attention's allocation over every layer of (micro_batch, prompt_len) random slots and window queries in
    the model's shapes (streaming at a fifth of the prompt), each rule: the plain window outputs vs the kernel.
    ``profile``: also one fused ``sqrt`` call under torch.profiler (host and device time by operation)."""
    import squeezekit
    from squeezekit import AllocationRequest, LayerView, kernels

    cfg = model.config
    L, H, Hq = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    B, S, W, dtype = micro_batch, prompt_len, 8, model.dtype
    n = torch.full((B,), S, device=device)
    positions = torch.arange(S, device=device).view(1, 1, S).expand(B, H, S).int()
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    views = [
        LayerView(
            keys=rand(B, H, S, D, scale=2.0), values=rand(B, H, S, D), valid=positions >= 0, positions=positions,
            seen=n, budget=n, layer_idx=i, n_layers=L, window_queries=rand(B, H, Hq // H, W, D, scale=2.0),
            window_positions=S - W + torch.arange(W, device=device).view(1, -1).expand(B, W), scaling=D**-0.5,
        )
        for i in range(L)
    ]  # fmt: skip
    registry = squeezekit.registry()
    evictor = registry.get("evictor", "streaming").cls()
    request = AllocationRequest(
        importance=torch.zeros(B, L), total=n.cpu() * L // 5, floor=evictor.floor(), cap=n.cpu(), layers=views,
        evictor=evictor,
    )  # fmt: skip
    out: dict = dict(shape=[L, B, H, S, D], dtype=str(dtype).removeprefix("torch."), window=W)
    for rule in ("sqrt", "greedy"):
        allocator = registry.get("allocator", "lost_attention").cls(rule=rule)
        row: dict = {}
        budgets = {}
        for name, setting in (("plain", "off"), ("fused", "window")):
            calls = kernels.settings.calls["window"]
            with kernels.configured(setting):
                row[f"{name}_ms"] = round(1000 * _timed(lambda a=allocator: a.allocate(request), device, reps), 2)
                budgets[name] = allocator.allocate(request)
            if name == "fused":
                row["fused_ran"] = kernels.settings.calls["window"] > calls
                if profile and rule == "sqrt":
                    with kernels.configured(setting):
                        row["profile"] = _profiled(lambda a=allocator: a.allocate(request), device)
        row["same_budgets"] = bool(torch.equal(budgets["plain"], budgets["fused"]))
        row["speedup"] = round(row["plain_ms"] / max(row["fused_ms"], 1e-9), 2)
        out[rule] = row
    return out


@torch.inference_mode()
def prefill_once(model, config, ids: torch.Tensor, micro_batch: int, device: str) -> dict:
    import squeezekit
    from squeezekit import kernels
    from squeezekit.batching import prefill

    before = dict(kernels.settings.calls)
    with squeezekit.compress(model, config) as comp:
        comp.sync_timings = device.startswith("cuda")
        bench.sync(device)
        t0 = time.perf_counter()
        cache, logits = prefill(model, comp, ids, None, micro_batch=micro_batch)
        bench.sync(device)
        seconds = time.perf_counter() - t0
        timings = dict(comp.summary()["timings"])
        del cache, logits
    policy = sum(timings.values())
    return dict(
        prefill_s=round(seconds, 3), policy_s={k: round(v, 4) for k, v in timings.items()},
        policy_share=round(policy / seconds, 4),
        fused=sorted(k for k, n in kernels.settings.calls.items() if n > before.get(k, 0)),  # the kernels that ran
    )  # fmt: skip


def _profiled(fn, device: str, rows: int = 22) -> str:
    """One call of ``fn`` under torch.profiler: the operations that took the most time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        fn()
        bench.sync(device)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def profile(model, config, ids: torch.Tensor, device: str, rows: int = 25) -> str:
    """The device kernels that took the most time in one prefill of ``ids`` (one micro-batch)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    prefill_once(model, config, ids, ids.shape[0], device)  # warm-up
    with torch_profile(activities=activities) as prof:
        prefill_once(model, config, ids, ids.shape[0], device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def table(result: dict) -> str:
    m = result["importance_micro"]
    lines = [
        f"# policy share of prefill: {result['config']} on {result['device']}",
        "",
        f"torch {result['torch']}, transformers {result['transformers']}; B = {result['batch']} x "
        f"{result['prompt_len']} tokens, micro-batches of {result['micro_batch']}.",
        "",
        f"One layer's importance on {m['shape']} {m['dtype']}: plain {m['plain_ms']} ms, fused {m['fused_ms']} ms "
        f"({m['speedup']}x; fused kernel ran: {m['fused_ran']}); largest difference of the importance "
        f"{m['max_abs_diff_importance']:.2e}.",
        "",
    ]
    w = result.get("window_micro")
    if w:
        shape = "x".join(map(str, w["shape"]))
        lines += [
            f"lost_attention's allocation over (layers, B, KV heads, slots, head dim) = {shape} {w['dtype']}, "
            f"window {w['window']}:",
            "",
            "| rule | plain ms | fused window kernel ms | speed-up | kernel ran | same budgets |",
            "|---|---|---|---|---|---|",
            *(
                f"| {rule} | {w[rule]['plain_ms']} | {w[rule]['fused_ms']} | {w[rule]['speedup']}x | "
                f"{w[rule]['fused_ran']} | {w[rule]['same_budgets']} |"
                for rule in ("sqrt", "greedy")
            ),
            "",
        ]
    lines += [
        "| kernels | method | repeat | prefill s | importance s | allocation s | eviction s | policy % of prefill "
        "| fused kernels that ran |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        p = r["policy_s"]
        lines.append(
            f"| {r['kernels']} | {r['method']} | {r['repeat']} | {r['prefill_s']} | {p.get('importance', 0):.4f} | "
            f"{p.get('allocation', 0):.4f} | {p.get('eviction', 0):.4f} | {100 * r['policy_share']:.2f} | "
            f"{', '.join(r.get('fused', [])) or '-'} |"
        )
    if result.get("profile"):
        lines += ["", "One micro-batch's prefill under torch.profiler:", "", "```", result["profile"], "```"]
    window_profile = result.get("window_micro", {}).get("sqrt", {}).get("profile")
    if window_profile:
        lines += ["", "lost_attention's allocation (fused, `sqrt`) under torch.profiler:", "", "```", window_profile,
                  "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/policy_share.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for policy_share.json and policy_share.md")
    parser.add_argument("--config", default="mistral-7b", help="a named config of squeezekit bench")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated config labels")
    parser.add_argument("--kernels", default=DEFAULT_KERNELS, help="SQUEEZEKIT_KERNELS settings, separated by ';'")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="calls timed in the importance micro-benchmark")
    parser.add_argument(
        "--window-reps", type=int, default=3, help="calls timed in the window micro-benchmark (0: skip it)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one micro-batch's prefill and one fused lost_attention allocation",
    )
    args = parser.parse_args(argv)
    import transformers

    from squeezekit import Config, kernels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = bench.build_model(args.config, args.device, dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    result: dict = dict(
        config=args.config, device=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__, transformers=transformers.__version__, batch=args.batch, prompt_len=args.prompt_len,
        micro_batch=args.micro_batch, runs=[],
    )  # fmt: skip
    result["importance_micro"] = importance_micro(model, args.micro_batch, args.prompt_len, args.device, args.reps)
    if args.window_reps:
        result["window_micro"] = window_micro(model, args.micro_batch, args.prompt_len, args.device, args.window_reps,
                                              args.profile)  # fmt: skip
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    for label in labels:  # warm-up (first uses: CUDA kernels, Triton compiles, imports), not timed
        prefill_once(model, Config.from_label(label, source="--methods"), ids[: args.micro_batch], args.micro_batch,
                     args.device)  # fmt: skip
    for setting in [k.strip() for k in args.kernels.split(";") if k.strip()]:
        with kernels.configured(setting):
            for label in labels:
                config = Config.from_label(label, source="--methods")
                for repeat in range(args.repeats):
                    run = prefill_once(model, config, ids, args.micro_batch, args.device)
                    result["runs"].append(dict(kernels=setting, method=label, repeat=repeat + 1, **run))
                    print(json.dumps(result["runs"][-1]), flush=True)
                    (out / "policy_share.json").write_text(json.dumps(result, indent=1))
    if args.profile:
        result["profile"] = profile(model, Config.from_label(labels[0]), ids[: args.micro_batch], args.device)
    (out / "policy_share.json").write_text(json.dumps(result, indent=1))
    (out / "policy_share.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
