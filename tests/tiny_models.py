"""Tiny random-weight models of every supported architecture, built in the test process (nothing downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)


def _configs():
    return {
        "llama": lambda: tf.LlamaConfig(**COMMON, intermediate_size=128, num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(
            **COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=None
        ),
        "mistral_window": lambda: tf.MistralConfig(
            **COMMON, intermediate_size=128, num_key_value_heads=2, sliding_window=24
        ),
        "mixtral": lambda: tf.MixtralConfig(
            **COMMON,
            intermediate_size=64,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
        "qwen2": lambda: tf.Qwen2Config(**COMMON, intermediate_size=128, num_key_value_heads=2),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "phi3": lambda: tf.Phi3Config(**COMMON, intermediate_size=128, num_key_value_heads=2, pad_token_id=0),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 6},
            intermediate_size=128,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
        ),
        "opt": lambda: tf.OPTConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
            pad_token_id=1,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**COMMON, intermediate_size=128),
    }


ARCHS = list(_configs())
#: the model types of squeezekit.architectures.ARCHITECTURES no tiny model is built for, and why (every other one has
#: one: tests/test_data_path.py checks that the two agree)
UNBUILT = {
    "falcon": "served only with flash_attention_2, which needs CUDA (its eager / SDPA error: tests/test_errors.py)",
    "gemma3": "the multimodal Gemma3 (its decoder at model.language_model); its text model, gemma3_text, is built",
}


def model_type(name: str) -> str:
    """The ``config.model_type`` of tiny model ``name`` (``gemma3`` builds the text model, ``gemma3_text``)."""
    return _configs()[name]().model_type


def tiny_model(name: str, attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = _configs()[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def batch(n: int = 3, length: int = 40, pad: int = 0, seed: int = 0, vocab: int = 128):
    """Left-padded random prompts: row i loses ``i * pad`` leading tokens to padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, : i * pad] = 0
        ids[i, : i * pad] = 0
    return ids, mask


# ---- "the model is exactly as before": what squeezekit.compress must leave untouched ---------------------------

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hook_counts(model) -> dict[str, int]:
    """Hooks of every kind on every module, plus torch's global module hooks."""
    import torch.nn.modules.module as mod

    counts = {f"{name}:{attr}": len(getattr(m, attr)) for name, m in model.named_modules() for attr in _HOOK_DICTS}
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        counts[attr] = len(getattr(mod, attr))
    return counts


def attn_implementations(model) -> dict[str, object]:
    """The attention implementation every (sub-)config of the model reports."""
    out = {}
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if config is not None:
            out[name] = (config._attn_implementation, getattr(config, "_attn_implementation_internal", None))
    return out


def snapshot(model, ids, mask) -> dict:
    """Everything `assert_restored` compares: modules, attention implementation, hooks, parameters, outputs."""
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "attn": attn_implementations(model),
        "hooks": hook_counts(model),
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "logits": logits,
    }


def assert_restored(model, before: dict, ids, mask) -> None:
    """The model is exactly as `snapshot` saw it: no hook, attention implementation or weight left changed."""
    after = snapshot(model, ids, mask)
    assert after["modules"] == before["modules"]
    assert after["attn"] == before["attn"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    assert torch.equal(after["logits"], before["logits"])


def applicable(allocator: str = "squeeze", evictor: str = "streaming", **params) -> dict:
    """``allocator``, ``evictor`` and those of ``params`` they take (a parameter no chosen plugin has is an error)."""
    import squeezekit

    reg = squeezekit.registry()
    taken = {**reg.allocators[allocator].params(), **reg.evictors[evictor].params()}
    return {"allocator": allocator, "evictor": evictor, **{k: v for k, v in params.items() if k in taken}}
