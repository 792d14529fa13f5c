"""``squeezekit generate``: the main job, on the embedded default model or any local model directory."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_options import add_config_flags, add_device_options, add_model_option, plot_path, positive_int, text_file


def add(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate text greedily (deterministic: the most likely token at every step) with a compressed KV cache, and "
        "print one summary line: the KV bytes kept against the full cache's, and the mean / min / max per-layer "
        "budget. A prompt too short for the budget (it would keep fewer tokens per layer than the evictor's floor) "
        "needs no compression: it is kept whole, and the summary says so. With --compare, the same prompt also runs "
        "with the full cache, and the summary says whether the answers agree."
    )
    parser.add_argument("prompt", help="the prompt (the question, when --context is given)")
    parser.add_argument("--context", metavar="FILE", type=text_file, help="a text file placed before the prompt")
    add_model_option(parser)
    add_device_options(parser)
    parser.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=64, help="tokens to generate")
    parser.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention backend")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also generate with the full cache (budget 1) and say whether the answer is the same",
    )
    parser.add_argument(
        "--plot", metavar="FILE", type=plot_path, help="also plot per-layer importance and budgets (.png, .pdf, .svg)"
    )
    add_config_flags(parser)
    parser.set_defaults(func=run)


EMPTY = "the prompt has no tokens once tokenized; give a non-empty prompt"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_line(summary: dict, new_tokens: int, note: str = "") -> str:
    """One line: the KV bytes after prefill and at the end, against the full cache's, and the per-layer budgets.

    ``kv_bytes_held`` counts the keys and values of the tokens held; a full cache's buffers are allocated a few slots
    ahead (they grow in steps), which ``kv_bytes_now`` counts, and the line says so where it differs."""
    full, kept, held, now = (summary[k] for k in ("kv_bytes_full", "kv_bytes_kept", "kv_bytes_held", "kv_bytes_now"))
    prompt = int(summary["prompt_len"].max())
    grown = full * (prompt + new_tokens) / max(prompt, 1)
    ahead = f" ({_mib(now)} allocated: buffers grow a few slots at a time)" if now > held else ""
    if summary["max_budget"] < 0:  # budget 1: nothing is ever evicted
        return (
            f"KV cache: full, nothing evicted: {_mib(full)} after prefill, {_mib(held)} after {new_tokens} new "
            f"tokens{ahead}"
        )
    line = (
        f"KV cache: {_mib(kept)} kept of {_mib(full)} full after prefill ({100 * kept / max(full, 1):.1f}%), "
        f"{_mib(held)} after {new_tokens} new tokens (full cache: {_mib(int(grown))}){ahead}; "
        f"per-layer budget mean {summary['mean_budget']:.1f}, min {summary['min_budget']}, "
        f"max {summary['max_budget']} tokens"
    )
    low, high = summary.get("min_head_budget", -1), summary.get("max_head_budget", -1)
    if (low, high) != (summary["min_budget"], summary["max_budget"]) and low >= 0:
        line += f"; per-head budget min {low}, max {high} tokens"
    return f"{line}; {note}" if note else line


def comparison_line(tokens: list[int], reference: list[int], kept: int, full: int) -> str:
    """Whether the compressed cache's answer is the full cache's, and at what share of its memory."""
    memory = f"with {100 * kept / max(full, 1):.0f}% of its KV cache after prefill ({_mib(kept)} of {_mib(full)})"
    if tokens == reference:
        return f"compared with the full cache: the same answer ({len(tokens)} tokens), {memory}"
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), None)
    if same is None:
        same = min(len(tokens), len(reference))
    return f"compared with the full cache: the answers part after {same} of {len(reference)} tokens, {memory}"


class _Streamer:
    """A transformers streamer counting generated tokens into a `squeezekit.progress.Progress`."""

    def __init__(self, total: int):
        self.total = total
        self.bar: Any = None
        self.prompt_seen = False

    def put(self, value: object) -> None:
        from .progress import progress

        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        if self.bar is None:  # the first new token: the prefill is over
            self.bar = progress(self.total, "generating", unit="token")
        self.bar.update(1)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prefill_progress(model: Any, tokens: int) -> Any:
    """Progress over the decoder layers during the prefill (the one long forward), removed after it."""
    from .architectures import resolve
    from .progress import progress

    layers = resolve(model).layers
    bar = progress(len(layers), f"prefilling {tokens} tokens", unit="layer")
    handles: list[Any] = []

    def done(module: Any, args: Any, output: Any) -> None:
        bar.update(1)
        if bar.n >= len(layers):
            bar.close()
            for handle in handles:
                handle.remove()

    handles.extend(layer.register_forward_hook(done) for layer in layers)
    return handles


def _generate(model: Any, tokenizer: Any, ids: dict, config: Any, max_new: int) -> tuple[list[int], dict]:
    import torch

    from .compressor import compress

    handles = _prefill_progress(model, int(ids["input_ids"].shape[1]))
    try:
        with torch.inference_mode(), compress(model, config) as compressor:
            out = model.generate(
                **ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                streamer=_Streamer(max_new),
            )  # fmt: skip
            summary = compressor.summary()
    finally:
        for handle in handles:
            handle.remove()
    return out[0, ids["input_ids"].shape[1] :].tolist(), summary


def run(args: argparse.Namespace) -> int:
    from . import devices
    from .allocation import short_prompt_note
    from .cli_options import config_from_args
    from .compressor import check_environment
    from .errors import InputError
    from .progress import quiet_transformers, status

    config = config_from_args(args)  # a bad config (or environment, device) fails before the model loads
    check_environment()
    device, dtype = devices.resolve(args.device, args.dtype)
    if args.raw and not args.prompt.strip() and not args.context:
        raise InputError(EMPTY)
    text = args.prompt
    if args.context:
        try:
            text = args.context.read_text(errors="replace").strip() + "\n\n" + text
        except OSError as exc:
            raise InputError(f"--context {args.context}: cannot be read: {exc.strerror or exc}") from None
    status(f"loading the model ({device}, {dtype}) ...")
    quiet_transformers()
    import torch

    from .config import Config
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype), device=device, attn_implementation=args.attn)
    if not args.raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer([text], return_tensors="pt")
    if ids["input_ids"].shape[1] == 0:
        raise InputError(EMPTY)
    ids = {k: v.to(device) for k, v in ids.items()}
    prompt_len = int(ids["input_ids"].shape[1])
    tokens, summary = _generate(model, tokenizer, ids, config, args.max_new_tokens)
    print(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    note = ""
    if not config.full and bool(summary["kept_whole"].all()):
        floor = max(1, config.build_evictor().floor())
        note = short_prompt_note(prompt_len, config.budget, floor, config.evictor) or "prompt kept whole"
    print(f"[{config.describe()}, prompt {prompt_len} tokens] {summary_line(summary, len(tokens), note)}")
    if args.compare:
        full = Config.from_mapping({**config.as_dict(), "budget": 1}, source="--compare")
        status("generating again with the full cache ...")
        reference, full_summary = _generate(model, tokenizer, ids, full, args.max_new_tokens)
        if reference != tokens:
            print(f"full cache: {tokenizer.decode(reference, skip_special_tokens=True).strip()}")
        print(comparison_line(tokens, reference, summary["kv_bytes_kept"], full_summary["kv_bytes_full"]))
    if args.plot:
        from .plotting import plot_layers

        budgets = summary["budgets"][0].clone()
        budgets[budgets < 0] = int(summary["prompt_len"][0])
        heads = summary["head_budgets"][0]
        split = heads.tolist() if bool((heads.amax(-1) > heads.amin(-1)).any()) else None  # (the heads differ)
        path = plot_layers(summary["importance"][0].tolist(), budgets.tolist(), args.plot, config.describe(), split)
        print(f"plot: {path}")
    return 0
