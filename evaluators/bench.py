"""``squeezekit bench``: throughput and memory of the full-cache transformers baseline and squeezekit combos, side by
side in one process, on random-weight models built from named configs (or a local model directory).

Protocol (same as the shared Hugging Face baseline): greedy decoding of ``--new-tokens`` tokens after random
``--prompt-len``-token prompts. Baseline: ``model.generate`` with transformers' DynamicCache, prefill time = time of
``generate(1)``, decode tok/s = B x (N - 1) / (time of ``generate(N)`` - prefill). squeezekit: micro-batched prefill
(each micro-batch compressed right after its prefill, then merged), then squeezekit's greedy decoder (CUDA graph
when every layer is steady). Each method runs at growing batch sizes until it runs out of memory (or the cap).
``--peer-kvpress SITE`` first times NVIDIA kvpress's StreamingLLMPress with the baseline's protocol, in its own
process (evaluators/peer_kvpress.py: kvpress needs transformers < 5.3).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGS = {
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=None,
    ),
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=32768,
    ),
    "llama-2-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
    ),
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
    ),
}
AUTO_BATCHES = [1, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024]


@dataclass
class Method:
    name: str  # "hf" or "squeeze+streaming@0.2"
    allocator: str | None = None
    evictor: str | None = None
    budget: float = 1.0
    batches: list[int] | None = None  # this method's own batch sizes ("METHOD:8/16/32"), else --batches
    chunk: int | None = None  # this method's own chunked prefill ("METHOD~1024"), else --prefill-chunk

    @classmethod
    def parse(cls, text: str) -> Method:
        text, _, sizes = text.partition(":")
        batches = [int(b) for b in sizes.split("/")] if sizes else None
        if text == "hf":
            return cls("hf", batches=batches)
        spec, _, chunk = text.partition("~")
        combo, _, budget = spec.partition("@")
        allocator, _, evictor = combo.partition("+")
        return cls(text, allocator, evictor, float(budget or 0.2), batches, int(chunk) if chunk else None)


def build_model(name: str, device: str, dtype: torch.dtype, gpus: int = 1):
    """A random-weight model from a named config (sharded layer-wise over ``gpus`` GPUs with accelerate), or a local
    directory's weights."""
    import transformers as tf

    if name in CONFIGS:
        spec = dict(CONFIGS[name])
        config = tf.AutoConfig.for_model(**spec)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        if gpus > 1:
            model = _sharded_random_model(config, dtype, gpus)
        else:
            with torch.device(device):
                model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        kwargs = dict(device_map="balanced") if gpus > 1 else {}
        model = tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **kwargs)
        if gpus <= 1:
            model = model.to(device)
    model.eval()
    model.generation_config.eos_token_id = None  # fixed-length generations
    model.generation_config.pad_token_id = 0
    return model


def layer_device_map(n_layers: int, gpus: int, prefix: str = "model") -> dict[str, int]:
    """Contiguous blocks of decoder layers per GPU (accelerate's device_map format); embeddings on the first GPU,
    final norm and LM head on the last."""
    per = -(-n_layers // gpus)
    device_map = {f"{prefix}.embed_tokens": 0, f"{prefix}.rotary_emb": 0}
    device_map.update({f"{prefix}.layers.{i}": i // per for i in range(n_layers)})
    device_map.update({f"{prefix}.norm": gpus - 1, "lm_head": gpus - 1})
    return device_map


def _sharded_random_model(config, dtype, gpus: int):
    """Build on the meta device, materialise each part directly on its GPU with random weights, dispatch."""
    import transformers as tf
    from accelerate import dispatch_model

    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    device_map = layer_device_map(config.num_hidden_layers, gpus)
    for name, dev in device_map.items():
        module = model.get_submodule(name)
        module.to_empty(device=f"cuda:{dev}")
        for pname, param in module.named_parameters():
            with torch.no_grad():
                param.fill_(1.0) if "norm" in pname else param.normal_(0.0, config.initializer_range)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config, device="cuda:0")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return dispatch_model(model, device_map=device_map, skip_keys=model._skip_keys_device_placement)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _allocated_gib(device: str) -> float:
    """Memory allocated now (weights, inputs), summed over all GPUs."""
    if not device.startswith("cuda"):
        return float("nan")
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30


def _peak_gib(device: str) -> float:
    """Peak allocated memory, summed over all GPUs (a sharded model uses several)."""
    if not device.startswith("cuda"):
        return float("nan")
    return round(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30, 2)


def copy_bandwidth(device: str) -> float:
    """Measured device memory bandwidth in bytes/s (bytes read + written by a large copy)."""
    if not device.startswith("cuda"):
        return float("nan")
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    _sync(device)
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    _sync(device)
    bw = 2 * a.numel() * a.element_size() * 20 / (time.perf_counter() - t)
    del a, b
    return bw


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


@torch.inference_mode()
def run_hf(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    _peak_reset(device)
    before = _allocated_gib(device)
    _sync(device)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    _sync(device)
    prefill = time.perf_counter() - t
    prefill_mem = round(_peak_gib(device) - before, 2)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    total = time.perf_counter() - t
    B, L = ids.shape
    assert out.shape[1] == L + new_tokens
    decode = max(total - prefill, 1e-9)
    full_kv = B * L * kv_bytes_per_token(model)
    return dict(
        prefill_s=round(prefill, 3), total_s=round(total, 3), decode_tok_s=round(B * (new_tokens - 1) / decode, 1),
        e2e_tok_s=round(B * new_tokens / total, 1), step_ms=round(1000 * decode / (new_tokens - 1), 2),
        peak_gib=_peak_gib(device), prefill_mem_gib=prefill_mem, kv_bytes=full_kv, kv_bytes_peak_prefill=full_kv,
        tokens=out[:, L:],
    )


@torch.inference_mode()
def run_squeezekit(
    model, ids, new_tokens, device, method: Method, micro_batch: int, cuda_graph: bool, chunk: int | None = None
) -> dict:
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    _peak_reset(device)
    before = _allocated_gib(device)
    chunk = method.chunk or chunk or None
    with squeezekit.compress(model, allocator=method.allocator, evictor=method.evictor, budget=method.budget) as comp:
        comp.sync_timings = device.startswith("cuda")
        _sync(device)
        t0 = time.perf_counter()
        cache, logits = prefill(model, comp, ids, None, micro_batch=micro_batch, chunk=chunk)
        first = logits.argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        peak_prefill = _peak_gib(device)
        decoder = GreedyDecoder(model, cache, first, cuda_graph=cuda_graph)
        rest = decoder.run(new_tokens - 1)
        _sync(device)
        t2 = time.perf_counter()
        s = comp.summary()
    B, L = ids.shape
    overhead = sum(s["timings"].values())
    return dict(
        prefill_s=round(t1 - t0, 3), total_s=round(t2 - t0, 3), decode_tok_s=round(B * (new_tokens - 1) / (t2 - t1), 1),
        e2e_tok_s=round(B * new_tokens / (t2 - t0), 1), step_ms=round(1000 * (t2 - t1) / (new_tokens - 1), 2),
        peak_gib=_peak_gib(device), peak_prefill_gib=peak_prefill, prefill_mem_gib=round(peak_prefill - before, 2),
        kv_bytes=s["kv_bytes_kept"], kv_bytes_full=s["kv_bytes_full"], kv_bytes_peak_prefill=s["kv_bytes_peak_prefill"],
        prefill_chunk=chunk, cuda_graph=decoder.graph is not None,
        policy_s={k: round(v, 4) for k, v in s["timings"].items()}, policy_share_of_prefill=round(overhead / max(t1 - t0, 1e-9), 4),
        mean_budget=round(s["mean_budget"], 1), tokens=torch.cat([first[:, None], rest], dim=1),
    )


@torch.inference_mode()
def profile_decode(model, ids, device, method: Method, micro_batch: int, steps: int = 4) -> str:
    """Top CUDA kernels of a few eager (uncaptured) decode steps: where a step's time goes."""
    import squeezekit
    from squeezekit.batching import prefill
    from squeezekit.decoding import GreedyDecoder

    with squeezekit.compress(model, allocator=method.allocator, evictor=method.evictor, budget=method.budget) as comp:
        cache, logits = prefill(model, comp, ids, None, micro_batch=micro_batch)
        decoder = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False)
        decoder.run(2)
        _sync(device)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            decoder.run(steps)
            _sync(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_peer_kvpress(args) -> list[dict]:
    """kvpress's StreamingLLMPress at the same budget, in its own process (it needs transformers < 5.3): one run
    per ``--peer-batches`` size, until one runs out of memory. Runs before squeezekit's model exists, so both see
    the whole GPU."""
    import os
    import subprocess
    import sys

    if args.config not in CONFIGS:
        raise SystemExit("--peer-kvpress needs a named config (the peer builds the same random model)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.peer_kvpress, os.environ.get("PYTHONPATH")]))}
    cmd = [
        sys.executable, str(Path(__file__).with_name("peer_kvpress.py")), "--config", args.config,
        "--device", args.device, "--dtype", args.dtype, "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--batches", args.peer_batches, "--budget", str(args.peer_budget),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for r in runs:
        print(json.dumps(r), flush=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the kvpress peer failed (exit {done.returncode})")
    return runs


def bench(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    peer = run_peer_kvpress(args) if args.peer_kvpress else []
    model = build_model(args.config, device, dtype, args.gpus)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    methods = [Method.parse(m) for m in args.methods.split(",")]
    batches = AUTO_BATCHES if args.batches == "auto" else [int(b) for b in args.batches.split(",")]
    gpu_name = f"{args.gpus} x {torch.cuda.get_device_name()}" if args.gpus > 1 else torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    results = {"config": args.config, "device": gpu_name, "gpus": args.gpus,
               "torch": torch.__version__, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "weight_bytes": weight_bytes, "copy_bandwidth_Bps": bandwidth, "runs": [], "checks": []}

    def floor_step_ms(kv_bytes: int) -> float:  # a decode step reads every weight and every kept KV byte once
        return round(1000 * (weight_bytes + kv_bytes) / bandwidth, 2) if bandwidth == bandwidth else float("nan")

    for r in peer:  # measured first, in their own process (see run_peer_kvpress)
        if not r.get("oom"):
            r["floor_step_ms"] = floor_step_ms(r["kv_bytes"])
        results["runs"].append(r)
    import transformers

    import squeezekit

    results["transformers"] = transformers.__version__
    from tqdm import tqdm

    # Correctness first, on the same inputs: the full budget against transformers (prefill logits, greedy tokens),
    # and each compressed fast path (micro-batches + decoder/CUDA graph) against squeezekit through model.generate.
    # --check-batch 0 skips the checks.
    if args.check_batch > 0:
        check_ids = torch.randint(1, vocab, (args.check_batch, args.prompt_len), generator=g).to(device)
        ref = run_hf(model, check_ids, args.check_tokens, device)["tokens"]
        full = Method.parse("squeeze+streaming@1.0")
        got = run_squeezekit(model, check_ids, args.check_tokens, device, full, args.check_batch, args.cuda_graph)
        with torch.inference_mode():
            hf_logits = model(check_ids).logits[:, -1].float()
            with squeezekit.compress(model, budget=1.0):
                sk_logits = model(check_ids, use_cache=True).logits[:, -1].float()
        results["checks"].append({
            "method": full.name, "reference": "transformers full cache",
            "token_agreement": round(float((got["tokens"] == ref).float().mean()), 4),
            "prefill_logits_max_abs_diff": round(float((sk_logits - hf_logits).abs().max()), 5),
            "logit_scale": round(float(hf_logits.abs().max()), 3),
        })
        print(json.dumps(results["checks"][-1]), flush=True)
        # A chunked prefill measures importance on the first chunk, so it has no unchunked reference to agree with (its
        # exactness at budget 1 is tested on CPU: tests/test_fast_path.py).
        for method in [m for m in methods if m.name != "hf" and not m.chunk]:
            fast = run_squeezekit(model, check_ids, args.check_tokens, device, method, 1, args.cuda_graph)["tokens"]
            with torch.inference_mode(), squeezekit.compress(
                model, allocator=method.allocator, evictor=method.evictor, budget=method.budget
            ):
                slow = model.generate(check_ids, max_new_tokens=args.check_tokens, min_new_tokens=args.check_tokens, do_sample=False)
            slow = slow[:, check_ids.shape[1]:]
            results["checks"].append({
                "method": method.name, "reference": "squeezekit through model.generate (no micro-batches, no CUDA graph)",
                "token_agreement": round(float((fast == slow).float().mean()), 4),
            })
            print(json.dumps(results["checks"][-1]), flush=True)

    for method in methods:
        for B in tqdm(method.batches or batches, desc=method.name, unit="batch"):
            ids = torch.randint(1, vocab, (B, args.prompt_len), generator=g).to(device)
            oom = False
            try:
                if method.name == "hf":
                    r = run_hf(model, ids, args.new_tokens, device)
                else:
                    r = run_squeezekit(
                        model, ids, args.new_tokens, device, method, args.micro_batch, args.cuda_graph, args.prefill_chunk
                    )
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _oom(exc):
                    raise
                oom = True
            del ids
            if oom:  # outside the except block, so the traceback's frames (and their tensors) can be freed
                _peak_reset(device)
                results["runs"].append({"method": method.name, "B": B, "oom": True})
                print(json.dumps(results["runs"][-1]), flush=True)
                break
            r.pop("tokens")
            r.update(method=method.name, B=B, floor_step_ms=floor_step_ms(r["kv_bytes"]))
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
            if args.out:
                write_reports(results, Path(args.out))  # after every run: a later crash keeps what was measured
            if args.memory_cap_gib and r["peak_gib"] > args.memory_cap_gib:
                break
    if args.profile_batch:
        method = next(m for m in methods if m.name != "hf")
        ids = torch.randint(1, vocab, (args.profile_batch, args.prompt_len), generator=g).to(device)
        results["profile"] = profile_decode(model, ids, device, method, args.micro_batch)
    return results


def write_reports(results: dict, out: Path) -> None:
    """results.json, a markdown table and a PNG of decode throughput vs batch size."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{results['config']}" + (f"-{results['gpus']}gpu" if results.get("gpus", 1) > 1 else "")
    if "profile" in results:
        (out / f"profile-{stem[6:]}.txt").write_text(results["profile"])
    (out / f"{stem}.json").write_text(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))
    rows = [
        "| method | B | prefill s | decode tok/s | end-to-end tok/s | step ms | floor ms | peak GiB | KV GiB "
        "| prefill peak KV GiB | policy % of prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r.get("oom"):
            rows.append(f"| {r['method']} | {r['B']} | OOM | | | | | | | | |")
            continue
        share = r.get("policy_share_of_prefill")
        peak_kv = r.get("kv_bytes_peak_prefill")
        rows.append(
            f"| {r['method']} | {r['B']} | {r['prefill_s']} | {r['decode_tok_s']} | {r['e2e_tok_s']} | {r['step_ms']} | "
            f"{r['floor_step_ms']} | {r['peak_gib']} | {r['kv_bytes'] / 2**30:.2f} | "
            f"{'' if peak_kv is None else f'{peak_kv / 2**30:.2f}'} | {'' if share is None else f'{100 * share:.1f}'} |"
        )
    checks = "\n".join(
        f"- {c['method']} vs {c['reference']}: {100 * c['token_agreement']:.1f}% of greedy tokens agree"
        + (f"; prefill logits max abs diff {c['prefill_logits_max_abs_diff']} (logits up to {c['logit_scale']})" if "logit_scale" in c else "")
        for c in results["checks"]
    )
    (out / f"{stem}.md").write_text(
        f"# squeezekit bench: {results['config']} on {results['device']}\n\n"
        f"torch {results['torch']}, transformers {results['transformers']}, prompts {results['prompt_len']} tokens, "
        f"{results['new_tokens']} new tokens, copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s.\n\n"
        + "\n".join(rows) + "\n\nCorrectness (same inputs):\n\n" + checks + "\n"
    )
    from squeezekit.plotting import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for name in dict.fromkeys(r["method"] for r in results["runs"]):
        pts = [(r["B"], r["decode_tok_s"]) for r in results["runs"] if r["method"] == name and not r.get("oom")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"{results['config']}, {results['prompt_len']}-token prompts, {results['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png")
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="throughput and memory: transformers' full cache vs squeezekit combos")
    p.add_argument("--config", default="mistral-7b", help=f"named config ({', '.join(CONFIGS)}) or a local model dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--gpus", type=int, default=1, help="shard the model's layers over this many GPUs (accelerate)")
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="auto", help="comma-separated batch sizes, or 'auto' (grow until OOM)")
    p.add_argument(
        "--methods", default="hf,squeeze+streaming@0.2",
        help="comma-separated: hf or ALLOC+EVICT@BUDGET, optionally with its own chunked prefill (ALLOC+EVICT@BUDGET~1024) and batch sizes (METHOD:8/16/32)",
    )
    p.add_argument("--micro-batch", type=int, default=16, help="squeezekit prefill micro-batch")
    p.add_argument("--prefill-chunk", type=int, default=0, help="squeezekit chunked prefill: tokens per chunk (0 = off)")
    p.add_argument("--memory-cap-gib", type=float, default=0.0)
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--check-tokens", type=int, default=16)
    p.add_argument("--profile-batch", type=int, default=0, help="also profile eager decode steps at this batch size")
    p.add_argument(
        "--peer-kvpress", default=None, metavar="SITE",
        help="also time kvpress's StreamingLLMPress, in its own process with SITE (kvpress + transformers<5.3) first on "
        "PYTHONPATH, before squeezekit's runs",
    )  # fmt: skip
    p.add_argument("--peer-batches", default="48,64,96", help="batch sizes of the kvpress peer")
    p.add_argument("--peer-budget", type=float, default=0.2, help="fraction of the prompt's KV the kvpress peer keeps")
    p.add_argument("--out", default="docs/benchmarks")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    results = bench(args)
    write_reports(results, Path(args.out))
    print(f"wrote {args.out}/bench-{args.config}.{{json,md,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m squeezekit.evaluators.bench ...``: the same as ``squeezekit bench ...``."""
    import sys

    parser = argparse.ArgumentParser(prog="squeezekit bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return _run(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
