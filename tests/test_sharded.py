"""A model sharded layer-wise over several GPUs with accelerate's device_map (skipped without 2 CUDA devices)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_model

import squeezekit

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _sharded(arch: str):
    from accelerate import dispatch_model
    from squeezekit.evaluators.bench_models import layer_device_map

    model = tiny_model(arch, num_hidden_layers=4)
    return dispatch_model(model, device_map=layer_device_map(4, 2), skip_keys=model._skip_keys_device_placement)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_full_budget_exact_and_caches_live_on_their_layers_devices(arch):
    model = _sharded(arch)
    ids, mask = batch(3, 40, pad=5)
    ids, mask = ids.to("cuda:0"), mask.to("cuda:0")
    ref = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with squeezekit.compress(model, budget=1.0):
        logits = model(ids, attention_mask=mask, use_cache=True).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert (logits - ref)[mask.bool()].abs().max().item() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    with squeezekit.compress(model, evictor="h2o", budget=0.3, window=2) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = c.last_cache
    per_device: dict[str, int] = {}
    for i, layer in enumerate(cache.layers):
        expected = model.model.layers[i].self_attn.q_proj.weight.device
        assert layer.keys.device == expected and layer.values.device == expected
        per_device[str(expected)] = per_device.get(str(expected), 0) + layer.kv_nbytes()
    assert set(per_device) == {"cuda:0", "cuda:1"}
    assert sum(per_device.values()) == cache.kv_nbytes() == c.summary()["kv_bytes_now"]


def test_quantized_slots_live_on_their_layers_devices():
    """kv_bits=8 on a sharded model: each layer's quantized parts are on its own device, and decode runs."""
    model = _sharded("llama")
    ids, mask = batch(2, 40, pad=5)
    ids, mask = ids.to("cuda:0"), mask.to("cuda:0")
    with squeezekit.compress(model, evictor="h2o", budget=0.3, window=2, kv_bits=8) as c:
        model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        cache = c.last_cache
    for i, layer in enumerate(cache.layers):
        expected = model.model.layers[i].self_attn.q_proj.weight.device
        assert layer.quantized and all(t.device == expected for t in layer.quant.values())
