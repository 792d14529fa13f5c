"""Where each supported architecture keeps its decoder stack, layers and attention modules.

squeezekit touches a model only through public hooks (PyTorch forward hooks), transformers' attention registry and
its Cache API; this table just says where to attach them. Layer importance is the cosine similarity between a
layer's input hidden state (the residual stream before its input norm) and that state plus the attention output
(after ``post_attention``, for architectures that normalise the attention output before the residual add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Arch:
    decoder: str  #: dotted path, from the model, to the module that owns the layers and receives the cache
    layers: str  #: attribute of the decoder holding the ModuleList of decoder layers
    attention: str  #: attribute of a decoder layer holding its attention module
    post_attention: str | None = None  #: attribute of a decoder layer applied to the attention output (Gemma3)
    #: the attention module scales its queries itself and calls attention with ``scaling=1.0`` (OPT)
    prescaled_queries: bool = False


_LLAMA_LIKE = Arch("model", "layers", "self_attn")
ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma3_text": Arch("model", "layers", "self_attn", "post_attention_layernorm"),
    "gemma3": Arch("model.language_model", "layers", "self_attn", "post_attention_layernorm"),
    "opt": Arch("model.decoder", "layers", "self_attn", prescaled_queries=True),
    "gpt_neox": Arch("gpt_neox", "layers", "attention"),
    "falcon": Arch("transformer", "h", "self_attention"),
}


@dataclass
class Resolved:
    arch: Arch
    decoder: nn.Module
    layers: list[nn.Module]
    attentions: list[nn.Module]
    compressible: list[int]  #: layers whose budget the allocator sets (full-attention layers)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(model: nn.Module) -> Resolved:
    """Locate the parts of ``model`` squeezekit hooks into, or raise `UnsupportedModelError` naming what is wrong."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    try:
        decoder = _get(model, arch.decoder)
        layers = list(getattr(decoder, arch.layers))
        attentions = [getattr(layer, arch.attention) for layer in layers]
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the expected {model_type} layout ({exc})"
        ) from None
    if model_type == "falcon" and any(type(a).__name__ != "FalconFlashAttention2" for a in attentions):
        raise UnsupportedModelError(
            "Falcon computes eager/SDPA attention inline, bypassing transformers' AttentionInterface, so per-layer "
            "caches cannot be masked; load it with attn_implementation='flash_attention_2' to use squeezekit"
        )
    from .transformers_api import text_config

    types = getattr(text_config(model), "layer_types", None)
    full = [i for i, t in enumerate(types or []) if t == "full_attention"]
    compressible = full if full else list(range(len(layers)))
    return Resolved(arch, decoder, layers, attentions, compressible)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each decoder layer of ``model``, indexed like ``LayerView.layer_idx`` (for an
    evictor's ``prepare``, e.g. to read each layer's output projection)."""
    return resolve(model).attentions


def rope_frequencies(model: nn.Module) -> Any:
    """RoPE's inverse frequencies of the full-attention layers (``inv_freq`` of the decoder's rotary embedding, a
    float tensor of half the rotated dimensions; dimension ``i`` pairs with ``i + len``), or None without RoPE."""
    rotary = getattr(resolve(model).decoder, "rotary_emb", None)
    for name in ("inv_freq", "full_attention_inv_freq"):
        if getattr(rotary, name, None) is not None:
            return getattr(rotary, name)
    return None
