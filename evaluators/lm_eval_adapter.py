"""lm-eval model ``squeezekit``: Hugging Face models (lm-eval's `HFLM`) with a compressed KV cache.

    lm_eval --model squeezekit --model_args pretrained=DIR,allocator=squeeze,evictor=streaming,budget=0.2 --tasks ...

``--model_args`` are the squeezekit config schema (``allocator``, ``evictor``, ``budget``, ``p``, ``sinks``,
``window``, ``heavy_ratio`` and the chosen plugins' own parameters) plus `HFLM`'s own arguments (``pretrained``,
``batch_size``, ``device``, ``dtype``, ``max_length``, ...) plus the adapter's own, below. Any other key is a one-line
`squeezekit.ConfigError` naming the nearest valid key. ``pretrained`` defaults to the embedded SmolLM2 model (for the
``lm_eval`` command's RULER tasks too: see evaluators/_lm_eval_hook.py).

How each request type sees the compressed cache (batch > 1, padded, like generation):

* ``generate_until``: the prompt is prefilled inside ``squeezekit.compress``, budgets are allocated and the cache is
  evicted, then every new token attends to the compressed cache. Greedy requests (``do_sample`` false and nothing
  else that changes the argmax: `squeezekit.transformers_api.greedy_eos`) take the serving path when ``fast`` is on
  (by default on CUDA): `squeezekit.batching.prefill` in micro-batches of ``micro_batch`` rows, then
  `squeezekit.decoding.GreedyDecoder` (a CUDA graph once every row of every layer is at its budget, also when the
  rows' prompts, hence budgets, differ), with the stop sequences checked on the host every ``check_every`` tokens. \
Where ``model.generate`` would have stopped is replayed on the host with
  lm-eval's own stopping criteria and the model's end-of-sequence ids, and the tokens decoded past it are dropped,
  so the output equals ``model.generate``'s token for token. Any other request (sampling, beams, a logits
  processor in the model's generation config, autocast) runs ``model.generate`` inside ``squeezekit.compress``.
* ``loglikelihood``: one forward pass never evicts anything, so the context is prefilled first (compressed at the
  end of that forward, exactly as a prompt before generation) and the continuation is then scored in *extend*
  forwards of ``extend_chunk`` tokens against the compressed cache, which is evicted back to its budget after each
  one. The first continuation token is predicted by the prefill itself, as the first generated token would be: a
  one-token continuation therefore scores exactly as with the full cache, just as generation would. The chunks in
  which every row of the batch has ``extend_chunk`` tokens go through `squeezekit.decoding.ChunkExtender`: on CUDA
  their step is captured once as a CUDA graph and replayed (``cuda_graph``), the same computation without Python
  per layer; the last, padded chunks run as plain forwards.
* ``loglikelihood_rolling`` (perplexity): lm-eval hands each window over with a 1-token context, so the first
  ``rolling_prompt`` share of each window (at least its context) is the prompt: it is prefilled and compressed, and
  the rest of the window is scored against the compressed cache. The budget is a fraction of that prompt.

With ``budget=1`` nothing is ever evicted, so the whole input of a request is one prefill (one forward, as `HFLM`
scores it) instead of a prefill and extend forwards.

Adapter arguments (not part of the squeezekit schema):

* ``extend_chunk`` (int, default 16): tokens per extend forward. Generation is ``extend_chunk=1``; larger chunks
  are faster, and a token also sees (uncompressed) the earlier tokens of its own chunk.
* ``rolling_prompt`` (float in (0, 1] or int tokens, default 0.5): the prompt part of a perplexity window.
* ``attn_implementation`` (``sdpa`` or ``eager``, default: the model's): passed to ``from_pretrained``.
* ``fast`` (``auto``, true or false; default ``auto``: on when the model runs on CUDA): the serving path above for
  greedy ``generate_until`` requests. Its output equals ``model.generate``'s (tests/test_lm_eval_fast_path.py).
* ``micro_batch`` (int, default: the whole batch): rows per prefill forward, in ``generate_until``'s serving path
  (``model.generate`` prefills the whole batch at once) and when scoring. Smaller micro-batches hold less of the \
uncompressed prompt at once, so the batch (``batch_size``)
  can grow. A batch-level allocator (``squeeze`` with ``per="batch"``, the default) then allocates every
  micro-batch from the first one's mean layer importance (`squeezekit.batching.prefill`) instead of the whole
  batch's, which can change the budgets and so the scores; per-sequence allocators give the same scores.
* ``check_every`` (int, default 8): tokens decoded between two host-side stop checks in the serving path (it
  decodes at most ``check_every - 1`` tokens past the last stop, which are dropped).
* ``cuda_graph`` (bool, default true): let the serving path's decoder and the scoring's extend chunks replay their
  step as a CUDA graph.

They are declared once, in `ADAPTER_ARGS` (one row each: name, type, default, rule, accepted text), and read by
`adapter_args`: typed by the config schema's own rules (`squeezekit.config`: text parsed; for a number no bool, no
fraction for an integer), then checked by the row's rule; any bad value (``inf``, ``nan``, ``1e400``, ``-1``, ``x``,
``True``) is a one-line `squeezekit.ConfigError` naming the argument and what it accepts.

With ``budget=1`` nothing is evicted and every score equals plain `HFLM`'s (tests/test_lm_eval_adapter.py).
Scores are summed in float64 on the device and read back once per batch (no host sync per token or chunk).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from squeezekit.config import Config, _check_typed, _coerce_string
from squeezekit.errors import ConfigError, UnsupportedModelError
from squeezekit.progress import status
from squeezekit.transformers_api import cache_argument, greedy_eos, output_cache

#: keyword arguments of HFLM.__init__ (lm-eval's own model_args)
HFLM_KEYS = frozenset(p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs"))
#: most float32 elements of log-probabilities scored at once (bounds the memory of scoring long prompts)
SCORE_BLOCK = 1 << 26
SOURCE = "model_args"


@dataclass(frozen=True)
class AdapterArg:
    """One of the adapter's own arguments (documented in the module docstring; read by `adapter_args`)."""

    name: str
    type: type  #: int, float, bool or str, typed by the config schema's rules
    default: Any  #: None: unset unless given (and None may be given)
    rule: Callable[[Any], bool]  #: what the typed value must satisfy (numbers must be finite too)
    accepted: str  #: what it accepts, as its one-line error says
    words: tuple[str, ...] = ()  #: texts taken as they are, besides the values of its type (``fast=auto``)
    hflm: bool = False  #: passed on to `HFLM` (``from_pretrained``) when set, instead of kept by the adapter


def _any(value: Any) -> bool:
    return True


def _positive(value: float) -> bool:
    return value >= 1


def _prompt_share(value: float) -> bool:
    return 0 < value <= 1 or (value > 1 and value == int(value))


def _served_attention(value: str) -> bool:
    return value in ("sdpa", "eager")


_INTEGER = "must be an integer >= 1"
#: the adapter's own arguments, in the order the module docstring documents them
ADAPTER_ARGS = (
    AdapterArg("extend_chunk", int, 16, _positive, _INTEGER),
    AdapterArg("rolling_prompt", float, 0.5, _prompt_share, "must be a fraction in (0, 1] or a whole number of tokens"),
    AdapterArg("attn_implementation", str, None, _served_attention, "must be 'sdpa' or 'eager'", hflm=True),
    AdapterArg("fast", bool, "auto", _any, "must be true or false or auto", words=("auto",)),
    AdapterArg("micro_batch", int, None, _positive, _INTEGER),
    AdapterArg("check_every", int, 8, _positive, _INTEGER),
    AdapterArg("cuda_graph", bool, True, _any, "must be true or false"),
)  # fmt: skip
ADAPTER_KEYS = frozenset(arg.name for arg in ADAPTER_ARGS)
DEFAULTS = {arg.name: arg.default for arg in ADAPTER_ARGS}
DEFAULT_EXTEND_CHUNK = DEFAULTS["extend_chunk"]
DEFAULT_ROLLING_PROMPT = DEFAULTS["rolling_prompt"]
#: a switch's words besides the config schema's true / false / 1 / 0 / yes / no
_SWITCH_WORDS = {"on": "true", "off": "false"}


def split_model_args(kwargs: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Split lm-eval model_args into a validated squeezekit `Config` and the `HFLM` / adapter arguments.

    An unknown key raises `ConfigError` naming the nearest key among both sets.
    """
    hf = {k: v for k, v in kwargs.items() if k in HFLM_KEYS or k in ADAPTER_KEYS}
    values = {k: v for k, v in kwargs.items() if k not in hf}
    others = ("an argument of lm-eval's HFLM", HFLM_KEYS | ADAPTER_KEYS)
    return Config.from_mapping(values, source=SOURCE, text=True, others=others), hf


def adapter_args(args: dict[str, Any]) -> dict[str, Any]:
    """Pop every adapter argument (`ADAPTER_ARGS`) from ``args``; return each, typed and checked (its default when
    not given), by name."""
    return {arg.name: _adapter_arg(arg, args.pop(arg.name, arg.default)) for arg in ADAPTER_ARGS}


def _adapter_arg(arg: AdapterArg, value: Any) -> Any:
    """``value`` typed by the config schema's own rules (`squeezekit.config`: text is parsed; for a number no bool, no
    fraction for an integer, nothing beyond 64 bits or float range; a switch's text in any case), finite when a
    number, and passing ``arg.rule``. Any other value (inf, nan, 1e400, -1, 'x', True, ...) is a `ConfigError`
    saying ``arg.accepted``."""
    if value is None and arg.default is None:
        return None
    text = str(value).strip().lower()
    if text in arg.words:
        return text
    try:
        if arg.type is bool:  # a switch: any value whose text is one of the words (True, 1, "yes", "off", ...)
            typed = _coerce_string(arg.name, _SWITCH_WORDS.get(text, text), bool, SOURCE)
        else:  # text is parsed for a number; a name is taken as it is
            text_number = isinstance(value, str) and arg.type is not str
            typed = _check_typed(
                arg.name, _coerce_string(arg.name, value, arg.type, SOURCE) if text_number else value, arg.type, SOURCE
            )
    except ConfigError:
        typed = None
    number = arg.type in (int, float)
    if typed is None or (number and not math.isfinite(typed)) or not arg.rule(typed):
        raise ConfigError(arg.name, value, arg.accepted, SOURCE) from None
    return typed


def _prompt_tokens(rolling_prompt: float, n: int) -> int:
    return int(rolling_prompt * n) if rolling_prompt <= 1 else int(rolling_prompt)


@register_model("squeezekit")
class SqueezekitLM(HFLM):
    """`HFLM` whose every forward with a cache runs inside ``squeezekit.compress`` (see the module docstring)."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        config, hf = split_model_args(kwargs)
        self.squeeze_config = config
        # each adapter argument is an attribute of its name (self.extend_chunk, ...); HFLM's join its arguments
        adapter = adapter_args(hf)
        for arg in ADAPTER_ARGS:
            value = adapter[arg.name]
            if not arg.hflm:
                setattr(self, arg.name, value)
            elif value is not None:
                hf[arg.name] = value
        if pretrained is None:
            from squeezekit.models import default_model_dir

            pretrained = str(default_model_dir())
            # The lm_eval command's RULER tasks size their prompts with this model's tokenizer too: the start-up hook
            # adds it to their metadata (evaluators/_lm_eval_hook.py, add_default_pretrained).
            status(f"no pretrained= in --model_args: using the embedded model {pretrained}")
        if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never ask a hub for anything
            pretrained = str(pretrained)
        if hf.get("device") is None:  # HFLM's "cuda" default fails on CPU-only machines
            hf["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, **hf)
        if self.backend != "causal":
            raise UnsupportedModelError("the squeezekit lm-eval model serves decoder-only (causal) models only")
        self._rolling = False
        #: lm-eval's per-request progress bars (squeezekit eval shows its own instead and turns these off)
        self.show_bars = True
        #: KV bytes kept / full after each prefill, summed over every compressed forward of this instance
        self.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
        #: generate_until batches by path: the serving path, or model.generate
        self.generate_batches = {"serving": 0, "generate": 0}

    # -- bookkeeping -----------------------------------------------------------------------------------------------
    def _compress(self):
        from squeezekit.compressor import compress

        return compress(self.model, self.squeeze_config)

    def _record(self, compressor) -> None:
        summary = compressor.summary()
        if summary:
            self.kv_bytes["kept"] += int(summary["kv_bytes_kept"])
            self.kv_bytes["full"] += int(summary["kv_bytes_full"])
            self.kv_bytes["prefills"] += 1

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["squeezekit"] = self.squeeze_config.describe()
        return info

    # -- generate_until ------------------------------------------------------------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        eos = self._serving_eos(context, max_length, generation_kwargs)
        self.generate_batches["serving" if eos is not None else "generate"] += 1
        if eos is not None:
            return self._serve(
                context, generation_kwargs.get("attention_mask"), max_length - context.shape[1], stop, eos
            )
        with torch.no_grad(), self._compress() as compressor:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            self._record(compressor)
        return out

    def _serving_on(self) -> bool:
        return self.device.type == "cuda" if self.fast == "auto" else bool(self.fast)

    def _serving_eos(self, context, max_length, generation_kwargs) -> tuple[int, ...] | None:
        """The end-of-sequence ids when this request takes the serving path (greedy, see the module docstring)."""
        if not self._serving_on() or self.mixed_precision_dtype is not None or max_length - context.shape[1] < 1:
            return None
        kwargs = {k: v for k, v in generation_kwargs.items() if k not in ("attention_mask", "temperature")}
        temperature = generation_kwargs.get("temperature", 0.0)
        if kwargs.get("do_sample") is None and temperature == 0.0:  # as HFLM._model_generate decides
            kwargs["do_sample"] = False
        if kwargs.get("do_sample") is not False:
            return None
        return greedy_eos(self.model, kwargs)

    def _serve(self, context, mask, max_new: int, stop: list[str], eos: tuple[int, ...]) -> torch.Tensor:
        """``model.generate``'s output (context + new tokens) through the serving path: micro-batched prefill, then
        the greedy decoder, ``check_every`` tokens between host-side stop checks."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        from squeezekit.batching import prefill
        from squeezekit.decoding import GreedyDecoder

        B = context.shape[0]
        pad = self.tokenizer.pad_token_id
        if pad is None:  # what generate pads finished sequences with then
            pad = eos[0] if eos else 0
        replay = GenerateStops(stop_sequences_criteria(self.tokenizer, stop, 0, B), eos, pad, max_new, B)
        with torch.inference_mode(), self._compress() as compressor:
            cache, logits = prefill(self.model, compressor, context, mask, micro_batch=self.micro_batch or B)
            self._record(compressor)
            first = logits.argmax(-1)
            del logits
            end = replay.advance(first[:, None].cpu())
            if end is None:
                decoder = GreedyDecoder(self.model, cache, first, cuda_graph=self.cuda_graph)
                while end is None:
                    end = replay.advance(decoder.run(min(self.check_every, max_new - replay.n)).cpu())
                del decoder
            del cache
        return torch.cat([context, replay.tokens[:, :end].to(context.device)], dim=1)

    def generate_until(self, requests, disable_tqdm: bool = False):
        from squeezekit.evaluators.tasks.utils import COMPRESS_MARK

        turns = [i for i, r in enumerate(requests) if COMPRESS_MARK in r.args[0]]
        if not turns:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_bars)
        out: list[str | None] = [None] * len(requests)
        plain = [i for i in range(len(requests)) if i not in set(turns)]
        if plain:
            answers = super().generate_until([requests[i] for i in plain], disable_tqdm or not self.show_bars)
            for i, answer in zip(plain, answers, strict=True):
                out[i] = answer
        for i in turns:
            out[i] = self._conversation(*requests[i].args)
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _conversation(self, context: str, gen_kwargs: dict) -> str:
        """A multi-question request (the turn markers of evaluators/tasks/utils.py): the text before COMPRESS_MARK is
        prefilled and compressed once; then each segment ending at an ANSWER_MARK is fed to the same cache (kept
        within its budget as it grows) and answered greedily, the answer's tokens staying in the cache as a
        conversation's would. Returns the answers joined by ANSWER_MARK, each cut at its first stop sequence."""
        from squeezekit.evaluators.tasks.utils import ANSWER_MARK, COMPRESS_MARK

        from squeezekit.batching import prefill

        head, _, rest = context.partition(COMPRESS_MARK)
        segments = rest.split(ANSWER_MARK)[:-1]
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        eos = set(greedy_eos(self.model, {"do_sample": False}) or ())
        ids = torch.tensor([self.tok_encode(head)], device=self.device)
        answers = []
        with torch.inference_mode(), self._compress() as compressor:
            cache, logits = prefill(self.model, compressor, ids, torch.ones_like(ids), micro_batch=1)
            self._record(compressor)
            length = ids.shape[1]
            for segment in segments:
                new = self.tokenizer.encode(segment, add_special_tokens=False)
                if new:
                    logits, cache = self._feed(cache, new, length)
                    length += len(new)
                tokens: list[int] = []
                while len(tokens) < max_gen:
                    token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
                    if token in eos:
                        break
                    tokens.append(token)
                    logits, cache = self._feed(cache, [token], length)
                    length += 1
                    if any(stop in self.tokenizer.decode(tokens) for stop in until):
                        break
                text = self.tokenizer.decode(tokens)
                for stop in until:
                    text = text.split(stop)[0]
                answers.append(text)
            del cache
        return ANSWER_MARK.join(answers)

    def _feed(self, cache, tokens: list[int], length: int):
        """Extend the (compressed) cache of one sequence of ``length`` tokens with ``tokens``, ``extend_chunk`` at a
        time: (the last token's logits, the cache)."""
        for k in range(0, len(tokens), self.extend_chunk):
            chunk = torch.tensor([tokens[k : k + self.extend_chunk]], device=self.device)
            start = length + k
            out = self.model(
                input_ids=chunk,
                attention_mask=torch.ones(1, start + chunk.shape[1], dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, start + chunk.shape[1], device=self.device).view(1, -1),
                use_cache=True,
                **{cache_argument(self.model): cache},
            )
            logits, cache = out.logits[:, -1], output_cache(out)
            del out
        return logits, cache

    # -- loglikelihood_rolling -----------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_bars)
        finally:
            self._rolling = False

    # -- loglikelihood -------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_bars)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score each continuation against the cache compressed after prefilling its context.

        Requests sharing the model input and the continuation length (multiple choice with one-token answers) are
        scored once, as HFLM's logits cache does; only their last token differs.
        """
        unique: dict[tuple, dict] = {}
        members: list[tuple[tuple, int]] = []
        for _, context, continuation in requests:
            assert len(context) > 0 and 0 < len(continuation) <= self.max_length
            full = (context + continuation)[-(self.max_length + 1) :]
            inp = full[:-1]
            n, contlen = len(inp), len(continuation)
            key = (tuple(inp), contlen)
            if key not in unique:
                s = n - contlen  # first scored position: the last context token predicts continuation[0]
                prompt = s + 1
                if self._rolling:
                    prompt = max(prompt, _prompt_tokens(self.rolling_prompt, n))
                prompt = min(max(prompt, 2), n)
                if self.squeeze_config.full:  # nothing is ever evicted: the whole input in one forward, as HFLM does
                    prompt = n
                unique[key] = {"inp": inp, "targets": full[1:], "s": s, "P": prompt}
            members.append((key, continuation[-1]))

        if isinstance(self.batch_size, int) and self.batch_size > 0:
            bs = self.batch_size
        elif override_bs:
            bs = override_bs
        elif str(self.batch_size).startswith("auto"):  # as HFLM: the largest batch that fits, detected once
            if getattr(self, "_auto_batch", None) is None:
                self._auto_batch = self._detect_batch_size()
            bs = self._auto_batch
        else:
            bs = 1
        order = sorted(unique, key=lambda k: (-len(k[0]), k))
        pbar = tqdm(
            total=len(order),
            disable=disable_tqdm or not self.show_bars or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        for i in range(0, len(order), bs):
            batch = [unique[k] for k in order[i : i + bs]]
            self._score_batch(batch)
            pbar.update(len(batch))
        pbar.close()

        results = []
        for (key, tok), (request_str, _, _) in zip(members, requests, strict=True):
            row = unique[key]
            last = row["last"]
            answer = (row["shared_ll"] + float(last[tok]), bool(row["shared_greedy"] and int(last.argmax()) == tok))
            results.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return results

    def _score_batch(self, rows: list[dict]) -> None:
        """Prefill the prompts (compressed), then extend with the rest; store each row's scores in place."""
        from squeezekit.batching import prefill
        from squeezekit.decoding import ChunkExtender

        device = self.device
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        B = len(rows)
        scores = Scores(rows, device)
        if any(row["P"] < 2 for row in rows):  # a 1-token input: no cache to compress, plain forward
            for b, row in enumerate(rows):
                with torch.inference_mode():
                    logits = self.model(torch.tensor([row["inp"]], device=device)).logits
                scores.add(logits, torch.zeros(1, dtype=torch.long, device=device), slice(b, b + 1))
            scores.finish(rows)
            return
        maxP = max(row["P"] for row in rows)
        ids = torch.full((B, maxP), pad, dtype=torch.long)
        mask = torch.zeros(B, maxP, dtype=torch.long)
        rest = max(len(row["inp"]) - row["P"] for row in rows)
        new = torch.full((B, rest), pad, dtype=torch.long)  # the rest of each input, right-padded
        new_mask = torch.zeros(B, rest, dtype=torch.long)
        new_pos = torch.zeros(B, rest, dtype=torch.long)
        for b, row in enumerate(rows):  # left padding, as for generation
            P, n = row["P"], len(row["inp"])
            ids[b, maxP - P :] = torch.tensor(row["inp"][:P])
            mask[b, maxP - P :] = 1
            if n > P:
                new[b, : n - P] = torch.tensor(row["inp"][P:])
                new_mask[b, : n - P] = 1
            new_pos[b] = torch.arange(P, P + rest).clamp_max(n - 1)
        prompt = torch.tensor([row["P"] for row in rows], device=device)
        keep = max(row["P"] - row["s"] for row in rows)
        ids, mask = ids.to(device), mask.to(device)
        new, new_pos = new.to(device), new_pos.to(device)
        mask = torch.cat([mask, new_mask.to(device)], dim=1)
        with torch.inference_mode(), self._compress() as compressor:
            # prefill column j of a row is its input position P - keep + j
            cache, _ = prefill(
                self.model,
                compressor,
                ids,
                mask[:, :maxP],
                micro_batch=self.micro_batch or B,
                logits_to_keep=keep,
                on_logits=lambda sl, lg: scores.add(lg, prompt[sl] - keep, sl),
                pool_rows=False,  # (the extend steps below grow the layers: rectangular buffers)
            )
            self._record(compressor)
            C = self.extend_chunk
            whole = min(len(row["inp"]) - row["P"] for row in rows) // C * C  # chunks with no row's padding
            extend = ChunkExtender(self.model, cache, C, cuda_graph=self.cuda_graph)
            for k in range(0, whole, C):
                scores.add(extend(new[:, k : k + C], new_pos[:, k : k + C]), prompt + k, slice(0, B))
            del extend
            for k in range(whole, rest, C):  # the last chunks, where shorter rows are padded
                w = min(C, rest - k)
                out = self.model(
                    input_ids=new[:, k : k + w],
                    attention_mask=mask[:, : maxP + k + w],
                    position_ids=new_pos[:, k : k + w],
                    use_cache=True,
                    **{cache_argument(self.model): cache},
                )
                scores.add(out.logits, prompt + k, slice(0, B))
                cache = output_cache(out)
                del out
            del cache
        scores.finish(rows)


class Scores:
    """The log-likelihood sums of a batch of scored rows, kept on the device until `finish` (one transfer).

    Per row: ``ll`` (float64) sums the log-probability of every target at input positions ``s`` .. ``n - 2`` (shared
    by all requests of a group), ``greedy`` whether each of those targets was the argmax, and ``last`` the
    log-probabilities at position ``n - 1`` (whose target differs between the requests of a group).
    """

    def __init__(self, rows: list[dict], device):
        B = len(rows)
        n = max(len(row["inp"]) for row in rows)
        targets = torch.zeros(B, n, dtype=torch.long)
        for b, row in enumerate(rows):
            targets[b, : len(row["targets"])] = torch.tensor(row["targets"])
        self.targets = targets.to(device)
        self.n = torch.tensor([len(row["inp"]) for row in rows], device=device)
        self.s = torch.tensor([row["s"] for row in rows], device=device)
        self.ll = torch.zeros(B, dtype=torch.float64, device=device)
        self.greedy = torch.ones(B, dtype=torch.bool, device=device)
        self.last: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, first: torch.Tensor, rows: slice) -> None:
        """Score ``logits`` (b, w, vocab) of batch rows ``rows``: column j of row i is input position first[i] + j.
        Columns outside a row's scored positions are ignored. No host sync."""
        b, w, V = logits.shape
        cols = max(1, SCORE_BLOCK // V)
        for c0 in range(0, w, cols):
            c1 = min(w, c0 + cols)
            per = max(1, SCORE_BLOCK // ((c1 - c0) * V))
            for r0 in range(0, b, per):
                r1 = min(b, r0 + per)
                pos = first[r0:r1, None] + torch.arange(c0, c1, device=first.device)
                self._add(logits[r0:r1, c0:c1], pos, slice(rows.start + r0, rows.start + r1))

    def _add(self, logits: torch.Tensor, pos: torch.Tensor, rows: slice) -> None:
        lp = F.log_softmax(logits.float(), dim=-1)
        n, s = self.n[rows, None], self.s[rows, None]
        targets = self.targets[rows].gather(1, pos.clamp(0, self.targets.shape[1] - 1))
        shared = (pos >= s) & (pos < n - 1)
        got = lp.gather(-1, targets[..., None]).squeeze(-1)
        self.ll[rows] += (got.double() * shared).sum(-1)
        self.greedy[rows] &= ((lp.argmax(-1) == targets) | ~shared).all(-1)
        is_last = (pos == n - 1) & (pos >= s)
        if self.last is None:
            self.last = torch.zeros(self.ll.shape[0], lp.shape[-1], dtype=torch.float32, device=lp.device)
        at = is_last.to(torch.int8).argmax(-1)
        last = lp[torch.arange(lp.shape[0], device=lp.device), at]
        self.last[rows] = torch.where(is_last.any(-1, keepdim=True), last, self.last[rows])

    def finish(self, rows: list[dict]) -> None:
        """Store each row's ``shared_ll``, ``shared_greedy`` and ``last`` (on the host)."""
        if self.last is None:
            self.last = torch.zeros(self.ll.shape[0], 1, device=self.ll.device)
        ll, greedy, last = self.ll.cpu().tolist(), self.greedy.cpu().tolist(), self.last.cpu()
        for b, row in enumerate(rows):
            row["shared_ll"], row["shared_greedy"], row["last"] = ll[b], greedy[b], last[b]


class GenerateStops:
    """Where ``model.generate`` (as lm-eval's HFLM calls it) ends, replayed on the host as tokens come.

    Each step, exactly as ``generate`` does: a sequence already ended gets ``pad`` instead of its token; lm-eval's
    stop-sequence criteria (`stop_sequences_criteria`, built for the new tokens only) see the tokens; a sequence whose
    token is an end-of-sequence id ends. Generation ends when one criterion holds for the whole batch (lm-eval's
    criteria end the batch together), when every sequence has ended, or after ``max_new`` tokens.
    """

    def __init__(self, criteria, eos: tuple[int, ...], pad: int, max_new: int, batch: int):
        self.criteria, self.pad, self.max_new = list(criteria), pad, max_new
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.tokens = torch.full((batch, max_new), pad, dtype=torch.long)  # what generate returns after the prompt
        self.ended = torch.zeros(batch, dtype=torch.bool)
        self.n = 0

    def advance(self, new: torch.Tensor) -> int | None:
        """Take the next greedy tokens (B, k) (on the host); the number of tokens generate returns once known."""
        for token in new.unbind(1):
            k = self.n
            self.tokens[:, k] = torch.where(self.ended, self.pad, token)
            self.n += 1
            done = [bool(criterion(self.tokens[:, : self.n], None)) for criterion in self.criteria]  # all, in order
            if self.eos.numel():
                self.ended |= torch.isin(self.tokens[:, k], self.eos)
            if any(done) or bool(self.ended.all()) or self.n >= self.max_new:
                return self.n
        return None
