"""lm-eval model ``squeezekit``: Hugging Face models (lm-eval's `HFLM`) with a compressed KV cache.

    lm_eval --model squeezekit --model_args pretrained=DIR,allocator=squeeze,evictor=streaming,budget=0.2 --tasks ...

``--model_args`` are the squeezekit config schema (``allocator``, ``evictor``, ``budget``, ``p``, ``sinks``,
``window``, ``heavy_ratio`` and the chosen plugins' own parameters) plus `HFLM`'s own arguments (``pretrained``,
``batch_size``, ``device``, ``dtype``, ``max_length``, ...) plus the three below. Any other key is a one-line
`squeezekit.ConfigError` naming the nearest valid key. ``pretrained`` defaults to the embedded SmolLM2 model.

How each request type sees the compressed cache (batch > 1, padded, like generation):

* ``generate_until``: ``model.generate`` runs inside ``squeezekit.compress``: the prompt is prefilled, budgets are
  allocated and the cache is evicted, then every new token attends to the compressed cache.
* ``loglikelihood``: one forward pass never evicts anything, so the context is prefilled first (compressed at the
  end of that forward, exactly as a prompt before generation) and the continuation is then scored in *extend*
  forwards of ``extend_chunk`` tokens against the compressed cache, which is evicted back to its budget after each
  one. The first continuation token is predicted by the prefill itself, as the first generated token would be: a
  one-token continuation therefore scores exactly as with the full cache, just as generation would.
* ``loglikelihood_rolling`` (perplexity): lm-eval hands each window over with a 1-token context, so the first
  ``rolling_prompt`` share of each window (at least its context) is the prompt: it is prefilled and compressed, and
  the rest of the window is scored against the compressed cache. The budget is a fraction of that prompt.

Adapter arguments (not part of the squeezekit schema):

* ``extend_chunk`` (int, default 16): tokens per extend forward. Generation is ``extend_chunk=1``; larger chunks
  are faster, and a token also sees (uncompressed) the earlier tokens of its own chunk.
* ``rolling_prompt`` (float in (0, 1] or int tokens, default 0.5): the prompt part of a perplexity window.
* ``attn_implementation`` (``sdpa`` or ``eager``, default: the model's): passed to ``from_pretrained``.

With ``budget=1`` nothing is evicted and every score equals plain `HFLM`'s (tests/test_lm_eval_adapter.py).
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from squeezekit.config import Config
from squeezekit.errors import ConfigError, UnsupportedModelError
from squeezekit.transformers_api import cache_argument, output_cache

#: keyword arguments of HFLM.__init__ (lm-eval's own model_args)
HFLM_KEYS = frozenset(p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs"))
#: the adapter's own arguments (documented in the module docstring)
ADAPTER_KEYS = frozenset({"extend_chunk", "rolling_prompt", "attn_implementation"})
DEFAULT_EXTEND_CHUNK = 16
DEFAULT_ROLLING_PROMPT = 0.5
SOURCE = "model_args"


def split_model_args(kwargs: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """Split lm-eval model_args into a validated squeezekit `Config` and the `HFLM` / adapter arguments.

    An unknown key raises `ConfigError` naming the nearest key among both sets.
    """
    hf = {k: v for k, v in kwargs.items() if k in HFLM_KEYS or k in ADAPTER_KEYS}
    values = {k: v for k, v in kwargs.items() if k not in hf}
    others = ("an argument of lm-eval's HFLM", HFLM_KEYS | ADAPTER_KEYS)
    return Config.from_mapping(values, source=SOURCE, text=True, others=others), hf


def _number(args: dict[str, Any], key: str, default, kind: type, ok, accepted: str):
    """Pop adapter argument ``key`` from ``args`` as ``kind``; a value that does not parse or fails ``ok``: `ConfigError`."""
    value = args.pop(key, default)
    try:
        number = kind(value)
        if kind is int and number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(key, value, accepted, SOURCE) from None
    if isinstance(value, bool) or not ok(number):
        raise ConfigError(key, value, accepted, SOURCE)
    return number


def _prompt_tokens(rolling_prompt: float, n: int) -> int:
    return int(rolling_prompt * n) if rolling_prompt <= 1 else int(rolling_prompt)


@register_model("squeezekit")
class SqueezekitLM(HFLM):
    """`HFLM` whose every forward with a cache runs inside ``squeezekit.compress`` (see the module docstring)."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        config, hf = split_model_args(kwargs)
        self.squeeze_config = config
        self.extend_chunk = _number(hf, "extend_chunk", DEFAULT_EXTEND_CHUNK, int, lambda v: v >= 1, "must be an integer >= 1")
        self.rolling_prompt = _number(
            hf, "rolling_prompt", DEFAULT_ROLLING_PROMPT, float, lambda v: 0 < v <= 1 or (v > 1 and v == int(v)),
            "must be a fraction in (0, 1] or a whole number of tokens",
        )  # fmt: skip
        attn = hf.pop("attn_implementation", None)
        if attn is not None:
            if attn not in ("sdpa", "eager"):
                raise ConfigError("attn_implementation", attn, "must be 'sdpa' or 'eager'", SOURCE)
            hf["attn_implementation"] = attn
        if pretrained is None:
            from squeezekit.models import default_model_dir

            pretrained = str(default_model_dir())
            # lm-eval builds task metadata from the model_args as given: tasks that size their prompts with a
            # tokenizer (RULER) cannot see this default, and lm-eval offers no way to tell them. Say what to pass.
            print(f"squeezekit: no pretrained= in --model_args: using the embedded model {pretrained}; RULER tasks need "
                  f"it too: add pretrained={pretrained}", file=sys.stderr)
        if isinstance(pretrained, (str, os.PathLike)) and Path(pretrained).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never ask a hub for anything
            pretrained = str(pretrained)
        if hf.get("device") is None:  # HFLM's "cuda" default fails on CPU-only machines
            hf["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, **hf)
        if self.backend != "causal":
            raise UnsupportedModelError("the squeezekit lm-eval model serves decoder-only (causal) models only")
        self._rolling = False
        #: KV bytes kept / full after each prefill, summed over every compressed forward of this instance
        self.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}

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
        with torch.no_grad(), self._compress() as compressor:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            self._record(compressor)
        return out

    # -- loglikelihood_rolling -------------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._rolling = True
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    # -- loglikelihood ----------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score each continuation against the cache compressed after prefilling its context.

        Requests sharing the model input and the continuation length (multiple choice with one-token answers) are
        scored once, as HFLM's logits cache does; only their last token differs.
        """
        unique: dict[tuple, dict] = {}
        members: list[tuple[tuple, int]] = []
        for (_, context, continuation) in requests:
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
                unique[key] = {"inp": inp, "targets": full[1:], "s": s, "P": prompt}
            members.append((key, continuation[-1]))

        if isinstance(self.batch_size, int) and self.batch_size > 0:
            bs = self.batch_size
        else:
            bs = override_bs or 1
        order = sorted(unique, key=lambda k: (-len(k[0]), k))
        pbar = tqdm(total=len(order), disable=(disable_tqdm or self.rank != 0), desc="Running loglikelihood requests")
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
        device = self.device
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        B = len(rows)
        for row in rows:
            row["shared_ll"], row["shared_greedy"], row["last"] = 0.0, True, None
        if any(row["P"] < 2 for row in rows):  # a 1-token input: no cache to compress, plain forward
            for row in rows:
                with torch.no_grad():
                    logits = self.model(torch.tensor([row["inp"]], device=device)).logits[0]
                self._take(row, 0, F.log_softmax(logits.float(), dim=-1))
            return
        maxP = max(row["P"] for row in rows)
        ids = torch.full((B, maxP), pad, dtype=torch.long)
        mask = torch.zeros(B, maxP, dtype=torch.long)
        for b, row in enumerate(rows):  # left padding, as for generation
            P = row["P"]
            ids[b, maxP - P :] = torch.tensor(row["inp"][:P])
            mask[b, maxP - P :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        keep = max(row["P"] - row["s"] for row in rows)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        with torch.no_grad(), self._compress() as compressor:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep)
            self._record(compressor)
            cache = output_cache(out)
            for b, row in enumerate(rows):
                first = row["s"]  # prefill positions s..P-1 are scored by the prefill's last P-s columns
                cols = out.logits[b, keep - (row["P"] - first) :]
                self._take(row, first, F.log_softmax(cols.float(), dim=-1))
            del out
            rest = max(len(row["inp"]) - row["P"] for row in rows)
            C = self.extend_chunk
            for k in range(0, rest, C):
                w = min(C, rest - k)
                new = torch.full((B, w), pad, dtype=torch.long)
                new_mask = torch.zeros(B, w, dtype=torch.long)
                new_pos = torch.zeros(B, w, dtype=torch.long)
                for b, row in enumerate(rows):
                    start = row["P"] + k
                    toks = row["inp"][start : start + w]
                    if toks:
                        new[b, : len(toks)] = torch.tensor(toks)
                        new_mask[b, : len(toks)] = 1
                    new_pos[b] = torch.arange(start, start + w).clamp_max(len(row["inp"]) - 1)
                mask = torch.cat([mask, new_mask.to(device)], dim=1)
                out = self.model(
                    input_ids=new.to(device),
                    attention_mask=mask,
                    position_ids=new_pos.to(device),
                    use_cache=True,
                    **{cache_argument(self.model): cache},
                )
                for b, row in enumerate(rows):
                    start = row["P"] + k
                    m = int(new_mask[b].sum())
                    if m:
                        self._take(row, start, F.log_softmax(out.logits[b, :m].float(), dim=-1))
                cache = output_cache(out)
                del out

    @staticmethod
    def _take(row: dict, first: int, logprobs: torch.Tensor) -> None:
        """Add the scores of input positions first .. first+len-1 (only those at or after the row's ``s``)."""
        n = len(row["inp"])
        lo = max(first, row["s"])
        hi = min(first + logprobs.shape[0], n)
        if hi <= lo:
            return
        lp = logprobs[lo - first : hi - first]
        shared_hi = min(hi, n - 1)  # positions before the last one: targets shared by the whole group
        if shared_hi > lo:
            targets = torch.tensor(row["targets"][lo:shared_hi], device=lp.device)
            part = lp[: shared_hi - lo]
            row["shared_ll"] += float(part.gather(1, targets[:, None]).sum())
            row["shared_greedy"] = row["shared_greedy"] and bool((part.argmax(-1) == targets).all())
        if hi == n:
            row["last"] = lp[-1].cpu()
