"""`compress(model, config)`: apply a squeezekit config to a loaded model for the duration of a ``with`` block.

Inside the block every forward that starts a cache (``model.generate``, or a call with ``use_cache=True``) gets a
`SqueezeCache` instead of transformers' DynamicCache, and runs squeezekit's attention. The data flow of one forward:

1. a pre-hook on the decoder stack (`Compressor._begin`) puts the cache in the forward's arguments, opens the
   step (which new tokens are real, their positions) and passes a `squeezekit.attention.Forward` down to every
   attention call as a keyword argument;
2. at prefill, hooks on each layer hand the residual stream before and after its attention to the statistics that
   measure it (the layer importance, squeezekit.statistics.Importance) while the layers write their keys and values
   into the cache;
3. a hook after the decoder stack (`Compressor._end`) ends the step: the cache plans the budgets (at prefill) and
   evicts every layer down to its budget, calling the policies through the block's `PolicyRunner`.

On exit, also after an exception or KeyboardInterrupt, the hooks are removed and the attention implementation is
restored: the model is exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import attention
from . import transformers_api as hf
from .allocation import BatchAllocation, kept_whole
from .architectures import resolve
from .attention import Forward
from .cache import SqueezeCache
from .config import Config
from .errors import InputError, PluginError, UnsupportedModelError
from .parallel import head_group
from .policies import LayerBudgetAllocator, TokenEvictor
from .runner import PolicyRunner
from .step import open_step

_BACKENDS = {"sdpa": "sdpa", "eager": "eager", None: "sdpa"}
NESTED = "this model is already inside a squeezekit.compress() block; nest blocks only on different models"


class Compressor:
    """One ``compress`` block: the hooks on the model, the `PolicyRunner`, and the last cache it built."""

    def __init__(self, model: torch.nn.Module, config: Config):
        hf.check_version()
        check_environment()  # SQUEEZEKIT_KERNELS, SQUEEZEKIT_COMPILE_MODE: a bad value stops the block before any work
        self.model, self.config = model, config
        self.resolved = resolve(model)
        #: the layers the budget applies to (full-attention layers)
        self.compressible = self.resolved.compressible
        #: each layer's attention window, scale and soft-capping, read from the model once
        self.geometry = [
            hf.attention_geometry(attn, hf.text_config(model), self.resolved.arch.prescaled_queries)
            for attn in self.resolved.attentions
        ]
        #: the policies and every call into them
        self.runner = PolicyRunner(config)
        #: tensor parallel: the ranks holding the other heads, whose views allocators see too (squeezekit.parallel)
        self.runner.head_group = head_group(model)
        self.runner.prepare(model)  # e.g. a calibration profile made for another model: stop before any work
        #: the decoder stack's keyword for the cache (``cache`` or, before transformers 5.24, ``past_key_values``)
        self.cache_argument = hf.cache_argument(self.resolved.decoder)
        self.original_attn = hf.attn_implementation(model)
        self.backend = self._backend(self.original_attn)
        self.last_cache: SqueezeCache | None = None  # the cache of the latest generation
        #: synchronize the device around policy work so `summary()["timings"]` are exact (benchmarks only)
        self.sync_timings = False
        self.active = False
        self._forward: Forward | None = None  # the forward running now
        self._handles: list = []
        self._x: dict[int, torch.Tensor] = {}

    @property
    def allocator(self) -> LayerBudgetAllocator:
        """The allocator in use (the fallback, once it has taken over)."""
        return self.runner.allocator

    @property
    def evictor(self) -> TokenEvictor:
        """The evictor in use (the fallback, once it has taken over)."""
        return self.runner.evictor

    @property
    def fallbacks(self) -> dict[str, PluginError]:
        """The errors that made a fallback policy take over, by kind."""
        return self.runner.failures

    def _backend(self, impl: str | None) -> str:
        if impl == attention.NAME:
            raise InputError(NESTED)
        if impl in _BACKENDS:
            return _BACKENDS[impl]
        if impl and impl.startswith("flash_attention"):
            param = next(self.model.parameters())
            if param.device.type != "cuda" or param.dtype not in (torch.float16, torch.bfloat16):
                raise UnsupportedModelError(
                    f"attn_implementation {impl!r} serves fp16/bf16 models on CUDA only; this model is {param.dtype} "
                    f"on {param.device.type}: load it with attn_implementation='sdpa'"
                )
            return "sdpa"  # per-layer slot masks need SDPA's masked kernels; flash's varlen API cannot express them
        raise UnsupportedModelError(
            f"attn_implementation {impl!r} is not supported by squeezekit; use 'sdpa' or 'eager'"
        )

    def new_cache(
        self, shared: BatchAllocation | None = None, expected_prompt_len: torch.Tensor | None = None, branches: int = 1
    ) -> SqueezeCache:
        """An empty cache of this block, to pass to the model (squeezekit.batching does; generate gets one itself).

        ``branches``: each prompt row is prefilled once and its cache repeated that many times before it is
        compressed (`SqueezeCache.branch`); the steps after the prefill pass ``rows x branches`` sequences."""
        return SqueezeCache(
            self.runner, self.geometry, self.compressible, backend=self.backend, shared=shared,
            expected_prompt_len=expected_prompt_len, sync_timings=self.sync_timings, branches=branches,
        )  # fmt: skip

    def cache_kwargs(self, cache: SqueezeCache) -> dict:
        """``{name: cache}`` for a forward call of the model (the name depends on the transformers release)."""
        return {hf.cache_argument(self.model): cache}

    # -- install / uninstall -----------------------------------------------------------------------------------------
    def __enter__(self) -> Compressor:
        r = self.resolved
        attention.register()
        try:
            self._handles.append(r.decoder.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(r.decoder.register_forward_hook(self._end, with_kwargs=True))
            for i, (layer, attn) in enumerate(zip(r.layers, r.attentions, strict=True)):
                self._handles.append(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._attention_output(i, layer)))
            hf.set_attn_implementation(self.model, attention.NAME)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.active = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None = None, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if hf.attn_implementation(self.model) != self.original_attn:
            hf.set_attn_implementation(self.model, self.original_attn)
        self.active = False
        self._forward = None
        self._x.clear()
        if exc_type is None:
            self.runner.check_nan()  # NaN scores not yet reported (CUDA checks every 32 steps): the model is restored

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def _begin(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise InputError("squeezekit needs input_ids or inputs_embeds in the model's forward")
        B, q = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise InputError("squeezekit needs a 2D attention_mask (batch, tokens); got a prepared 4D mask")
        if mask is not None:
            new_valid = mask[:, -q:].bool()
            all_valid = None  # unknown until looked at (one host sync per step)
        else:
            new_valid = torch.ones(B, q, dtype=torch.bool, device=tokens.device)
            all_valid = True
        past = hf.pop_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        cache: SqueezeCache | None
        if isinstance(past, SqueezeCache) and past.runner is self.runner:
            cache = past
        elif past is None and not use_cache:
            cache = None
        elif past is None or (isinstance(past, hf.Cache) and past.get_seq_length() == 0):
            cache = self.new_cache()
        else:
            raise InputError("a non-empty cache not built by this squeezekit.compress block was passed to the model")
        if cache is not None:
            if cache.length == 0:
                self.runner.check_nan()  # the previous generation's deferred NaN check
            kwargs[self.cache_argument] = cache
        max_pos = getattr(hf.text_config(self.model), "max_position_embeddings", None)
        seen = 0 if cache is None else cache.host_seen_max
        if max_pos and seen + q > max_pos and seen + int(new_valid.sum(-1).max()) > max_pos:
            new = int(new_valid.sum(-1).max())
            raise InputError(
                f"generation past the model's maximum of {max_pos} positions: a sequence would reach {seen + new} "
                f"tokens ({seen} so far + {new} in this step); shorten the prompt or lower max_new_tokens"
            )
        if cache is None:
            step = open_step(torch.zeros_like(new_valid[:, 0], dtype=torch.long), new_valid, True, all_valid)
        else:
            step = cache.begin_step(new_valid, all_valid)
            if step.prefill:  # a chunked prefill's first chunk may hold none of a left-padded row's tokens
                expected = cache.expected_prompt_len
                self._check_prompts(new_valid.sum(-1) if expected is None else expected.to(new_valid.device))
        self._forward = Forward(step, cache, self.runner, self.backend, self.geometry)
        kwargs[attention.KWARG] = self._forward
        return args, kwargs

    def _check_prompts(self, n: torch.Tensor) -> None:
        """``n`` (B,): the real tokens of each prompt."""
        if bool((n == 0).any()):
            raise InputError(
                f"sequence {int((n == 0).nonzero()[0])} of the batch is all padding (its attention_mask row is all 0); "
                f"remove it from the batch"
            )

    @property
    def _measuring(self) -> bool:
        """Measuring layer importance: during a prefill step that has a cache."""
        forward = self._forward
        return forward is not None and forward.cache is not None and forward.step.prefill

    def _end(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        forward = self._forward
        cache = None if forward is None else forward.cache
        if cache is not None:
            cache.end_step()
            self.last_cache = cache
            if cache.length % 32 == 0:  # (on CPU, NaN scores are caught as they are returned)
                self.runner.check_nan()
        self._forward = None
        self._x.clear()
        return output

    def _layer_input(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self._measuring:
                self._x[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _attention_output(self, i: int, layer: torch.nn.Module) -> Callable[..., None]:
        post_name = self.resolved.arch.post_attention

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            forward = self._forward
            if not self._measuring or i not in self._x or forward is None or forward.cache is None:
                return
            cache = forward.cache
            t0 = cache.clock()
            out = output[0] if isinstance(output, tuple) else output
            # A sharded model's layer may receive its input on the previous layer's device (accelerate moves it
            # inside the forward, after our pre-hook saw it).
            x = self._x.pop(i).to(out.device, non_blocking=True)
            if post_name:
                out = getattr(layer, post_name)(out)
            valid = forward.step.new_valid.to(out.device)
            self.runner.observe_residual(cache.layers[i].stats, x, out, valid)
            cache.timings["importance"] += cache.clock() - t0

        return hook

    # -- results -------------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Budgets, importance and bytes of the latest generation's cache."""
        cache = self.last_cache
        if cache is None or cache.importance is None:
            return {}
        budgets = cache.budgets
        b = budgets[:, self.compressible].double()
        bounded = b >= 0
        heads = _head_budgets(cache)
        whole = (
            torch.zeros(budgets.shape[0], dtype=torch.bool)
            if self.config.full
            else kept_whole(cache.prompt_len, self.config.budget, self.runner.floor, len(self.compressible))
        )
        return {
            "importance": cache.importance,
            "budgets": budgets,
            "prompt_len": cache.prompt_len.cpu(),
            "kv_bytes_full": cache.full_kv_bytes_prefill,
            "kv_bytes_kept": cache.kv_bytes_prefill,
            "kv_bytes_now": cache.kv_nbytes(),
            "kv_bytes_held": cache.kv_bytes_held(),
            "kv_bytes_peak_prefill": cache.peak_kv_bytes_prefill,
            "mean_budget": float(b[bounded].mean()) if bool(bounded.any()) else float("nan"),
            "min_budget": int(b[bounded].min()) if bool(bounded.any()) else -1,
            "max_budget": int(b[bounded].max()) if bool(bounded.any()) else -1,
            #: (B, L, H) per-KV-head budgets of the budgeted layers (-1 elsewhere), and their min / max
            "head_budgets": heads,
            "min_head_budget": int(heads[heads >= 0].min()) if bool((heads >= 0).any()) else -1,
            "max_head_budget": int(heads[heads >= 0].max()) if bool((heads >= 0).any()) else -1,
            #: (B,) bool: the prompts kept whole (shorter than the budget, or too short for the evictor's floor)
            "kept_whole": whole,
            "timings": dict(cache.timings),
        }


def check_environment() -> None:
    """The environment variables of the data path hold values squeezekit knows (else a one-line `ConfigError`)."""
    from . import compiled, kernels

    kernels.settings.enabled  # noqa: B018 (reading it parses SQUEEZEKIT_KERNELS)
    compiled.chosen_mode()


@contextmanager
def compress(model: torch.nn.Module, config: Config | dict | str | None = None, **kwargs: Any) -> Iterator[Compressor]:
    """Apply a compression config to ``model`` inside a ``with`` block; yields the `Compressor`.

    ``config`` may be a `Config`, a dict, a ``k=v,k=v`` string or a config file path; keyword arguments override it.
    """
    compressor = Compressor(model, Config.coerce(config, **kwargs))
    with compressor:
        yield compressor


def _head_budgets(cache: SqueezeCache) -> torch.Tensor:
    """(B, L, H) each KV head's budget in the budgeted layers (-1 in the others, and before prefill ends)."""
    B = cache.budgets.shape[0]
    H = max((layer.valid.shape[1] for layer in cache.layers if layer.valid is not None), default=1)
    out = torch.full((B, len(cache.layers), H), -1, dtype=torch.long)
    for i, layer in enumerate(cache.layers):
        host = getattr(layer, "head_budget_host", None)
        if host is not None:
            out[:, i, : host.shape[1]] = torch.from_numpy(host)
    return out
