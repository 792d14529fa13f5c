"""The lm-eval adapter on the serving machinery gives today's results: the same generated tokens as
``model.generate`` (old path), and the same log-likelihoods as the adapter before the serving path (its scoring code
is kept, verbatim, in benchmarks/lm_eval_reference.py)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from benchmark_scripts import load  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from squeezekit.evaluators.lm_eval_adapter import SqueezekitLM  # noqa: E402
from squeezekit.evaluators.testing import standin_text  # noqa: E402

from squeezekit.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LegacyLM = load("lm_eval_reference").PreviousScoringLM


def _lm(tiny_dir, cls=SqueezekitLM, **kw):
    kw.setdefault("batch_size", 3)
    return cls(pretrained=tiny_dir, device="cpu", extend_chunk=8, **kw)


# -- generate_until ----------------------------------------------------------------------------------------------------
PROMPTS = [standin_text(30 + 23 * i, seed=40 + i) for i in range(5)]  # 5 lengths: padding, batches of 3 and 2


def _gen(lm, until, max_gen_toks=20, **extra):
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False, **extra}
    return lm.generate_until(
        [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(PROMPTS)], disable_tqdm=True
    )


def _raw(lm, until, max_gen_toks=20):
    """HFLM's own call of _model_generate on one left-padded batch: the full token tensor generate returns."""
    context, mask = lm.tok_batch_encode(PROMPTS[:4])
    return lm._model_generate(
        context, context.shape[1] + max_gen_toks, list(until), attention_mask=mask, do_sample=False
    )


def _eos_after(lm, until, row, step):
    """The token the old path generates for ``row`` at ``step``: made an end-of-sequence id, row stops there."""
    return int(_raw(lm, until)[row, -20 + step])


CONFIGS = [
    dict(budget=0.3, evictor="h2o"),
    dict(budget=0.25, allocator="uniform", evictor="streaming", sinks=2, window=4),
    dict(budget=0.3, evictor="snapkv"),
    dict(budget=1.0),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_serving_path_returns_generates_tokens(tiny_dir, config):
    """Token for token what model.generate returns (the tensor HFLM decodes), with stops at different steps."""
    slow, fast = _lm(tiny_dir, fast=False, **config), _lm(tiny_dir, fast=True, **config)
    served = []
    fast_serve = fast._serve
    fast._serve = lambda *a, **k: served.append(1) or fast_serve(*a, **k)
    full = _raw(slow, [])
    texts = [slow.tok_decode(row[-20:].tolist()) for row in full]
    cases = [
        [],  # no stop: max_gen_toks for every row
        [" "],  # every row stops, at different steps: the batch ends when the last one does
        [texts[0][2:5]],  # one row stops early; the batch runs on (lm-eval's criteria end the batch together)
        [texts[1][-4:-1], texts[3][6:8]],  # two stops hit by two rows at different steps
    ]
    for until in cases:
        ref, got = _raw(slow, until), _raw(fast, until)
        assert torch.equal(ref, got), until
    assert len(served) == len(cases)
    assert _raw(slow, [" "]).shape[1] < full.shape[1]  # that case did stop early
    for check_every in (1, 3, 64):
        fast.check_every = check_every
        assert torch.equal(_raw(slow, [" "]), _raw(fast, [" "]))


def test_end_of_sequence_ids_pad_the_rest(tiny_dir):
    """A row that generates an end-of-sequence id gets generate's padding after it; the others go on."""
    slow, fast = (
        _lm(tiny_dir, fast=False, budget=0.3, evictor="h2o"),
        _lm(tiny_dir, fast=True, budget=0.3, evictor="h2o"),
    )
    eos = _eos_after(slow, [], row=1, step=6)
    for lm in (slow, fast):
        lm.model.generation_config.eos_token_id = [eos]
    ref, got = _raw(slow, []), _raw(fast, [])
    assert torch.equal(ref, got)
    assert (ref[1, -20:] == slow.tokenizer.pad_token_id).sum() >= 13
    for lm in (slow, fast):  # every row ended by its end-of-sequence id: generate returns early
        lm.model.generation_config.eos_token_id = sorted({int(t) for t in ref[:, -20:][:, 3]})
    ref, got = _raw(slow, []), _raw(fast, [])
    assert torch.equal(ref, got)


@pytest.mark.parametrize("config", CONFIGS[:2] + CONFIGS[3:], ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_generate_until_texts_equal(tiny_dir, config):
    """Through generate_until (sorting, batching, decoding, cutting at stops) the texts are today's."""
    slow, fast = _lm(tiny_dir, fast=False, **config), _lm(tiny_dir, fast=True, **config)
    words = [t.split()[1] for t in _gen(slow, [], max_gen_toks=12) if len(t.split()) > 1]
    slow.kv_bytes = {"kept": 0, "full": 0, "prefills": 0}
    for until in ([], ["\n"], [" "], words[:2]):
        assert _gen(slow, until) == _gen(fast, until), until
    assert fast.kv_bytes == slow.kv_bytes  # the same prefills, compressed alike


def test_micro_batches_with_a_per_sequence_allocator_are_exact(tiny_dir):
    """Micro-batched prefill: identical with a per-sequence allocator (a batch-level one shares the first
    micro-batch's allocation, see the adapter's docstring)."""
    config = dict(budget=0.25, allocator="uniform", evictor="streaming", sinks=2, window=4)
    slow = _lm(tiny_dir, fast=False, batch_size=5, **config)
    fast = _lm(tiny_dir, fast=True, batch_size=5, micro_batch=2, **config)
    assert _gen(slow, [" "]) == _gen(fast, [" "])
    reqs = _requests(slow.tokenizer)
    assert _close(
        _lm(tiny_dir, LegacyLM, **config)._loglikelihood_tokens(reqs, disable_tqdm=True),
        _lm(tiny_dir, micro_batch=2, **config)._loglikelihood_tokens(reqs, disable_tqdm=True),
    )


def test_sampling_requests_keep_model_generate(tiny_dir):
    slow, fast = (
        _lm(tiny_dir, fast=False, budget=0.3, evictor="h2o"),
        _lm(tiny_dir, fast=True, budget=0.3, evictor="h2o"),
    )
    fast._serve = lambda *a, **k: pytest.fail("a sampling request took the greedy serving path")
    for extra in ({"do_sample": True, "temperature": 1.0}, {"do_sample": False, "repetition_penalty": 1.3}):
        torch.manual_seed(0)
        ref = _gen(slow, [" "], **extra)
        torch.manual_seed(0)
        assert _gen(fast, [" "], **extra) == ref
    fast.model.generation_config.no_repeat_ngram_size = 2  # a logits processor from the model's own config
    torch.manual_seed(0)
    _gen(fast, [" "])


def test_adapter_arguments_are_checked(tiny_dir):
    lm = _lm(tiny_dir, fast="auto", micro_batch=2, check_every=4, cuda_graph=False)
    assert (lm.fast, lm.micro_batch, lm.check_every, lm.cuda_graph) == ("auto", 2, 4, False)
    assert not lm._serving_on()  # auto: CUDA only
    for key, value in (("fast", "maybe"), ("micro_batch", 0), ("check_every", "x"), ("cuda_graph", "auto")):
        with pytest.raises(ConfigError, match=key):
            _lm(tiny_dir, **{key: value})


# -- loglikelihood -----------------------------------------------------------------------------------------------------
def _requests(tok):
    ids = tok(standin_text(3000, seed=3)).input_ids
    return [
        (("a", "b"), ids[0:120], ids[120:150]),  # long continuation: several extend chunks
        (("c", "d"), ids[200:260], ids[260:261]),  # one token: scored by the prefill
        (("e", "f"), ids[300:390], ids[390:403]),
        (("g", "h"), ids[300:390], ids[390:391]),  # shares the context of the request above
        (("i", "j"), ids[500:640], ids[640:660]),
        (("k", "l"), ids[500:640], ids[640:641]),
        (("m", "n"), ids[700:730], ids[730:732]),  # a short one
    ]


def _close(ref, got, tol=1e-5):
    """Same greedy flags, log-likelihoods equal to float32 rounding (now summed in float64)."""
    assert len(ref) == len(got)
    for (r, rg), (g, gg) in zip(ref, got, strict=True):
        assert rg == gg and abs(r - g) <= tol * max(1.0, abs(r)), (r, g)
    return True


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_loglikelihood_equals_the_previous_adapter(tiny_dir, config):
    reqs = _requests(_lm(tiny_dir, LegacyLM, **config).tokenizer)
    for bs in (1, 3, 7):
        ref = _lm(tiny_dir, LegacyLM, batch_size=bs, **config)._loglikelihood_tokens(reqs, disable_tqdm=True)
        got = _lm(tiny_dir, batch_size=bs, **config)._loglikelihood_tokens(reqs, disable_tqdm=True)
        _close(ref, got)


@pytest.mark.parametrize("config", [CONFIGS[1], dict(budget=0.2, evictor="sliding_window")])
def test_rolling_equals_the_previous_adapter(tiny_dir, config):
    docs = [standin_text(n, seed=s) for n, s in ((400, 5), (150, 6), (260, 7))]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in docs]
    ref = _lm(tiny_dir, LegacyLM, **config).loglikelihood_rolling(reqs, disable_tqdm=True)
    got = _lm(tiny_dir, **config).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got, strict=True))


def test_scoring_blocks_split_long_prompts(tiny_dir, monkeypatch):
    """Scores of long prompts are computed in bounded blocks of rows and columns: same numbers."""
    import squeezekit.evaluators.lm_eval_adapter as adapter

    docs = [standin_text(300, seed=9)]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in docs]
    lm = _lm(tiny_dir, budget=0.3)
    ref = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    monkeypatch.setattr(adapter, "SCORE_BLOCK", 3 * len(lm.tokenizer))  # 3 columns a block
    assert abs(lm.loglikelihood_rolling(reqs, disable_tqdm=True)[0] - ref[0]) <= 1e-9 * abs(ref[0])


def test_auto_batch_size_scores_in_detected_batches(tiny_dir):
    """batch_size=auto: the largest batch that fits, detected once, as HFLM does (not one request at a time)."""
    lm = SqueezekitLM(
        pretrained=tiny_dir,
        device="cpu",
        batch_size="auto",
        max_batch_size=4,
        budget=0.3,
        evictor="h2o",
        extend_chunk=8,
        max_length=256,
    )  # detection runs forwards of max_length tokens
    reqs = _requests(lm.tokenizer)
    sizes = []
    score = lm._score_batch
    lm._score_batch = lambda rows: sizes.append(len(rows)) or score(rows)
    legacy = _lm(tiny_dir, LegacyLM, batch_size=4, budget=0.3, evictor="h2o")
    _close(legacy._loglikelihood_tokens(reqs, disable_tqdm=True), lm._loglikelihood_tokens(reqs, disable_tqdm=True))
    assert lm._auto_batch == 4 and sizes[0] == 4
