"""Real-model tests on the embedded default model, SmolLM2-135M-Instruct (marked slow; run in CI)."""

from __future__ import annotations

import pydoc

import pytest
import torch
from plugin_factory import bundled

import squeezekit

pytestmark = pytest.mark.slow
GEN = dict(do_sample=False)


def english_text(n_chars: int) -> str:
    """Real English prose that every Python install carries: the standard library's own documentation."""
    parts = []
    for name in (
        "collections",
        "functools",
        "itertools",
        "json",
        "pathlib",
        "argparse",
        "logging",
        "typing",
        "os",
        "re",
    ):
        parts.append(pydoc.render_doc(name, renderer=pydoc.plaintext))
    text = "\n".join(parts)
    return text[:n_chars]


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = squeezekit.load_default_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def long_prompt(smol):
    _, tok = smol
    ids = tok([english_text(6000)], return_tensors="pt")
    ids = {k: v[:, :1024] for k, v in ids.items()}
    assert ids["input_ids"].shape[1] == 1024
    return ids


def test_full_budget_exact_batch_1(smol):
    model, tok = smol
    ids = tok(["The three primary colours are"], return_tensors="pt")
    ref_logits = model(**ids).logits
    ref = model.generate(**ids, max_new_tokens=20, **GEN, pad_token_id=tok.pad_token_id)
    with squeezekit.compress(model, budget=1.0):
        logits = model(**ids, use_cache=True).logits
        out = model.generate(**ids, max_new_tokens=20, **GEN, pad_token_id=tok.pad_token_id)
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    assert tok.decode(out[0]) == tok.decode(ref[0])


def test_full_budget_exact_left_padded_batch_4(smol):
    model, tok = smol
    prompts = [
        "The capital of France is",
        "Water boils at a temperature of",
        "In 1492, Christopher Columbus sailed across the Atlantic Ocean and reached",
        "A haiku about the sea:",
    ]
    ids = tok(prompts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and bool((ids["attention_mask"] == 0).any())
    ref_logits = model(**ids).logits
    ref = model.generate(**ids, max_new_tokens=20, **GEN, pad_token_id=tok.pad_token_id)
    with squeezekit.compress(model, budget=1.0):
        logits = model(**ids, use_cache=True).logits
        out = model.generate(**ids, max_new_tokens=20, **GEN, pad_token_id=tok.pad_token_id)
    real = ids["attention_mask"].bool()
    assert (logits - ref_logits)[real].abs().max().item() <= 1e-5
    assert tok.batch_decode(out) == tok.batch_decode(ref)


def test_importance_finds_the_known_important_layers(smol, long_prompt):
    """On ~1k tokens of English, layers 0, 1 and 24 stand out (as measured with plain transformers)."""
    model, _ = smol
    with squeezekit.compress(model, allocator="squeeze", evictor="streaming", budget=0.2) as c:
        model.generate(**long_prompt, max_new_tokens=1, **GEN)
        s = c.summary()
    importance = s["importance"][0]
    assert set(importance.argsort()[:3].tolist()) == {0, 1, 24}
    budgets = s["budgets"][0]
    assert int(budgets.sum()) == round(0.2 * 1024 * 30)
    assert set((budgets == 1024).nonzero().view(-1).tolist()) == {0, 1, 24}  # the cap is the normal case


@pytest.mark.parametrize("evictor", bundled("evictor"))
@pytest.mark.parametrize("allocator", bundled("allocator", plain=True))
def test_every_pair_generates_from_a_1k_prompt(smol, long_prompt, allocator, evictor):
    model, tok = smol
    with squeezekit.compress(model, allocator=allocator, evictor=evictor, budget=0.2) as c:
        out = model.generate(**long_prompt, max_new_tokens=8, **GEN, pad_token_id=tok.pad_token_id)
        s = c.summary()
    assert out.shape[1] == 1024 + 8
    assert s["kv_bytes_kept"] <= 0.2 * s["kv_bytes_full"] * 1.03
    assert s["kv_bytes_now"] == s["kv_bytes_kept"]
    assert torch.isfinite(s["importance"]).all()


def test_readme_python_example_runs_as_written(capsys):
    """The README's Python example, executed literally: no budget error, budgets printed for both prompts."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example -->\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor([[" in printed and printed.count("[") >= 4
