"""``squeezekit generate``: the main job, on the embedded default model or any local model directory."""

from __future__ import annotations

import argparse
import sys

from .cli_options import add_config_flags, add_model_option, plot_path, positive_int, text_file


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate text with a compressed KV cache and print one summary line: the KV bytes kept against the full "
        "cache's, and the mean / min / max per-layer budget."
    )
    parser.add_argument("prompt", help="the prompt (the question, when --context is given)")
    parser.add_argument("--context", metavar="FILE", type=text_file, help="a text file placed before the prompt")
    add_model_option(parser)
    parser.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=64, help="tokens to generate")
    parser.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend")
    parser.add_argument(
        "--plot", metavar="FILE", type=plot_path, help="also plot per-layer importance and budgets (.png, .pdf, .svg)"
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


EMPTY = "the prompt has no tokens once tokenized; give a non-empty prompt"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_line(summary: dict, new_tokens: int) -> str:
    full, kept, now = summary["kv_bytes_full"], summary["kv_bytes_kept"], summary["kv_bytes_now"]
    prompt = int(summary["prompt_len"].max())
    grown = full * (prompt + new_tokens) / max(prompt, 1)
    if summary["max_budget"] < 0:  # budget 1: nothing is ever evicted
        return (
            f"KV cache: full, nothing evicted ({_mib(full)} after prefill, "
            f"buffers {_mib(now)} after {new_tokens} new tokens)"
        )
    return (
        f"KV cache: {_mib(kept)} kept of {_mib(full)} full after prefill ({100 * kept / max(full, 1):.1f}%), "
        f"{_mib(now)} after {new_tokens} new tokens (full cache: {_mib(int(grown))}); "
        f"per-layer budget mean {summary['mean_budget']:.1f}, min {summary['min_budget']}, "
        f"max {summary['max_budget']} tokens"
    )


class _Progress:
    """A transformers streamer that shows generation progress on stderr (a terminal only)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generating", unit="token", file=sys.stderr, disable=None, leave=False)
        self.prompt_seen = False

    def put(self, value: object) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        self.bar.update(1)

    def end(self) -> None:
        self.bar.close()


def _status(text: str) -> None:
    if sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from .cli_options import config_from_args
    from .errors import InputError

    config = config_from_args(args)  # a bad config fails before the model loads
    if args.raw and not args.prompt.strip() and not args.context:
        raise InputError(EMPTY)
    text = args.prompt
    if args.context:
        try:
            text = args.context.read_text(errors="replace").strip() + "\n\n" + text
        except OSError as exc:
            raise InputError(f"--context {args.context}: cannot be read: {exc.strerror or exc}") from None
    _status("squeezekit: loading the model ...")
    import torch

    from .compressor import compress
    from .models import load_model

    model, tokenizer = load_model(args.model, attn_implementation=args.attn)
    if not args.raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer([text], return_tensors="pt")
    if ids["input_ids"].shape[1] == 0:
        raise InputError(EMPTY)
    _status(f"squeezekit: prefilling {ids['input_ids'].shape[1]} tokens ...")
    with torch.inference_mode(), compress(model, config) as compressor:
        out = model.generate(
            **ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            streamer=_Progress(args.max_new_tokens),
        )  # fmt: skip
        summary = compressor.summary()
    new = out[0, ids["input_ids"].shape[1] :]
    print(tokenizer.decode(new, skip_special_tokens=True).strip())
    print(f"[{config.describe()}, prompt {ids['input_ids'].shape[1]} tokens] {summary_line(summary, len(new))}")
    if args.plot:
        from .plotting import plot_layers

        budgets = summary["budgets"][0].clone()
        budgets[budgets < 0] = int(summary["prompt_len"][0])
        path = plot_layers(summary["importance"][0].tolist(), budgets.tolist(), args.plot, config.describe())
        print(f"plot: {path}")
    return 0
