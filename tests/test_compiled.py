"""The decode step with torch.compile'd decoder layers (squeezekit.compiled): same greedy tokens as the eager step
(fp32 on the CPU; the CUDA-graph capture of the compiled step runs in benchmarks/gpu_perf.py), the model restored."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import compiled
from squeezekit.batching import prefill
from squeezekit.cache import SqueezeCache
from squeezekit.decoding import GreedyDecoder


def test_compiled_layers_give_the_same_tokens_and_are_removed_after():
    model = tiny_model("mistral")
    ids, _ = batch(4, 40)
    update = SqueezeCache.__dict__["update"]

    def run(compile):
        with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4) as c:
            cache, logits = prefill(model, c, ids, None, micro_batch=2)
            decoder = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False, compile=compile)
            assert decoder.compile is compile
            first = decoder.run(5)
            assert all(layer._compiled_call_impl is None for layer in model.model.layers)
            return torch.cat([first, decoder.run(3)], dim=1)  # a second run compiles again, reusing the code

    torch._dynamo.reset()
    ref = run(False)
    got = run(True)
    assert torch.equal(got, ref)
    assert SqueezeCache.__dict__["update"] is update  # the opaque wrapper is gone


def test_a_layer_that_fails_to_compile_runs_eagerly_with_the_eager_tokens(monkeypatch):
    """No working compiler (a backend that raises): every layer falls back to its eager frame before running any of
    its work, so the decode gives the eager tokens, and the next decode compiles normally again."""
    model = tiny_model("llama")
    ids, _ = batch(2, 40)
    calls = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C compiler")

    def run(compile):
        with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4) as c:
            cache, logits = prefill(model, c, ids, None, micro_batch=2)
            return GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False, compile=compile).run(4)

    ref = run(False)
    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "BACKEND", broken)
    got = run(True)
    assert calls  # it did try
    assert torch.equal(got, ref)
    torch._dynamo.reset()


def test_compile_is_on_by_default_on_cuda_only_and_checks_its_mode():
    ids = torch.zeros(2, dtype=torch.long)
    assert compiled.wanted(None, ids) is False  # CPU: eager
    assert compiled.wanted(None, torch.device("cuda")) is True  # (the default kernels, where a GPU would be)
    assert compiled.wanted(True, ids) is True
    with pytest.raises(ValueError, match="Inductor's CUDA graphs must stay off"):
        with compiled.compiled_layers(tiny_model("llama"), mode="reduce-overhead"):
            pass


def test_the_compiled_layers_compile_once_for_every_layer():
    """One compilation serves every decoder layer: the layer index is not a guard (before, torch.compile compiled
    the layer once per index and stopped at its recompile limit of 8, so most layers of a 32-layer model ran
    uncompiled). The graphs compiled do not grow with the number of layers."""
    from torch._dynamo.utils import counters

    graphs = {}
    for layers in (3, 6):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_model("llama", num_hidden_layers=layers)
        ids, _ = batch(2, 40)
        with squeezekit.compress(model, evictor="streaming", budget=0.5, window=4) as c:
            cache, logits = prefill(model, c, ids, None, micro_batch=2)
            GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False, compile=True).run(3)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs[3] == graphs[6] > 0, graphs
