"""``squeezekit generate``: the main job, on the embedded default model or any local model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    from .cli import add_config_flags

    p = sub.add_parser("generate", help="generate text with a compressed KV cache and report the memory it kept")
    p.add_argument("prompt", help="the prompt (the question, when --context is given)")
    p.add_argument("--context", metavar="FILE", help="a text file placed before the prompt (a document to work on)")
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend")
    p.add_argument("--plot", metavar="PNG", help="write a plot of per-layer importance and budgets")
    add_config_flags(p)
    p.set_defaults(func=run)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_line(summary: dict, new_tokens: int) -> str:
    full, kept, now = summary["kv_bytes_full"], summary["kv_bytes_kept"], summary["kv_bytes_now"]
    prompt = int(summary["prompt_len"].max())
    grown = full * (prompt + new_tokens) / max(prompt, 1)
    if summary["max_budget"] < 0:  # budget 1: nothing is ever evicted
        return f"KV cache: full, nothing evicted ({_mib(full)} after prefill, buffers {_mib(now)} after {new_tokens} new tokens)"
    return (
        f"KV cache: {_mib(kept)} kept of {_mib(full)} full after prefill ({100 * kept / max(full, 1):.1f}%), "
        f"{_mib(now)} after {new_tokens} new tokens (full cache: {_mib(int(grown))}); "
        f"per-layer budget mean {summary['mean_budget']:.1f}, min {summary['min_budget']}, max {summary['max_budget']} tokens"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli import config_from_args
    from .compressor import compress
    from .models import load_model

    config = config_from_args(args)
    model, tokenizer = load_model(args.model, attn_implementation=args.attn)
    text = args.prompt
    if args.context:
        text = Path(args.context).read_text(errors="replace").strip() + "\n\n" + text
    if not args.raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer([text], return_tensors="pt")
    with torch.inference_mode(), compress(model, config) as compressor:
        out = model.generate(
            **ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        summary = compressor.summary()
    new = out[0, ids["input_ids"].shape[1] :]
    print(tokenizer.decode(new, skip_special_tokens=True).strip())
    print(f"[{config.describe()}, prompt {ids['input_ids'].shape[1]} tokens] {summary_line(summary, len(new))}", file=sys.stdout)
    if args.plot:
        from .plotting import plot_layers

        budgets = summary["budgets"][0].clone()
        budgets[budgets < 0] = int(summary["prompt_len"][0])
        path = plot_layers(summary["importance"][0].tolist(), budgets.tolist(), args.plot, config.describe())
        print(f"plot: {path}")
    return 0
