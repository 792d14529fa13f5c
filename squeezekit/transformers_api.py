"""Everything squeezekit relies on inside Hugging Face transformers, in one place.

squeezekit uses transformers only through the items below; each says what it relies on. When a release changes one
of them, the fix belongs in this file. Tested range: `TESTED` (pyproject.toml and the README state the same;
tests/test_transformers_api.py checks that they agree). Releases outside it work as far as these items hold, after
one warning line (`check_version`).

Used as is, without a wrapper (public, stable API):
  - ``AutoModelForCausalLM.from_pretrained(dir, dtype=, attn_implementation=, local_files_only=, gguf_file=)``,
    ``AutoConfig.for_model``, ``from_config``, ``save_pretrained``, ``AutoTokenizer`` (squeezekit.models, bench);
  - ``StoppingCriteria`` / ``StoppingCriteriaList`` passed as ``generate(stopping_criteria=...)``, called once per
    new token (bench: the time of transformers' first new token, evaluators/bench_models.py);
  - ``model.generate``: builds an empty `Cache` for the first forward and feeds each forward's returned cache to the
    next (so the cache the compressor substitutes is the one generation keeps); the forward's ``logits_to_keep``;
    ``position_ids`` from the attention mask (each left-padded sequence starts at 0), as squeezekit's own prefill
    and decoder give them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import UntestedVersionWarning

#: the transformers releases the suite passes on (lowest tested .. newest tested, next minor excluded)
TESTED_RANGE = ">=5.0,<5.25"
TESTED = SpecifierSet(TESTED_RANGE)

# -- the cache ------------------------------------------------------------------------------------------------------
#: base classes of squeezekit's cache. Relied on: ``Cache(layers=[...])`` keeps the layer objects it is given and
#: routes ``update(k, v, layer_idx, ...)`` / ``get_seq_length`` to them; a layer implements ``lazy_initialization``,
#: ``update``, ``get_seq_length``, ``get_max_length`` (``get_max_cache_shape`` before 5.13), ``get_mask_sizes``,
#: ``reset``, ``batch_select_indices``,
#: ``batch_repeat_interleave``, ``reorder_cache`` and the flags ``is_sliding``, ``is_compileable``, ``is_croppable``.
from transformers.cache_utils import Cache as Cache  # noqa: E402
from transformers.cache_utils import CacheLayerMixin as CacheLayerMixin  # noqa: E402

#: the forward keyword that carries the cache: ``cache`` from 5.24 on, ``past_key_values`` before (5.24 still maps
#: the old name to the new one, with a deprecation warning)
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(module: Any) -> str:
    """The keyword under which ``module``'s forward takes the cache (read from its signature)."""
    params: Mapping[str, Any]
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    return next((name for name in CACHE_NAMES if name in params), CACHE_NAMES[-1])


def cache_in(kwargs: dict) -> Any:
    """The cache among a forward's keyword arguments, under either name (None if absent)."""
    return next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)


def pop_cache(kwargs: dict) -> Any:
    """Take the cache out of a forward's keyword arguments (both names), returning it (None if absent)."""
    found = cache_in(kwargs)
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    return found


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` from 5.24 on, ``output.past_key_values`` before)."""
    for name in CACHE_NAMES:
        if name in output.keys():  # a ModelOutput holds its non-None fields as keys
            return output[name]
    return None


# -- attention ---------------------------------------------------------------------------------------------------------
def register_attention(name: str, function: Any) -> None:
    """Make ``attn_implementation=name`` select ``function``. Relied on: every supported model calls it as
    ``function(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)`` with query (B, Hq, q, D),
    key/value (B, H, C, D) as returned by the cache's ``update``, ``module.layer_idx`` set, the keyword arguments
    ``sliding_window`` / ``softcap`` where the layer has them, and expects ``(output (B, q, Hq, D), weights)``.
    Also relied on: keyword arguments given to the decoder stack's forward reach that function unchanged
    (TransformersKwargs), which is how squeezekit passes each forward's step context down."""
    transformers.AttentionInterface.register(name, function)


def attn_implementation(model: Any) -> str | None:
    """The attention implementation the model runs now (``config._attn_implementation``)."""
    return model.config._attn_implementation


def set_attn_implementation(model: Any, name: str | None) -> None:
    """Switch every attention layer of ``model`` to ``name`` (``PreTrainedModel.set_attn_implementation``)."""
    model.set_attn_implementation(name)


# -- model configuration ---------------------------------------------------------------------------------------------
def text_config(model: Any) -> Any:
    """The decoder's config (``config.get_text_config(decoder=True)``; multimodal models nest it). Relied on:
    ``layer_types`` (``"full_attention"`` marks the layers squeezekit budgets) and ``max_position_embeddings``."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class Geometry:
    """What one layer's attention calls always pass to the attention function, read once from the model when a
    cache is built (the layer kind and the attention plan depend on it; the attention function never learns it)."""

    window: int | None  #: the model's own sliding window (``sliding_window``), None for full attention
    scaling: float  #: the softmax scale (``scaling``)
    softcap: float | None  #: the logit soft-capping (``softcap``), None for none


def attention_geometry(attention: Any, config: Any, prescaled_queries: bool = False) -> Geometry:
    """A layer's `Geometry`. Relied on (tests/test_transformers_api.py checks each supported architecture against
    what its attention calls really pass): the attention module's ``scaling`` (every supported model sets it; else
    ``head_dim ** -0.5``, what the attention function assumes without one; 1 where the module scales its queries
    itself, ``prescaled_queries``: OPT) and ``attn_logit_softcapping``; its ``sliding_window`` when the module has one
    (Qwen2, Qwen3, Gemma3: per layer type), else the config's ``sliding_window`` for every layer (Mistral, Mixtral,
    Phi3 pass ``config.sliding_window`` to every call)."""
    scaling = 1.0 if prescaled_queries else getattr(attention, "scaling", None)
    if scaling is None:
        head_dim = getattr(attention, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scaling = head_dim**-0.5
    if hasattr(attention, "sliding_window"):
        window = attention.sliding_window
    else:
        window = getattr(config, "sliding_window", None)
    softcap = getattr(attention, "attn_logit_softcapping", None)
    return Geometry(
        window=int(window) if window else None,
        scaling=float(scaling),
        softcap=float(softcap) if softcap else None,
    )


# -- generation --------------------------------------------------------------------------------------------------------
#: generation-config fields that never change which token greedy search picks or when it stops (sampling-only
#: warpers, beam-only knobs, output switches, the special ids read separately, and ``max_length``, which the caller
#: passes explicitly)
GREEDY_NEUTRAL = frozenset({
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "length_penalty", "early_stopping", "use_cache", "output_attentions", "output_hidden_states", "output_scores",
    "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id", "max_length", "transformers_version",
})  # fmt: skip


def greedy_eos(model: Any, kwargs: dict) -> tuple[int, ...] | None:
    """The end-of-sequence ids at which ``model.generate(**kwargs)`` ends a sequence, when that call is plain greedy
    search; None when it is not (sampling, beams, or any logits processor or extra stopping rule).

    Relied on: ``model.generation_config`` updated with ``kwargs`` (``GenerationConfig.update`` returns the keys it
    does not know) is what ``generate`` runs with; a field at `GenerationConfig`'s default adds no logits processor
    and no stopping criterion; with ``do_sample`` false and one beam, ``generate`` takes the argmax of the last
    position's logits; ``eos_token_id`` (an int or a list) ends a sequence, which then gets ``pad_token_id``.
    """
    import copy

    from transformers import GenerationConfig

    config = copy.deepcopy(model.generation_config)
    if config.update(**kwargs):  # something generate would take as a model input, not a generation setting
        return None
    if config.do_sample or (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return None
    default = GenerationConfig().to_dict()
    for key, value in config.to_dict().items():
        if key.startswith("_") or key in GREEDY_NEUTRAL or key in ("do_sample", "num_beams", "num_return_sequences"):
            continue
        if value != default.get(key):
            return None
    eos = config.eos_token_id
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


# -- versions ----------------------------------------------------------------------------------------------------------
def version_problem(version: str | None = None) -> str | None:
    """One line naming the installed transformers and the tested range when it lies outside; else None."""
    if version is None:
        import transformers as installed  # (the module now in sys.modules: a test may have replaced it)

        version = installed.__version__
    if TESTED.contains(Version(version).base_version):  # 5.24.1.dev0 counts as 5.24.1
        return None
    return f"transformers {version} is untested with squeezekit (tested: {TESTED_RANGE}); results may be wrong or fail"


_checked = False


def check_version() -> None:
    """Warn once per process, in one line, when transformers lies outside `TESTED`."""
    global _checked
    if _checked:
        return
    _checked = True
    problem = version_problem()
    if problem:
        # warn_explicit with no source line: the warning prints as one line
        warnings.warn_explicit(problem, UntestedVersionWarning, "squeezekit", 0, module="squeezekit")
