"""The transformers surface (squeezekit/transformers_api.py): the tested range is stated once and agreed on
everywhere; an untested release gets one warning line; both spellings of the cache argument work."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import ARCHS, batch, tiny_model

import squeezekit
from squeezekit import transformers_api as hf
from squeezekit.cache import SqueezeCache

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirement(name: str) -> str:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [d for d in project["dependencies"] if re.match(rf"{name}\b", d)]
    assert len(specs) == 1, specs
    return specs[0][len(name) :].strip()


def test_tested_range_is_stated_once_and_agreed_on():
    """pyproject.toml's requirement is the module's TESTED range, and the README names it."""
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(_pyproject_requirement("transformers")) == hf.TESTED
    readme = (ROOT / "README.md").read_text()
    low = min(s.version for s in hf.TESTED if s.operator == ">=")
    high = max(s.version for s in hf.TESTED if s.operator == "<")
    assert f"transformers {low}" in readme and f"<{high}" in readme


def test_installed_transformers_is_in_the_tested_range():
    assert hf.version_problem() is None, hf.version_problem()


@pytest.mark.parametrize("version", ["5.25.0", "4.57.6", "6.0.0.dev0"])
def test_an_untested_release_is_named_with_the_range(version):
    assert hf.version_problem(version) == (
        f"transformers {version} is untested with squeezekit (tested: {hf.TESTED_RANGE}); results may be wrong or fail"
    )


def test_untested_release_warns_in_one_line():
    """What a user sees on stderr: one line naming the version and the range, no traceback, no source line."""
    code = (
        "import transformers; transformers.__version__ = '5.99.0'\n"
        "import squeezekit.transformers_api as hf; hf.check_version(); hf.check_version()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [
        "squeezekit:0: UntestedVersionWarning: transformers 5.99.0 is untested with squeezekit "
        f"(tested: {hf.TESTED_RANGE}); results may be wrong or fail"
    ]


def test_compress_checks_the_version(monkeypatch):
    """compress() warns once when the installed release is outside the tested range (here: a range excluding it)."""
    from packaging.specifiers import SpecifierSet

    from squeezekit import compressor

    api = compressor.hf  # the module compress() asks (what the user's run sees)
    monkeypatch.setattr(api, "TESTED_RANGE", "<1")
    monkeypatch.setattr(api, "TESTED", SpecifierSet("<1"))
    monkeypatch.setattr(api, "_checked", False)
    model = tiny_model("llama")
    with pytest.warns(squeezekit.UntestedVersionWarning, match="is untested with squeezekit .tested: <1."):
        with squeezekit.compress(model, budget=0.5):
            pass


def test_cache_argument_follows_the_model_signature():
    """The model's own name for the cache argument: ``cache`` from 5.24 on, ``past_key_values`` before."""
    model = tiny_model("llama")
    name = hf.cache_argument(model)
    assert name in hf.CACHE_NAMES
    assert name == ("cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values")
    ids, mask = batch(2, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own calls never use a deprecated spelling
        with squeezekit.compress(model, budget=1.0):
            out = model(ids, attention_mask=mask, use_cache=True)
            cache = hf.output_cache(out)
            nxt = model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), use_cache=True, **{name: cache})
    assert isinstance(cache, SqueezeCache) and hf.output_cache(nxt) is cache


def test_cache_in_reads_either_spelling():
    cache = object()
    assert hf.cache_in({"cache": cache}) is cache and hf.cache_in({"past_key_values": cache}) is cache
    kwargs = {"past_key_values": cache, "cache": None}
    assert hf.pop_cache(kwargs) is cache and kwargs == {}


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_geometry_is_what_the_attention_calls_pass(arch):
    """`attention_geometry` reads each layer's window, scale and soft-capping from the model once; this checks it
    against what every supported architecture's attention really passes to the attention function, call by call."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from squeezekit.architectures import resolve
    from squeezekit.transformers_api import attention_geometry, text_config

    seen: dict[int, tuple] = {}

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        seen[module.layer_idx] = (kwargs.get("sliding_window") or None, scaling, kwargs.get("softcap") or None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("squeezekit_geometry_spy", spy)
    model = tiny_model(arch)
    model.config._attn_implementation = "squeezekit_geometry_spy"
    for sub in model.modules():
        if getattr(sub, "config", None) is not None:
            sub.config._attn_implementation = "squeezekit_geometry_spy"
    ids, mask = batch(1, 20)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    resolved = resolve(model)
    config = text_config(model)
    expected = {}
    for i, attention in enumerate(resolved.attentions):
        g = attention_geometry(attention, config, resolved.arch.prescaled_queries)
        expected[i] = (g.window, g.scaling, g.softcap)
    assert seen == expected
