"""`compress(model, config)`: apply a squeezekit config to a loaded model for the duration of a ``with`` block.

Inside the block every forward that starts a cache (``model.generate``, or a call with ``use_cache=True``) gets a
`SqueezeCache` instead of transformers' DynamicCache, and runs squeezekit's attention. On exit, also after an
exception or KeyboardInterrupt, the hooks are removed and the attention implementation is restored: the model is
exactly as it was.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch

from . import attention
from . import transformers_api as hf
from .architectures import resolve
from .cache import SqueezeCache, Step
from .config import Config, checked_floor
from .errors import InputError, PluginError, PluginFallbackWarning, UnsupportedModelError

_BACKENDS = {"sdpa": "sdpa", "eager": "eager", None: "sdpa"}
NESTED = "this model is already inside a squeezekit.compress() block; nest blocks only on different models"


class Compressor:
    """The state of one ``compress`` block: the policies, the hooks, and the last cache it built."""

    def __init__(self, model: torch.nn.Module, config: Config):
        self.model, self.config = model, config
        hf.check_version()
        self.resolved = resolve(model)
        #: the decoder stack's keyword for the cache (``cache`` or, before transformers 5.24, ``past_key_values``)
        self.cache_argument = hf.cache_argument(self.resolved.decoder)
        self.compressible = self.resolved.compressible
        #: the policies in use (a fallback replaces one that failed)
        self.allocator = config.build_allocator()
        self.evictor = config.build_evictor()
        self.origins = {k: config.info(k).origin for k in ("allocator", "evictor")}
        #: the config's fallback policies (None when unset) and the errors that made them take over, by kind
        self.fallback_policies = {"allocator": config.build_allocator(fallback=True), "evictor": config.build_evictor(fallback=True)}
        self.fallbacks: dict[str, PluginError] = {}
        #: the fewest tokens a layer keeps: the largest floor of the evictor and its fallback, and whose it is
        floors = [(checked_floor(self.evictor, self.origins["evictor"]), self.evictor)]
        if self.fallback_policies["evictor"] is not None:
            fallback = self.fallback_policies["evictor"]
            floors.append((checked_floor(fallback, config.info("evictor", fallback=True).origin), fallback))
        self.floor, self.floor_setter = max(floors, key=lambda t: t[0])
        self.original_attn = hf.attn_implementation(model)
        self.backend = self._backend(self.original_attn)
        self.cache: SqueezeCache | None = None  # the cache of the forward running now
        self.last_cache: SqueezeCache | None = None  # the cache of the latest generation
        self.step: Step | None = None
        self._handles: list = []
        self._x: dict[int, torch.Tensor] = {}
        self._importance: dict[int, torch.Tensor] = {}
        self._measuring = False
        #: (L,) importance a batch-level allocator sees for every row instead of the row's own: set by a
        #: micro-batched prefill to the first micro-batch's mean, so that the micro-batches share one allocation
        self.batch_importance: torch.Tensor | None = None
        #: prompt length -> (compressible layers,) budgets of that batch-level allocation, reused by the later
        #: micro-batches instead of asking the allocator again (set and cleared with ``batch_importance``)
        self.batch_allocation: dict[int, torch.Tensor] | None = None
        #: synchronize the device around policy work so `summary()["timings"]` are exact (benchmarks only)
        self.sync_timings = False

    def _backend(self, impl: str | None) -> str:
        if impl == attention.NAME:
            raise InputError(NESTED)
        if impl in _BACKENDS:
            return _BACKENDS[impl]
        if impl and impl.startswith("flash_attention"):
            param = next(self.model.parameters())
            if param.device.type != "cuda" or param.dtype not in (torch.float16, torch.bfloat16):
                raise UnsupportedModelError(
                    f"attn_implementation {impl!r} serves fp16/bf16 models on CUDA only; this model is {param.dtype} on "
                    f"{param.device.type}: load it with attn_implementation='sdpa'"
                )
            return "sdpa"  # per-layer slot masks need SDPA's masked kernels; flash's varlen API cannot express them
        raise UnsupportedModelError(f"attn_implementation {impl!r} is not supported by squeezekit; use 'sdpa' or 'eager'")

    def fall_back(self, kind: str, error: PluginError) -> bool:
        """Replace the failing ``kind`` policy by the config's fallback for the rest of the block, with a warning.

        Returns False (the caller raises ``error``) when no fallback is set or the fallback itself failed.
        """
        fallback = self.fallback_policies[kind]
        if fallback is None or kind in self.fallbacks:
            return False
        warnings.warn(
            f"squeezekit: {error}; falling back to {kind} {fallback.name!r} for the rest of this compress() block",
            PluginFallbackWarning,
            stacklevel=2,
        )
        self.fallbacks[kind] = error
        setattr(self, kind, fallback)
        self.origins[kind] = self.config.info(kind, fallback=True).origin
        return True

    # -- install / uninstall -----------------------------------------------------------------------------------------
    def __enter__(self) -> Compressor:
        r = self.resolved
        if any(module in attention.COMPRESSORS for module in r.attentions):
            raise InputError(NESTED)
        attention.register()
        try:
            for module in r.attentions:
                attention.COMPRESSORS[module] = self
            self._handles.append(r.decoder.register_forward_pre_hook(self._begin, with_kwargs=True))
            self._handles.append(r.decoder.register_forward_hook(self._end, with_kwargs=True))
            for i, (layer, attn) in enumerate(zip(r.layers, r.attentions, strict=True)):
                self._handles.append(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
                self._handles.append(attn.register_forward_hook(self._attention_output(i, layer)))
            hf.set_attn_implementation(self.model, attention.NAME)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type=None, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.resolved.attentions:
            if attention.COMPRESSORS.get(module) is self:
                del attention.COMPRESSORS[module]
        if hf.attn_implementation(self.model) != self.original_attn:
            hf.set_attn_implementation(self.model, self.original_attn)
        self.cache, self.step, self._measuring = None, None, False
        self._x.clear()
        self._importance.clear()
        if exc_type is None and self.last_cache is not None:
            self.last_cache.check_nan()  # NaN scores not yet reported (CUDA checks every 32 steps): the model is restored

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
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
        if isinstance(past, SqueezeCache) and past.compressor is self:
            cache = past
        elif past is None and not use_cache:
            cache = None
        elif past is None or (isinstance(past, hf.Cache) and past.get_seq_length() == 0):
            if self.last_cache is not None:
                self.last_cache.check_nan()  # the previous generation's deferred NaN check
            cache = SqueezeCache(self, len(self.resolved.layers))
        else:
            raise InputError("a non-empty cache not built by this squeezekit.compress block was passed to the model")
        if cache is not None:
            kwargs[self.cache_argument] = cache
        max_pos = getattr(hf.text_config(self.model), "max_position_embeddings", None)
        seen = 0 if cache is None else cache.host_seen_max
        if max_pos and seen + q > max_pos and seen + int(new_valid.sum(-1).max()) > max_pos:
            new = int(new_valid.sum(-1).max())
            raise InputError(
                f"generation past the model's maximum of {max_pos} positions: a sequence would reach {seen + new} tokens "
                f"({seen} so far + {new} in this step); shorten the prompt or lower max_new_tokens"
            )
        if cache is None:
            pos = (new_valid.long().cumsum(-1) - 1).masked_fill(~new_valid, -1)
            self.step = Step(new_valid=new_valid, new_pos=pos, prefill=True, all_valid=bool(new_valid.all()))
        else:
            self.step = cache.begin_step(new_valid, all_valid)
            if self.step.prefill:
                n = new_valid.sum(-1)
                if bool((n == 0).any()):
                    raise InputError(
                        f"sequence {int((n == 0).nonzero()[0])} of the batch is all padding (its attention_mask row is "
                        f"all 0); remove it from the batch"
                    )
                if not self.config.full and bool((n < 2).any()):
                    raise InputError(
                        f"sequence {int((n < 2).nonzero()[0])} of the batch is a 1-token prompt: nothing to compress; "
                        f"give at least 2 tokens, or budget=1 for the full cache"
                    )
        self.cache = cache
        self._measuring = cache is not None and self.step.prefill
        self._importance.clear()
        return args, kwargs

    def _end(self, module, args, kwargs, output):
        cache = self.cache
        if cache is not None:
            if self._measuring:
                layers = range(len(self.resolved.layers))
                cache.importance = torch.stack([self._importance[i].float().cpu() for i in layers], dim=1)
            cache.end_step()
            self.last_cache = cache
            if cache.length % 32 == 0:  # (on CPU, NaN scores are caught as they are returned)
                cache.check_nan()
        self._measuring = False
        self._x.clear()
        self.cache = self.step = None
        return output

    def _layer_input(self, i: int):
        def hook(module, args, kwargs):
            if self._measuring:
                self._x[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _attention_output(self, i: int, layer: torch.nn.Module):
        post_name = self.resolved.arch.post_attention

        def hook(module, args, output):
            if not self._measuring or i not in self._x:
                return
            t0 = self.cache.clock() if self.cache is not None else time.perf_counter()
            out = output[0] if isinstance(output, tuple) else output
            # A sharded model's layer may receive its input on the previous layer's device (accelerate moves it
            # inside the forward, after our pre-hook saw it).
            x = self._x.pop(i).to(out.device, non_blocking=True)
            if post_name:
                out = getattr(layer, post_name)(out)
            # cos(x, h) with h = x + out, from three fp32-accumulated norms (no fp32 copies of the activations):
            # x.h = (|x|^2 + |h|^2 - |out|^2) / 2
            nx = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
            nh = torch.linalg.vector_norm(x + out, dim=-1, dtype=torch.float32)
            no = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32)
            cos = (nx.square() + nh.square() - no.square()) / (2 * nx * nh).clamp_min(1e-12)
            valid = self.step.new_valid.to(cos.device).float()
            self._importance[i] = (cos * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            if self.cache is not None:
                self.cache.timings["importance"] += self.cache.clock() - t0

        return hook

    # -- results ---------------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Budgets, importance and bytes of the latest generation's cache."""
        cache = self.last_cache
        if cache is None or cache.importance is None:
            return {}
        budgets = cache.budgets
        comp = self.compressible
        b = budgets[:, comp].double()
        bounded = b >= 0
        return {
            "importance": cache.importance,
            "budgets": budgets,
            "prompt_len": cache.prompt_len.cpu(),
            "kv_bytes_full": cache.full_kv_bytes_prefill,
            "kv_bytes_kept": cache.kv_bytes_prefill,
            "kv_bytes_now": cache.kv_nbytes(),
            "kv_bytes_peak_prefill": cache.peak_kv_bytes_prefill,
            "mean_budget": float(b[bounded].mean()) if bool(bounded.any()) else float("nan"),
            "min_budget": int(b[bounded].min()) if bool(bounded.any()) else -1,
            "max_budget": int(b[bounded].max()) if bool(bounded.any()) else -1,
            "timings": dict(cache.timings),
        }


@contextmanager
def compress(model: torch.nn.Module, config: Config | dict | str | None = None, **kwargs):
    """Apply a compression config to ``model`` inside a ``with`` block; yields the `Compressor`.

    ``config`` may be a `Config`, a dict, a ``k=v,k=v`` string or a config file path; keyword arguments override it.
    """
    compressor = Compressor(model, Config.coerce(config, **kwargs))
    with compressor:
        yield compressor
