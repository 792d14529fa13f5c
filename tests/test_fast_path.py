"""Serving path: micro-batched prefill merged into one cache, and the lean greedy decoder (CPU here; the CUDA-graph
replay of the same step runs in the GPU benchmark)."""

from __future__ import annotations

import json

import pytest
import torch
from plugin_factory import bundled
from tiny_models import applicable, batch, tiny_model

import squeezekit
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder
from squeezekit.transformers_api import cache_in


@pytest.mark.parametrize("evictor", ["streaming", "h2o", "snapkv"])
@pytest.mark.parametrize("allocator", ["uniform", "squeeze"])
def test_micro_batched_prefill_and_decoder_match_generate(allocator, evictor):
    model = tiny_model("mistral")
    model.generation_config.eos_token_id = None
    ids, mask = batch(6, 64)
    with squeezekit.compress(model, budget=0.25, **applicable(allocator, evictor, sinks=2, window=4)) as c:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 64:]
        whole = c.last_cache.kv_nbytes()
        cache, logits = prefill(model, c, ids, None, micro_batch=2)
        assert cache.kv_nbytes() == whole  # merged micro-batches hold what one batch would
        assert all(layer.steady for layer in cache.layers)
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=False).run(11)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), ref)
    assert cache.kv_nbytes() == whole  # constant while decoding


def test_bench_runs_on_cpu_with_a_tiny_config(tmp_path):
    from squeezekit.cli import main

    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--prompt-len",
            "48",
            "--new-tokens",
            "6",
            "--batches",
            "1,3",
            "--methods",
            "hf,squeeze+streaming@0.25,squeeze+streaming@0.25~16:3",
            "--micro-batch",
            "2",
            "--check-tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "bench-tiny.json").read_text())
    runs = {(r["method"], r["B"]): r for r in results["runs"]}
    assert set(runs) == {
        ("hf", 1),
        ("hf", 3),
        ("squeeze+streaming@0.25", 1),
        ("squeeze+streaming@0.25", 3),
        ("squeeze+streaming@0.25~16", 3),
    }
    plain, chunked = runs[("squeeze+streaming@0.25", 3)], runs[("squeeze+streaming@0.25~16", 3)]
    assert chunked["prefill_chunk"] == 16 and plain["prefill_chunk"] is None
    assert plain["kv_bytes_full"] == chunked["kv_bytes_full"] == runs[("hf", 3)]["kv_bytes_peak_prefill"]
    # micro-batches of 2 and 1 rows: the first at full length, or the compressed batch cache plus the second
    full, kept = plain["kv_bytes_full"], plain["kv_bytes"]
    assert plain["kv_bytes_peak_prefill"] == max(full * 2 // 3, kept + full // 3)
    assert plain["kv_bytes"] < chunked["kv_bytes_peak_prefill"] < plain["kv_bytes_peak_prefill"]
    sk = [r for r in results["runs"] if r["method"] != "hf"]
    assert all(r["kv_bytes"] <= 0.25 * r["kv_bytes_full"] * 1.03 for r in sk)
    checks = {c["method"]: c for c in results["checks"]}
    assert checks["squeeze+streaming@1"]["token_agreement"] == 1.0  # the full budget reproduces transformers
    assert checks["squeeze+streaming@1"]["prefill_logits_max_abs_diff"] <= 1e-4
    assert checks["squeeze+streaming@0.25"]["token_agreement"] == 1.0  # fast path == model.generate under compress
    # two batch sizes, in the throughput table and in the memory table
    assert (tmp_path / "bench-tiny.md").read_text().count("| squeeze+streaming@0.25 |") == 4
    assert (tmp_path / "bench-tiny.png").stat().st_size > 1000


def test_chunked_prefill_is_exact_at_full_budget():
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = batch(3, 70, pad=6)
    ref = model(ids, attention_mask=mask).logits[:, -1]
    with squeezekit.compress(model, budget=1.0) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=3, chunk=16)
    assert (logits - ref).abs().max().item() <= 1e-5
    assert torch.equal(cache.seen, mask.sum(-1))


def test_chunked_prefill_takes_rows_whose_first_chunk_is_all_padding():
    """Left padding longer than a chunk (found by the GPU benchmark's checks): the first chunk holds none of that
    row's tokens, which is not an all-padding prompt. At full budget the logits are those of one forward."""
    model = tiny_model("llama")
    ids, mask = batch(3, 70)
    mask[1, :20] = 0
    mask[2, :40] = 0  # the first two chunks of 16 hold none of its tokens
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = model(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    with squeezekit.compress(model, budget=1.0) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=3, chunk=16)
    assert (logits.reshape(ref.shape) - ref).abs().max().item() <= 1e-4
    assert torch.equal(cache.seen, mask.sum(-1))
    with squeezekit.compress(model, budget=0.5, evictor="streaming", sinks=2, window=4) as c:
        cache, logits = prefill(model, c, ids, mask, micro_batch=3, chunk=16)
    assert torch.isfinite(logits).all() and torch.equal(cache.seen, mask.sum(-1))


def test_a_row_whose_first_chunk_is_all_padding_takes_the_others_mean_importance():
    """Its first chunk, where importance is measured, holds none of its tokens: instead of an importance of 0 in
    every layer (which read as "every layer matters most" and pulled a batch-level allocation off), it takes the
    mean of the other rows, weighted by the tokens each had in that chunk."""
    model = tiny_model("llama")
    ids, mask = batch(3, 48)
    mask[1, :8] = 0
    mask[2, :20] = 0  # nothing in the first chunk of 16
    with squeezekit.compress(model, allocator="squeeze", evictor="streaming", budget=0.5, sinks=2, window=4) as c:
        cache, _ = prefill(model, c, ids, mask, micro_batch=3, chunk=16)
    importance = cache.importance
    tokens = mask[:2, :16].sum(-1).float().view(-1, 1)  # 16 and 8
    assert torch.allclose(importance[2], (importance[:2] * tokens).sum(0) / tokens.sum())
    assert bool((importance[:2] > 0).all()) and not torch.equal(importance[0], importance[1])


@pytest.mark.parametrize("allocator", ["uniform", "squeeze"])
def test_chunked_prefill_of_a_left_padded_batch_keeps_every_rows_sinks(allocator):
    """Between chunks, rows that keep fewer slots than the longest row pad their selection with -1. Those used to be
    written as "not kept" into slot 0, overwriting the row's own "kept" there (racing with it on CUDA: the H200's
    kernel-vs-plain disagreement of docs/benchmarks): a row whose first real token sat in slot 0 lost that
    attention sink. Every row keeps its first ``sinks`` tokens in every layer, and its ``window`` newest."""
    model = tiny_model("mistral")
    ids, mask = batch(4, 64)
    for row, pad in enumerate((0, 8, 16, 24)):
        mask[row, :pad] = 0
    with squeezekit.compress(model, allocator=allocator, evictor="streaming", budget=0.3, sinks=4, window=4) as c:
        cache, _ = prefill(model, c, ids, mask, micro_batch=4, chunk=16)
    for layer in cache.layers:
        for row in range(4):
            held = set(layer.positions[row, 0][layer.valid[row, 0]].tolist())
            real = int(mask[row].sum())
            want = {*range(4), *range(real - 4, real)}
            assert want <= held, (layer.layer_idx, row, sorted(want - held))


@pytest.mark.parametrize("evictor", ["streaming", "h2o"])
def test_chunked_prefill_never_holds_the_whole_prompt(evictor):
    model = tiny_model("mistral")
    ids, mask = batch(2, 120)
    peaks = []

    def spy(module, args, kwargs, output):
        cache = cache_in(kwargs)
        peaks.append(max(layer.capacity for layer in cache.layers))

    with squeezekit.compress(model, budget=0.25, **applicable(evictor=evictor, sinks=2, window=4)) as c:
        handle = model.model.register_forward_hook(spy, with_kwargs=True)
        try:
            cache, logits = prefill(model, c, ids, None, micro_batch=2, chunk=20)
        finally:
            handle.remove()
        summary = c.summary()
        budgets = summary["budgets"]
        full = 2 * 120 * 4 * 2 * 2 * 16 * 4  # B x T x layers x (K, V) x kv heads x head_dim x fp32
        assert cache.kv_nbytes() <= 0.25 * full * 1.03
        # the accounting is the whole prompt's, not the first chunk's; the peak is a budget plus one chunk
        assert summary["kv_bytes_full"] == full and summary["kv_bytes_kept"] == cache.kv_nbytes()
        assert summary["kv_bytes_kept"] < summary["kv_bytes_peak_prefill"] <= (0.25 * 120 + 4 + 20) / 120 * full
        assert all(layer.steady for layer in cache.layers)
        rest = GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(5)
    assert len(peaks) == 6  # one forward per chunk
    assert max(peaks) <= int(budgets.max()) + 20  # never the whole prompt: at most a budget plus one chunk
    assert int(budgets.sum(-1)[0]) == round(0.25 * 120 * 4)  # budgets are fractions of the whole prompt
    assert rest.shape == (2, 5)


def test_micro_batched_prefill_peak_is_the_batch_cache_plus_one_micro_batch():
    model = tiny_model("llama")
    ids, _ = batch(4, 60)
    with squeezekit.compress(model, evictor="streaming", budget=0.25) as c:
        whole, _ = prefill(model, c, ids, None, micro_batch=4)
        one = c.summary()
        parts, _ = prefill(model, c, ids, None, micro_batch=2)
        two = c.summary()
    full, kept = one["kv_bytes_full"], one["kv_bytes_kept"]
    assert one["kv_bytes_peak_prefill"] == full  # one forward holds the whole prompt before it is compressed
    assert (two["kv_bytes_full"], two["kv_bytes_kept"]) == (full, kept) == (full, parts.kv_nbytes())
    assert two["kv_bytes_peak_prefill"] == kept + full // 2  # the preallocated batch cache + one micro-batch


@pytest.mark.parametrize("chunk", [None, 32])
def test_micro_batches_share_one_batch_level_allocation(chunk):
    """squeeze (per="batch") allocates a micro-batched batch as one: equal budgets, steady layers, the graph path."""
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(1, 100, (8, 96), generator=torch.Generator().manual_seed(1))
    with squeezekit.compress(model, evictor="streaming", budget=0.2) as c:
        calls = []
        allocate = c.allocator.allocate
        c.allocator.allocate = lambda request: calls.append(request.total.shape[0]) or allocate(request)
        cache, _ = prefill(model, c, ids, None, micro_batch=2, chunk=chunk)
        budgets, importance = c.summary()["budgets"], c.summary()["importance"]
    assert calls == [2]  # the first micro-batch's allocation is reused for the other three
    assert len({tuple(row.tolist()) for row in importance}) == 8  # each row's own importance is still reported
    assert (budgets == budgets[0]).all() and int(budgets[0].sum()) == round(0.2 * 96 * 8)
    assert all(layer.steady for layer in cache.layers)
    with squeezekit.compress(model, evictor="streaming", budget=0.2) as c:
        whole, _ = prefill(model, c, ids[:2], None, micro_batch=2, chunk=chunk)
        assert torch.equal(c.summary()["budgets"][0], budgets[0])  # the first micro-batch's allocation
    with squeezekit.compress(model, evictor="streaming", budget=0.2, per="sequence") as c:
        prefill(model, c, ids, None, micro_batch=2, chunk=chunk)
        assert len({tuple(row.tolist()) for row in c.summary()["budgets"]}) > 1  # per sequence: its own


def test_batch_level_allocation_with_mixed_prompt_lengths():
    """A prompt length the first micro-batch did not have is allocated once, from its mean importance, then reused."""
    model = tiny_model("llama", num_hidden_layers=8)
    ids = torch.randint(1, 100, (8, 96), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[[2, 3, 6, 7], :16] = 0  # left padding: rows 2, 3, 6, 7 have 80-token prompts
    with squeezekit.compress(model, evictor="streaming", budget=0.2) as c:
        calls = []
        allocate = c.allocator.allocate
        c.allocator.allocate = lambda request: calls.append(request.cap.tolist()) or allocate(request)
        cache, _ = prefill(model, c, ids, mask, micro_batch=2)
        budgets = c.summary()["budgets"]
    assert calls == [[96, 96], [80, 80]]
    long, short = budgets[[0, 1, 4, 5]], budgets[[2, 3, 6, 7]]
    assert (long == long[0]).all() and (short == short[0]).all()
    assert int(long[0].sum()) == round(0.2 * 96 * 8) and int(short[0].sum()) == round(0.2 * 80 * 8)


def _profile_for(model, evictor, params, tmp_path) -> str:
    """A calibration profile for ``model`` and ``evictor`` with ``params`` (layer costs made up, rising with depth)."""
    from squeezekit.plugins.calibrated import FORMAT, evictor_identity, model_identity

    L = model.config.num_hidden_layers
    built = squeezekit.Config.from_kwargs(evictor=evictor, **params).build_evictor()
    data = {
        "format": FORMAT, "model": model_identity(model), "evictor": evictor_identity(built),
        "levels": [0.1, 0.2, 0.4], "loss": [[c * (i + 1) / L for c in (0.3, 0.2, 0.1)] for i in range(L)],
    }  # fmt: skip
    path = tmp_path / f"{evictor}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("budget", [0.1, 0.2])
@pytest.mark.parametrize("evictor", bundled("evictor"))
@pytest.mark.parametrize("allocator", bundled("allocator"))
def test_the_serving_path_gives_generates_tokens_for_every_bundled_policy(allocator, evictor, budget, tmp_path):
    """Micro-batched prefill + the greedy decoder give ``model.generate``'s tokens for every bundled allocator and
    evictor, on a left-padded batch. A per-prompt allocator gives them with any micro-batching; a batch-level one
    (squeeze, per="batch") allocates a served batch from its first micro-batch, so it is served here as one."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = batch(4, 160, pad=12)  # prompts of 160, 148, 136, 124 tokens: every row compressed at 0.1
    config = dict(budget=budget, **applicable(allocator, evictor, sinks=2, window=4))
    if allocator == "calibrated":
        params = {k: v for k, v in config.items() if k in ("sinks", "window")}
        config["profile"] = _profile_for(model, evictor, params, tmp_path)
    with squeezekit.compress(model, **config) as c:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 160:]
        assert not bool(c.summary()["kept_whole"].any())
        micro_batch = 4 if c.runner.batch_level else 2
        cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch)
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=False).run(7)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), ref)


@pytest.mark.parametrize("evictor", bundled("evictor"))
@pytest.mark.parametrize("allocator", ["uniform", "squeeze", "lost_attention"])
def test_the_serving_path_gives_generates_tokens_with_the_adaptive_head_split(allocator, evictor):
    """With ``heads=adaptive`` (heads of a layer holding different budgets, in a pool of per-head segments), the
    micro-batched prefill + greedy decoder give ``model.generate``'s tokens."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    model.generation_config.eos_token_id = None
    ids, mask = batch(4, 160, pad=12)
    config = dict(budget=0.1, heads="adaptive", **applicable(allocator, evictor, sinks=2, window=4))
    with squeezekit.compress(model, **config) as c:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 160:]
        split = c.summary()["head_budgets"]
        micro_batch = 4 if c.runner.batch_level else 2
        cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch)
        for layer in cache.layers:  # the assembled batch holds what its heads' budgets add up to
            hb = getattr(layer, "head_budget_host", None)
            if hb is not None and (hb != hb[:, :1]).any():
                assert layer.pool is not None
                assert layer.kv_nbytes() == int(hb.sum()) * 2 * layer.head_dim * layer.dtype.itemsize
        first = logits.argmax(-1)
        rest = GreedyDecoder(model, cache, first, cuda_graph=False).run(7)
    assert torch.equal(torch.cat([first[:, None], rest], dim=1), ref)
    if evictor == "snapkv":
        assert bool((split.amin(-1) < split.amax(-1)).any())  # the heads did get budgets of their own


def test_the_bench_correctness_check_agrees_for_every_bundled_allocator():
    """``squeezekit bench``'s own check (the serving path, one row per micro-batch, against model.generate on the
    whole batch) agrees token for token for every bundled allocator that needs no profile. It did not for
    lost_attention (0.47 on this model), whose budgets followed the batch's mean cost: a served batch was allocated
    from its first micro-batch alone."""
    from squeezekit.evaluators.bench_models import build_model
    from squeezekit.evaluators.bench_runs import correctness_checks, parse_methods

    model = build_model("tiny", "cpu", torch.float32)
    ids = torch.randint(1, 256, (2, 512), generator=torch.Generator().manual_seed(0))
    allocators = [a for a in bundled("allocator") if a != "calibrated"]  # (a profile is per model)
    methods = parse_methods(",".join(f"{a}+{e}@0.2" for a in allocators for e in ("streaming", "h2o")))
    checks = correctness_checks(model, ids, 16, "cpu", methods, cuda_graph=False)
    assert {c["method"]: c["token_agreement"] for c in checks} == {c["method"]: 1.0 for c in checks}


def test_lost_attention_budgets_follow_each_prompt_alone():
    """A prompt's lost_attention budgets are the same alone and in a batch with another prompt."""
    model = tiny_model("llama")
    ids, mask = batch(2, 160)
    budgets = []
    for rows in (slice(0, 1), slice(0, 2)):
        with squeezekit.compress(model, allocator="lost_attention", evictor="snapkv", budget=0.2, window=4) as c:
            model(input_ids=ids[rows], attention_mask=mask[rows], use_cache=True)
            budgets.append(c.summary()["budgets"][0])
    assert torch.equal(budgets[0], budgets[1])


@pytest.mark.parametrize("path", ["served", "extended", "generate"])
def test_a_cache_is_freed_as_soon_as_its_user_lets_go(path):
    """No reference cycle holds a cache (layers -> cache, a decoder's step graph -> decoder): once the caller drops
    it (and its compress block and decoder), it is freed at once, not when Python's cyclic collector next runs (on a
    GPU, that left earlier caches' memory allocated: three caches of 6.5 GiB each at the third generation)."""
    import gc
    import weakref

    from squeezekit.decoding import ChunkExtender

    model = tiny_model("llama")
    ids, mask = batch(2, 48, pad=6)
    caches = []

    def run():
        with torch.inference_mode(), squeezekit.compress(model, allocator="lost_attention", evictor="h2o",
                                                         budget=0.25) as c:  # fmt: skip
            if path == "generate":
                model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
                caches.append(weakref.ref(c.last_cache))
                return
            cache, logits = prefill(model, c, ids, mask, micro_batch=1)
            caches.append(weakref.ref(cache))
            if path == "served":
                GreedyDecoder(model, cache, logits.argmax(-1)).run(3)
            else:
                ChunkExtender(model, cache, 2)(ids[:, :2], cache.seen.view(-1, 1) + torch.arange(2))

    gc.collect()
    gc.disable()
    try:
        run()
        assert caches[0]() is None
    finally:
        gc.enable()
