"""The lm-eval adapter scores against the compressed cache: exact at budget 1, different at a small budget."""

from __future__ import annotations

import math
import os
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from squeezekit.evaluators import lm_eval_adapter  # noqa: E402
from squeezekit.evaluators.lm_eval_adapter import ADAPTER_ARGS, ADAPTER_KEYS, SqueezekitLM  # noqa: E402
from squeezekit.evaluators.testing import standin_text  # noqa: E402

from squeezekit.errors import ConfigError, shown  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return HFLM(pretrained=tiny_dir, device="cpu", batch_size=3)


def _requests(tok):
    ids = tok(standin_text(3000, seed=3)).input_ids
    return [
        (("a", "b"), ids[0:120], ids[120:150]),  # long continuation: crosses several extend chunks
        (("c", "d"), ids[200:260], ids[260:261]),  # one token: scored by the prefill itself
        (("e", "f"), ids[300:390], ids[390:403]),
        (("g", "h"), ids[300:390], ids[390:391]),  # shares the context of the request above
        (("i", "j"), ids[500:640], ids[640:660]),
        (("k", "l"), ids[500:640], ids[640:641]),
    ]


def _lm(tiny_dir, **kw):
    return SqueezekitLM(pretrained=tiny_dir, device="cpu", batch_size=3, extend_chunk=8, **kw)


def test_budget_one_matches_plain_hflm(tiny_dir, plain):
    reqs = _requests(plain.tokenizer)
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    for evictor in ("streaming", "h2o"):
        got = _lm(tiny_dir, budget=1.0, allocator="squeeze", evictor=evictor)._loglikelihood_tokens(
            reqs, disable_tqdm=True
        )
        for (r, rg), (g, gg) in zip(ref, got, strict=True):
            assert abs(r - g) < 1e-4 and rg == gg


@pytest.mark.parametrize("fast", [False, True])
def test_budget_one_generation_matches_plain_hflm(tiny_dir, plain, fast):
    """model.generate inside compress, and the serving path (micro-batched prefill + greedy decoder), alike."""
    prompts = [standin_text(30 + 23 * i, seed=40 + i) for i in range(5)]
    for until in ([], [" "]):
        kwargs = {"until": until, "max_gen_toks": 16, "do_sample": False}
        reqs = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
        ref = plain.generate_until(reqs, disable_tqdm=True)
        assert _lm(tiny_dir, budget=1.0, fast=fast, micro_batch=2).generate_until(reqs, disable_tqdm=True) == ref


def test_small_budget_changes_multi_token_scores_only(tiny_dir, plain):
    reqs = _requests(plain.tokenizer)
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    lm = _lm(tiny_dir, budget=0.2, allocator="squeeze", evictor="streaming")
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    diffs = [abs(r[0] - g[0]) for r, g in zip(ref, got, strict=True)]
    multi = [d for d, (_, _, cont) in zip(diffs, reqs, strict=True) if len(cont) > 1]
    single = [d for d, (_, _, cont) in zip(diffs, reqs, strict=True) if len(cont) == 1]
    assert max(multi) > 1e-3  # scored against the compressed cache
    assert max(single) < 1e-4  # predicted by the prefill, as the first generated token would be
    assert 0 < lm.kv_bytes["kept"] < 0.3 * lm.kv_bytes["full"]


def test_rolling_perplexity(tiny_dir, plain):
    docs = [standin_text(400, seed=s) for s in (5, 6)]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), 0) for d in docs]
    ref = plain.loglikelihood_rolling(reqs, disable_tqdm=True)
    full = _lm(tiny_dir, budget=1.0).loglikelihood_rolling(reqs, disable_tqdm=True)
    small = _lm(tiny_dir, budget=0.2, evictor="sliding_window").loglikelihood_rolling(reqs, disable_tqdm=True)
    assert all(abs(a - b) < 1e-3 for a, b in zip(ref, full, strict=True))
    assert all(abs(a - b) > 1e-2 for a, b in zip(ref, small, strict=True))


def test_generate_until_is_compressed(tiny_dir):
    lm = _lm(tiny_dir, budget=0.25, evictor="h2o")
    tok = lm.tokenizer
    prompts = [standin_text(120, seed=8), standin_text(90, seed=9)]
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert lm.kv_bytes["prefills"] >= 1 and lm.kv_bytes["kept"] < 0.35 * lm.kv_bytes["full"]
    assert tok is not None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"budgt": 0.2}, "did you mean 'budget'"),
        ({"batch_sise": 2}, "did you mean 'batch_size'"),
        ({"evictor": "streeming"}, "did you mean 'streaming'"),
        ({"budget": 2.5}, "budget = 2.5"),
        ({"kernel_size": 5}, "add evictor=snapkv"),  # snapkv's parameter, but the evictor is streaming
    ],
)
def test_model_args_errors_are_config_errors(tiny_dir, kwargs, needle):
    with pytest.raises(ConfigError) as err:
        SqueezekitLM(pretrained=tiny_dir, device="cpu", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_plugin_keys_and_hflm_keys_pass(tiny_dir):
    lm = SqueezekitLM(pretrained=tiny_dir, device="cpu", evictor="snapkv", kernel_size=5, max_length=512, budget=0.3)
    assert dict(lm.squeeze_config.params) == {"kernel_size": 5} and lm.max_length == 512


def test_fallback_plugin_keys_pass(tiny_dir):
    """A fallback's own parameters are accepted as in every other config source; the primary's stay checked."""
    args = {"allocator": "pyramid", "fallback_allocator": "squeeze", "per": "sequence", "evictor": "snapkv"}
    lm = SqueezekitLM(pretrained=tiny_dir, device="cpu", fallback_evictor="streaming", kernel_size=5, **args)
    assert lm.squeeze_config.fallback_allocator == "squeeze" and dict(lm.squeeze_config.params) == {
        "per": "sequence",
        "kernel_size": 5,
    }
    with pytest.raises(ConfigError, match="per = 'sequence': is a parameter of allocator 'squeeze', which this config"):
        SqueezekitLM(pretrained=tiny_dir, device="cpu", allocator="pyramid", per="sequence")


# ---- the adapter's own arguments: any bad value is one line, through lm-eval's k=v parsing or as a Python value ----

INTEGER = "must be an integer >= 1"
ACCEPTED = {
    "extend_chunk": INTEGER,
    "micro_batch": INTEGER,
    "check_every": INTEGER,
    "rolling_prompt": "must be a fraction in (0, 1] or a whole number of tokens",
    "fast": "must be true or false or auto",
    "cuda_graph": "must be true or false",
    "attn_implementation": "must be 'sdpa' or 'eager'",
}
SPECIAL = [math.inf, -math.inf, math.nan, 1e400, -1, 0, "x", "", "inf", "-inf", "nan", "1e400", "2.5", "1e3x", [4]]


def _good(key: str, value) -> bool:
    """Whether ``value`` is a valid ``key`` (what the adapter documents)."""
    if key == "micro_batch" and value is None or key == "attn_implementation" and value in (None, "sdpa", "eager"):
        return True
    if key in ("fast", "cuda_graph"):
        words = ("1", "true", "yes", "on", "0", "false", "no", "off") + (("auto",) if key == "fast" else ())
        return str(value).strip().lower() in words
    if key == "attn_implementation" or isinstance(value, (bool, list)) or value is None:
        return False
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (ValueError, OverflowError):
        return False
    if not math.isfinite(number):
        return False
    if key == "rolling_prompt":
        return 0 < number <= 1 or (number > 1 and number.is_integer())
    if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
        return False
    return number.is_integer() and number >= 1 and abs(number) < 2**63


def _values(key: str):
    return st.one_of(
        st.sampled_from(SPECIAL), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6)
    ).filter(lambda v: not _good(key, v))


@pytest.mark.parametrize("key", sorted(ADAPTER_KEYS))
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_bad_adapter_argument_is_a_one_line_config_error(tiny_dir, key, data):
    value = data.draw(_values(key), label=key)
    with pytest.raises(ConfigError) as err:
        SqueezekitLM(pretrained=tiny_dir, device="cpu", **{key: value})
    assert str(err.value) == f"config error: model_args: {key} = {shown(value)}: {ACCEPTED[key]}"


@pytest.mark.parametrize("key", sorted(ADAPTER_KEYS))
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_bad_adapter_argument_of_the_model_args_string_is_a_one_line_config_error(tiny_dir, key, data):
    from lm_eval.utils import handle_arg_string

    texts = st.sampled_from([str(v) for v in SPECIAL if not isinstance(v, list)])
    text = data.draw(texts | st.text("0123456789.e+-infaxNoT", max_size=6))
    value = handle_arg_string(text)  # what lm-eval hands over for `key=text`
    assume(not _good(key, value))
    with pytest.raises(ConfigError) as err:
        SqueezekitLM.create_from_arg_string(f"pretrained={tiny_dir},{key}={text}", {"device": "cpu"})
    assert str(err.value) == f"config error: model_args: {key} = {shown(value)}: {ACCEPTED[key]}"


def test_the_module_docstring_documents_every_adapter_argument_with_its_default():
    """The docstring's list of adapter arguments is the table's (`ADAPTER_ARGS`), in its order, each with its
    default; and every argument has the error text the catalogue expects."""
    doc = lm_eval_adapter.__doc__.split("Adapter arguments (not part of the squeezekit schema):", 1)[1]
    bullets = dict(re.findall(r"^\* ``(\w+)`` \((.*)$", doc, flags=re.M))
    assert list(bullets) == [arg.name for arg in ADAPTER_ARGS]
    for arg in ADAPTER_ARGS:
        default = "default:" if arg.default is None else rf"default (``)?{re.escape(str(arg.default).lower())}\b"
        assert re.search(default, bullets[arg.name]), (arg.name, bullets[arg.name])
    assert set(ACCEPTED) == ADAPTER_KEYS


def test_adapter_arguments_given_as_text_are_typed(tiny_dir):
    lm = SqueezekitLM(pretrained=tiny_dir, device="cpu", extend_chunk="8", rolling_prompt=" 0.25", micro_batch=2.0,
                      check_every="4", fast="off", cuda_graph="no")  # fmt: skip
    assert (lm.extend_chunk, lm.rolling_prompt, lm.micro_batch, lm.check_every) == (8, 0.25, 2, 4)
    assert (lm.fast, lm.cuda_graph) == (False, False)
    assert all(type(v) is int for v in (lm.extend_chunk, lm.micro_batch, lm.check_every))
