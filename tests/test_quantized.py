"""Quantized slots (``kv_bits``): the codec, the memory held, the serving path, the fused decode kernel."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_factory import bundled
from tiny_models import applicable, batch, tiny_model

import squeezekit
from squeezekit import ConfigError
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder
from squeezekit.layers import BudgetedLayer
from squeezekit.quantized import SlotCodec

GREEDY = dict(do_sample=False, pad_token_id=0)


def _generate(model, ids, mask, new=6, **config):
    with squeezekit.compress(model, **config) as c:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, output_scores=True,
                             return_dict_in_generate=True, **GREEDY)  # fmt: skip
        return out, c.summary(), c


# ---- the codec ------------------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from([8, 4]),
    dim=st.integers(1, 160),
    scale=st.floats(1e-3, 1e3),
    constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_slot_decodes_within_half_a_step_of_what_was_written(bits, dim, scale, constant, seed):
    """Every channel comes back within half a quantization step (plus the fp16 rounding of the scales); constant
    slots come back to the fp16 precision of their scale (a zero key exactly); the bytes are what the layout says."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, dim, generator=g) * scale
    if constant:
        x = torch.full_like(x, 0.0 if seed % 2 else scale)
    c = SlotCodec(bits, dim)
    parts = c.encode(x)
    y = c.decode(parts, torch.float32)
    assert y.shape == x.shape
    assert sum(p[0, 0, 0].numel() * p.element_size() for p in parts) == c.slot_bytes()
    if constant:
        # the scale is rounded up to fp16: 2^-10 relative while it is a normal fp16 number, and below 2^-14 (absmax
        # under 127 * 2^-14 at 8 bits) a subnormal one, whose spacing 2^-24 bounds the error of 127 codes instead
        assert bool(((y - x).abs() <= x.abs() * 2**-10 + 127 * 2**-24).all())
        assert bool((y[x == 0] == 0).all())
        return
    if bits == 8:
        exact = x.abs().amax(-1, keepdim=True) / 127
        stored = parts[1].float()
    else:
        gs = c.group
        xs = torch.nn.functional.pad(x, (0, c.groups * gs - dim), value=float("nan")).view(*x.shape[:-1], c.groups, gs)
        exact = (xs.nan_to_num(float("-inf")).amax(-1) - xs.nan_to_num(float("inf")).amin(-1)) / 15
        stored = parts[1].float()
    # the stored step is the exact one rounded up to fp16 (never smaller: no channel is clamped; 4 bits: the low end
    # rounded down widens it by at most the low end's own rounding)
    widen = 0 if bits == 8 else x.abs().amax(-1, keepdim=True) * 2**-9
    assert bool((stored >= exact).all()) and bool((stored <= exact * (1 + 2**-9) + widen + 2**-23).all())
    step = stored.repeat_interleave(c.group, -1)[..., :dim]
    err = (y - x).abs()
    assert bool((err <= step * 0.5 + step * 1e-3 + x.abs() * 1e-3 * (bits == 4) + 1e-7).all())


def test_the_bytes_a_slot_takes_meet_the_issue_s_ratios_at_the_usual_head_sizes():
    """8 bits: D + 2 bytes a slot; 4 bits: D / 2 + 4 per group of 64 channels (against 2 D for bf16)."""
    for dim in (64, 128):
        assert SlotCodec(8, dim).slot_bytes() == dim + 2
        assert SlotCodec(4, dim).slot_bytes() == dim // 2 + 4 * (dim // 64 if dim > 64 else 1)
        assert SlotCodec(8, dim).slot_bytes() / (2 * dim) <= 0.11 / 0.2
        assert SlotCodec(4, dim).slot_bytes() / (2 * dim) <= 0.06 / 0.2


# ---- the config key -------------------------------------------------------------------------------------------------
def test_kv_bits_is_a_core_key_in_every_front_end():
    c = squeezekit.Config.from_label("squeeze+h2o@0.2/kv_bits=8")
    assert c.kv_bits == 8 and c.label == "squeeze+h2o@0.2/kv_bits=8"
    assert squeezekit.Config.from_string("evictor=h2o,kv_bits=4").kv_bits == 4
    assert "kv_bits" not in squeezekit.Config().as_dict()  # the default is left out of labels
    assert squeezekit.Config.from_kwargs(kv_bits=16).label == squeezekit.Config().label
    assert "8-bit slots" in squeezekit.Config.from_kwargs(kv_bits=8).describe()


@pytest.mark.parametrize("value", [5, 32, 0, "eight", 8.5])
def test_a_bad_kv_bits_is_a_one_line_error(value):
    with pytest.raises(ConfigError) as err:
        squeezekit.Config.from_kwargs(kv_bits=value)
    assert "kv_bits" in str(err.value) and "\n" not in str(err.value)


def test_kv_bits_with_the_full_cache_says_what_to_do():
    with pytest.raises(ConfigError, match="use a budget below 1 with it, or kv_bits=16"):
        squeezekit.Config.from_kwargs(budget=1, kv_bits=8)


# ---- the cache ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,limit", [(8, 0.11), (4, 0.06)])
def test_the_kv_bytes_at_budget_02_meet_the_target_in_bf16(bits, limit):
    """At budget 0.2 in bf16 (head_dim 64, as SmolLM2's), the keys and values held, scales included, are at most
    0.11 (8 bits) and 0.06 (4 bits) of the full cache's; what the layers hold is exactly what their parts take."""
    model = tiny_model("llama", head_dim=64, hidden_size=128, num_attention_heads=2, num_key_value_heads=2).to(
        torch.bfloat16
    )
    ids, mask = batch(2, 200, pad=0)
    _, summary, c = _generate(model, ids, mask, new=4, evictor="snapkv", budget=0.2, kv_bits=bits)
    _, plain, _ = _generate(model, ids, mask, new=4, evictor="snapkv", budget=0.2)
    assert summary["kv_bytes_kept"] / summary["kv_bytes_full"] <= limit
    assert summary["kv_bytes_full"] == plain["kv_bytes_full"]
    ratio = SlotCodec(bits, 64).slot_bytes() / 128
    assert summary["kv_bytes_kept"] == pytest.approx(plain["kv_bytes_kept"] * ratio, rel=0.02)
    for layer in c.last_cache.layers:
        if isinstance(layer, BudgetedLayer):
            assert layer.quantized and layer._keys is None and layer._values is None  # the bf16 buffers are gone
            assert layer.kv_nbytes() == sum(t.numel() * t.element_size() for t in layer.quant.values())
            assert layer.quant["k_codes"].dtype == (torch.int8 if bits == 8 else torch.uint8)


@pytest.mark.parametrize("evictor", bundled("evictor"))
def test_8_bit_slots_work_with_every_bundled_evictor_and_stay_close_to_16_bits(evictor):
    """Every bundled evictor runs on 8-bit slots; the first decode step's logits move by little (what is kept is
    the same: the prefill attends over the unquantized keys)."""
    model = tiny_model("llama")
    ids, mask = batch(3, 96, pad=9)
    config = dict(budget=0.2, **applicable("uniform", evictor, sinks=2, window=4))
    ref, s16, _ = _generate(model, ids, mask, **config)
    out, s8, c = _generate(model, ids, mask, kv_bits=8, **config)
    assert torch.equal(ref.scores[0], out.scores[0])  # the prefill's logits: attention over the projections
    assert float((ref.scores[1] - out.scores[1]).abs().max()) < 0.05 * float(ref.scores[1].abs().max())
    assert s8["kv_bytes_now"] < 0.3 * s16["kv_bytes_now"]  # (fp32 model: 8-bit slots are about a quarter)


@pytest.mark.parametrize("allocator", bundled("allocator"))
def test_4_bit_slots_work_with_every_bundled_allocator(allocator, tmp_path):
    model = tiny_model("llama")
    ids, mask = batch(2, 96, pad=9)
    config = dict(budget=0.2, **applicable(allocator, "h2o", window=4))
    if allocator == "calibrated":
        from test_fast_path import _profile_for

        config["profile"] = _profile_for(model, "h2o", {"window": 4}, tmp_path)
    out, summary, c = _generate(model, ids, mask, kv_bits=4, **config)
    assert out.sequences.shape[1] == 96 + 6
    assert summary["kv_bytes_held"] > 0 and c.config.kv_bits == 4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("heads", ["uniform", "adaptive"])
@pytest.mark.parametrize("evictor", ["streaming", "h2o", "snapkv", "tova"])
def test_the_serving_path_gives_generates_tokens_on_quantized_slots(evictor, heads, bits):
    """Micro-batched prefill (each micro-batch quantized, then merged and pooled) + the greedy decoder give
    ``model.generate``'s tokens on quantized slots, with either head split."""
    if heads == "adaptive" and evictor == "streaming":
        pytest.skip("streaming ranks by position: its heads split equally")
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    model.generation_config.eos_token_id = None
    ids, mask = batch(4, 160, pad=12)
    config = dict(budget=0.1, heads=heads, kv_bits=bits, **applicable("uniform", evictor, sinks=2, window=4))
    with squeezekit.compress(model, **config) as c:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)[:, 160:]
        cache, logits = prefill(model, c, ids, mask, micro_batch=2)
        for layer in cache.layers:
            if isinstance(layer, BudgetedLayer):
                assert layer.quantized
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=False).run(7)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), ref)


def test_scoring_extends_a_quantized_cache():
    """Multi-token steps after prefill (lm-eval's scoring extends the cache) write quantized tokens and evict."""
    model = tiny_model("llama")
    ids, mask = batch(2, 80)
    with squeezekit.compress(model, evictor="h2o", budget=0.25, kv_bits=8) as c:
        cache = c.new_cache()
        model(input_ids=ids[:, :64], attention_mask=mask[:, :64], use_cache=True, **c.cache_kwargs(cache))
        out = model(input_ids=ids[:, 64:], attention_mask=mask, use_cache=True, **c.cache_kwargs(cache))
    ref = model(input_ids=ids, attention_mask=mask).logits[:, 64:]
    assert out.logits.shape == ref.shape and bool(torch.isfinite(out.logits).all())
    for layer in cache.layers:
        if isinstance(layer, BudgetedLayer):
            assert layer.quantized and int(layer.counts().max()) <= int(layer.budget.max())


# ---- the fused decode kernel (Triton's interpreter on the CPU) ------------------------------------------------------
@pytest.mark.parametrize("slots_m", [False, True], ids=["heads-on-M", "slots-on-M"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("B,H,G,D", [(2, 2, 2, 16), (1, 3, 1, 24), (2, 1, 4, 130)])
def test_the_decode_kernel_on_quantized_rows_equals_dequantize_then_attend_in_fp32(bits, B, H, G, D, slots_m):
    """In either orientation of the kernel's dots (the query heads or the slots on their M axis)."""
    pytest.importorskip("triton")
    import numpy as np

    from squeezekit import kernels
    from squeezekit.attention import _fold, _unfold
    from squeezekit.kernels import decode
    from squeezekit.layers import HeadPool

    g = torch.Generator().manual_seed(B * 7 + H + D)
    codec = SlotCodec(bits, D)
    caps = np.random.default_rng(B + H + D).integers(3, 40, size=(B, H))
    C0 = int(caps.max())
    k, v = torch.randn(B, H, C0, D, generator=g) * 2, torch.randn(B, H, C0, D, generator=g)
    parts = dict(zip(codec.names("k"), codec.encode(k), strict=True))
    parts.update(zip(codec.names("v"), codec.encode(v), strict=True))
    pool = HeadPool.pack(parts, caps)
    valid = pool.mapped() & (torch.rand(pool.slot_map.shape, generator=g) > 0.2)
    valid[..., 0] = True
    query = torch.randn(B, H * G, 1, D, generator=g)
    rect = pool.rect()
    k_ref = codec.decode(tuple(rect[n] for n in codec.names("k")), torch.float32)
    v_ref = codec.decode(tuple(rect[n] for n in codec.names("v")), torch.float32)
    C = valid.shape[-1]
    mask = valid[:, :, None, :].expand(B, H, G, C).reshape(B, H, G, C)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = _unfold(sdpa(_fold(query, H), k_ref, v_ref, attn_mask=mask, scale=0.3), H * G, 1)
    keys = tuple(pool.parts[n] for n in codec.names("k"))
    values = tuple(pool.parts[n] for n in codec.names("v"))
    with kernels.configured("pooled", interpret=True):
        tile = (64, 4, 2, slots_m)  # (under the interpreter the kernel takes 16 slots a tile)
        out = decode.pooled_decode_attention(query, keys, values, pool.offsets, pool.lengths, valid, 0.3, codec, tile)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots_m", [False, True], ids=["heads-on-M", "slots-on-M"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("B,H,G,D,v_scale", [(2, 2, 4, 16, 1.0), (3, 2, 2, 24, 1e-3), (2, 2, 4, 128, 30.0)])
def test_codes_in_fp16_dots_equal_dequantize_then_attend_to_fp16s_precision(B, H, G, D, v_scale, bits, slots_m):
    """With a 16-bit query, 8- and 4-bit codes may enter fp16 dots through an integer trick (`FP16_CODES`, no
    conversion instructions), the query and each 8-bit tile's weights rescaled by powers of two into fp16's range:
    the output is the fp32 reference's to fp16's precision, for values far from 1 too (the weights of tiny values
    would be subnormal in fp16 without the rescaling)."""
    pytest.importorskip("triton")
    import numpy as np

    from squeezekit import kernels
    from squeezekit.attention import _fold, _unfold
    from squeezekit.kernels import decode
    from squeezekit.layers import HeadPool

    g = torch.Generator().manual_seed(B * 7 + H + D)
    codec = SlotCodec(bits, D)
    caps = np.random.default_rng(B + H + D).integers(3, 40, size=(B, H))
    k, v = torch.randn(B, H, int(caps.max()), D, generator=g) * 2, torch.randn(B, H, int(caps.max()), D, generator=g)
    parts = dict(zip(codec.names("k"), codec.encode(k), strict=True))
    parts.update(zip(codec.names("v"), codec.encode(v * v_scale), strict=True))
    pool = HeadPool.pack(parts, caps)
    valid = pool.mapped() & (torch.rand(pool.slot_map.shape, generator=g) > 0.2)
    valid[..., 0] = True
    query = (torch.randn(B, H * G, 1, D, generator=g) * 30).half()
    rect = pool.rect()
    # 8-bit codes are exact in fp16 (their scales apply in fp32); 4-bit slots are dequantized into fp16, as the torch
    # path dequantizes into the model's dtype: rounded once
    dtype = torch.float32 if bits == 8 else torch.float16
    k_ref, v_ref = (codec.decode(tuple(rect[n] for n in codec.names(w)), dtype).float() for w in "kv")
    C = valid.shape[-1]
    mask = valid[:, :, None, :].expand(B, H, G, C).reshape(B, H, G, C)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = _unfold(sdpa(_fold(query.float(), H), k_ref, v_ref, attn_mask=mask, scale=0.1), H * G, 1)
    keys, values = (tuple(pool.parts[n] for n in codec.names(w)) for w in "kv")
    with kernels.configured("pooled", interpret=True):
        tile = (64, 4, 2, slots_m, True)
        out = decode.pooled_decode_attention(query, keys, values, pool.offsets, pool.lengths, valid, 0.1, codec, tile)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("heads", ["uniform", "adaptive"])
def test_decode_reads_quantized_slots_in_the_fused_kernel_with_generate_s_tokens(heads, monkeypatch):
    """Decode steps read the quantized slots in the fused kernel (Triton's interpreter here), never dequantizing
    a whole layer, with the torch path's tokens and logits."""
    pytest.importorskip("triton")
    from squeezekit import kernels
    from squeezekit.kernels import decode

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    ids, mask = batch(2, 96, pad=9)
    config = dict(allocator="uniform", evictor="snapkv", heads=heads, budget=0.2, kv_bits=8)
    ref, _, _ = _generate(model, ids, mask, new=4, **config)
    launches, decodes = [], []
    real = decode.pooled_decode_attention
    monkeypatch.setattr(decode, "pooled_decode_attention", lambda *a: launches.append(1) or real(*a))
    real_decode = SlotCodec.decode
    monkeypatch.setattr(SlotCodec, "decode", lambda *a: decodes.append(len(launches)) or real_decode(*a))
    with kernels.configured("pooled", interpret=True):
        out, _, _ = _generate(model, ids, mask, new=4, **config)
        assert kernels.settings.failed == {}
    assert launches and not [d for d in decodes if d > 0]
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.scores, out.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _hard_slots(g: torch.Generator, n: int, D: int) -> torch.Tensor:
    """(n, D) slots that probe the encoding's edges: every magnitude from subnormal scales to large ones, zero and
    constant slots, one-signed slots, and channels that sit on a rounding tie of their code."""
    x = torch.randn(n, D, generator=g) * torch.logspace(-7, 3, n)[:, None]
    x[0] = 0.0
    x[1] = 0.37
    x[2] = -x[2].abs()
    x[3] = x[3].abs() + 5
    x[4] = torch.arange(D) - 0.5 * (D - 1)  # channels at code + 1/2 for some scales
    x[5, ::2] = 127 * 2.0**-20  # a subnormal fp16 scale
    x[6] = torch.linspace(-1, 1, D) * 1e-5
    # per 4-bit group: a range whose low + 15 scale falls short of its high once both are in fp16 (scale rounded up
    # once more), and a low that rounds to -0 in fp16 (rounded down to -2**-24)
    low, high = -0.0008531321072950959, 17.914186477661133
    x[7] = low + (high - low) * torch.rand(D, generator=g)
    x[8] = torch.rand(D, generator=g)
    for start in range(0, D, 64):
        x[7, start : start + 2] = torch.tensor([low, high])[: D - start]
        x[8, start] = -1e-9
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("D", [16, 24, 64, 80, 128])
@pytest.mark.parametrize("pooled", [False, True])
def test_the_steady_kernel_writes_the_codecs_bytes_into_the_victims_slot(bits, D, pooled, monkeypatch):
    """The fused steady write quantizes the new token itself: its codes, scales (and lows) at the victim's slot are
    bit for bit what `SlotCodec.encode` gives, into rectangular buffers or a pool's rows; nothing else moves. (4-bit
    slots take the plain path by default, `steady.FUSED_BITS`: the kernel is tested here all the same.)"""
    pytest.importorskip("triton")
    from squeezekit.kernels import steady

    monkeypatch.setattr(steady, "FUSED_BITS", (16, 8, 4))
    import numpy as np

    from squeezekit import kernels
    from squeezekit.kernels.steady import steady_write
    from squeezekit.layers import HeadPool

    g = torch.Generator().manual_seed(D + bits)
    codec = SlotCodec(bits, D)
    B, H, S = 4, 3, 23
    caps = np.random.default_rng(D).integers(8, S + 1, size=(B, H)) if pooled else np.full((B, H), S)
    caps[0, 0] = S
    old = _hard_slots(g, B * H * S, D).view(B, H, S, D)
    parts = dict(zip(codec.names("k"), codec.encode(old), strict=True))
    parts.update(zip(codec.names("v"), codec.encode(old.flip(-1)), strict=True))
    pool = HeadPool.pack(parts, caps) if pooled else None
    store = pool.parts if pool is not None else parts
    valid = pool.mapped() if pool is not None else torch.ones(B, H, S, dtype=torch.bool)
    score = torch.rand(B, H, valid.shape[-1], generator=g)
    positions = torch.arange(valid.shape[-1], dtype=torch.int32).expand(B, H, -1).contiguous()
    k, v = (_hard_slots(g, B * H, D)[torch.randperm(B * H, generator=g)].view(B, H, 1, D) for _ in range(2))
    before = {name: t.clone() for name, t in store.items()}
    with kernels.configured("steady", interpret=True):
        victim = steady_write(
            score, valid, positions, tuple(store[n] for n in codec.names("k")),
            tuple(store[n] for n in codec.names("v")), None, 0.0, k, v, torch.full((B, 1), 99),
            torch.zeros((), dtype=torch.bool), codec, None if pool is None else pool.offsets,
        )  # fmt: skip
    assert victim is not None
    assert torch.equal(victim[..., 0], torch.where(valid, score, float("inf")).argmin(-1))
    want = dict(zip(codec.names("k"), codec.encode(k), strict=True))
    want.update(zip(codec.names("v"), codec.encode(v), strict=True))
    rows = pool.offsets[..., None] + victim if pool is not None else None
    for name, t in store.items():
        expect = before[name].clone()
        if pool is not None:
            expect[rows.reshape(-1)] = want[name].reshape(-1, t.shape[-1])
        else:
            expect.scatter_(2, victim[..., None].expand(B, H, 1, t.shape[-1]), want[name])
        assert torch.equal(t, expect), (name, int((t != expect).sum()))


STEADY_CONFIGS = [dict(kv_bits=8), dict(kv_bits=4), dict(kv_bits=8, heads="adaptive"), dict(heads="adaptive"),
                  dict(allocator="lost_attention"), dict(allocator="lost_attention", kv_bits=8)]  # fmt: skip


@pytest.mark.parametrize("pad", [0, 9])
@pytest.mark.parametrize("config", STEADY_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_steady_decode_quantizes_in_the_fused_kernel_with_the_torch_paths_tokens_and_cache(config, pad, monkeypatch):
    """Quantized and pooled layers take the fused steady write too (one kernel a layer and step), and so do rows
    of unequal budgets (padded rows, lost_attention's per-prompt budgets: free slots in the smaller rows, written
    first-free as the torch path does): the tokens, the logits and every part of the cache as the torch path keeps
    them. (4-bit slots take the plain path by default, `steady.FUSED_BITS`: the kernel is tested all the same.)"""
    pytest.importorskip("triton")
    from squeezekit import kernels
    from squeezekit.kernels import steady

    monkeypatch.setattr(steady, "FUSED_BITS", (16, 8, 4))
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    ids, mask = batch(2, 64, pad=pad)

    def run():
        with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4, **config) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=1)
            assert all(layer.steady for layer in cache.layers)
            holes = sum(layer.holes and layer.pool is None for layer in cache.layers)
            tokens = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(6)
            held = [
                (dict(layer.pool.parts if layer.pool is not None else layer._rect_parts()), layer.positions.clone(),
                 layer.stats.get("attention"), layer.valid.clone())
                for layer in cache.layers
            ]  # fmt: skip
            return tokens, held, holes

    with kernels.configured("off"):
        ref = run()
    before = kernels.settings.calls["steady"]
    with kernels.configured("steady", interpret=True):
        got = run()
        assert kernels.settings.failed == {}
    assert kernels.settings.calls["steady"] == before + len(got[1]) * 6  # every layer, every decode step
    assert torch.equal(got[0], ref[0])
    assert got[2] == ref[2]
    if pad or "allocator" in config:  # rows of unequal budgets leave free slots in the smaller ones
        assert got[2] > 0
    else:
        assert got[2] == 0
    for (parts, pos, att, valid), (parts_ref, pos_ref, att_ref, valid_ref) in zip(got[1], ref[1], strict=True):
        assert parts.keys() == parts_ref.keys()
        assert all(torch.equal(parts[n], parts_ref[n]) for n in parts), config
        assert torch.equal(pos, pos_ref) and torch.equal(att, att_ref) and torch.equal(valid, valid_ref)


def test_four_bit_slots_take_the_plain_steady_write_by_default():
    """The fused write's 4-bit bytes differed from `SlotCodec.encode` on an H100: by default 4-bit layers decode
    through the torch path (the kernel is not called), with the same tokens as with every kernel off."""
    pytest.importorskip("triton")
    from squeezekit import kernels

    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    ids, mask = batch(2, 64)

    def run():
        with squeezekit.compress(model, evictor="h2o", budget=0.3, window=4, kv_bits=4) as c:
            cache, logits = prefill(model, c, ids, mask, micro_batch=2)
            return GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(4)

    with kernels.configured("off"):
        ref = run()
    before = kernels.settings.calls["steady"]
    with kernels.configured("steady", interpret=True):
        got = run()
    assert kernels.settings.calls["steady"] == before
    assert torch.equal(got, ref)


def test_reordering_or_repeating_rows_keeps_a_quantized_layer_quantized():
    """Beam search's reorder and a batch repeat move the quantized parts; no buffer in the model's dtype comes back
    (the memory stays what the parts take), and the layer still decodes."""
    model = tiny_model("llama")
    ids, mask = batch(2, 96, pad=9)
    with squeezekit.compress(model, evictor="h2o", budget=0.2, kv_bits=8) as c:
        cache = c.new_cache()
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **c.cache_kwargs(cache))
        before = {i: layer.kv_nbytes() for i, layer in enumerate(cache.layers)}
        for layer in cache.layers:
            layer.batch_repeat_interleave(2)
            layer.batch_select_indices(torch.tensor([1, 0, 3, 2]))
        for name in ("seen", "prompt_len", "importance", "budgets"):
            setattr(cache, name, getattr(cache, name).repeat_interleave(2, dim=0))
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, BudgetedLayer):
                assert layer.quantized and layer._keys is None and layer._values is None
                assert layer.kv_nbytes() == 2 * before[i]
                assert layer.nbytes() == sum(t.numel() * t.element_size() for _, t, _ in layer.slot_items())
        nxt = out.logits[:, -1:].argmax(-1).repeat_interleave(2, dim=0)
        mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(2, dim=0)
        step = model(input_ids=nxt, attention_mask=mask2, use_cache=True, **c.cache_kwargs(cache))
    assert bool(torch.isfinite(step.logits).all())
    assert torch.equal(step.logits[0], step.logits[1])  # rows 0 and 1 are the same sequence
