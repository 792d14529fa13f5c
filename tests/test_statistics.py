"""Statistics (squeezekit.statistics): a plugin can bring a statistic of its own without any change to squeezekit,
the engine keeps a per-slot statistic with its token through every slot operation (eviction, growth, compaction,
micro-batch merges, chunks, steady decode), and misdeclared statistics are one-line errors."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import Config, LayerView, Stat, Statistic
from squeezekit.batching import prefill
from squeezekit.decoding import GreedyDecoder
from squeezekit.statistics import needed

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

#: an installable plugin: docs/plugins.md's statistic example (each token's key norm, measured once when the token is
#: written, and an evictor ranking by it), a spy on it, and an oracle evictor that computes the norms from the keys
EXAMPLE = re.search(r"```python\n# example: statistic\n(.*?)```", DOC.read_text(), flags=re.S).group(1)
PLUGIN = EXAMPLE + textwrap.dedent(
    """
    import torch

    CHECKS = None  # a test sets a list: one entry per call, True if the statistic matched the keys


    @dataclass
    class CheckedLongKeys(LongKeys):
        name = "checked_long_keys"

        def score(self, view):
            if CHECKS is not None:  # exactly what the keys say, for every valid slot
                own = view.keys.float().norm(dim=-1)
                CHECKS.append(bool((view.key_norm[view.valid] == own[view.valid]).all()))
            return super().score(view)


    @dataclass
    class LongKeysByHand(squeezekit.TokenEvictor):
        name = "long_keys_by_hand"

        def score(self, view):
            return view.keys.float().norm(dim=-1)


    @squeezekit.hookimpl
    def register_evictors(register):
        register(LongKeys)
        register(CheckedLongKeys)
        register(LongKeysByHand)
"""
)


@pytest.fixture
def key_norm_plugin(plugin_site):
    plugin_site.add("sk_keynorm", PLUGIN, package="sk-keynorm", version="1.0", entry_points={"keynorm": "sk_keynorm"})
    plugin_site.reload()
    import sk_keynorm

    sk_keynorm.CHECKS = []
    yield sk_keynorm
    sk_keynorm.CHECKS = None


def _generate(model, evictor, ids, mask, micro_batch=None, chunk=None, steps=8):
    with squeezekit.compress(model, allocator="squeeze", evictor=evictor, budget=0.3) as c:
        if micro_batch is None and chunk is None:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0)
            return out[:, ids.shape[1] :], c.last_cache
        cache, logits = prefill(model, c, ids, mask, micro_batch=micro_batch or ids.shape[0], chunk=chunk)
        return GreedyDecoder(model, cache, logits.argmax(-1), cuda_graph=False).run(steps), cache


def test_a_plugin_statistic_needs_no_change_to_squeezekit(key_norm_plugin):
    """The plugin's statistic is collected because its evictor needs it, reaches the view as ``view.key_norm``, and
    ranks exactly as the same norm computed from the keys: same tokens, and the statistic equals the keys' norms at
    every call; it lives in the slot table (freed with the cache, counted in its bytes), and nothing else is kept."""
    model = tiny_model("llama")
    ids, mask = batch(3, 48, pad=7)
    got, cache = _generate(model, "checked_long_keys", ids, mask)
    want, _ = _generate(model, "long_keys_by_hand", ids, mask)
    assert torch.equal(got, want)
    checks = key_norm_plugin.CHECKS
    assert checks and all(checks), f"{checks.count(False)} of {len(checks)} calls saw a stale statistic"
    for layer in cache.layers:
        assert set(layer.stats) == {"key_norm"} and layer.stats["key_norm"].shape == layer.valid.shape
        assert bool((layer.stats["key_norm"][~layer.valid] == -1.0).all()) or not bool((~layer.valid).any())
    assert cache.nbytes() > cache.kv_nbytes() + sum(layer.valid.numel() * 5 for layer in cache.layers)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 4),
    pad=st.integers(0, 12),
    micro_batch=st.sampled_from([None, 1, 2]),
    chunk=st.sampled_from([None, 16]),
    arch=st.sampled_from(["llama", "mistral"]),
)
def test_a_per_slot_statistic_follows_its_token_through_every_slot_operation(
    key_norm_plugin, rows, pad, micro_batch, chunk, arch
):
    """Whatever the batch layout and prefill route, the statistic at each valid slot is the norm of the key that
    slot holds, at every evictor call, and the output equals the oracle's."""
    model = tiny_model(arch)
    ids, mask = batch(rows, 40, pad=pad)
    if chunk is not None and micro_batch is None:
        micro_batch = rows
    key_norm_plugin.CHECKS.clear()
    got, _ = _generate(model, "checked_long_keys", ids, mask, micro_batch=micro_batch, chunk=chunk, steps=6)
    want, _ = _generate(model, "long_keys_by_hand", ids, mask, micro_batch=micro_batch, chunk=chunk, steps=6)
    assert torch.equal(got, want)
    assert key_norm_plugin.CHECKS and all(key_norm_plugin.CHECKS)


def test_only_what_the_policies_need_is_collected():
    model = tiny_model("llama")
    ids, mask = batch(2, 40)
    for evictor, kept in (("streaming", set()), ("h2o", {"attention"}), ("snapkv", set())):
        with torch.no_grad(), squeezekit.compress(model, evictor=evictor, budget=0.5) as c:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            names = [type(s).__name__ for s in c.runner.statistics]
            assert all(set(layer.stats) == kept for layer in c.last_cache.layers), (evictor, names)
    with squeezekit.compress(model, evictor="snapkv", budget=1.0) as c:  # full budget: nothing to rank
        assert c.runner.statistics == ()


def test_needs_may_name_several_statistics():
    assert needed(Stat.NONE) == ()
    both = needed((Stat.WINDOW_QUERIES, Stat.ATTENTION, Stat.WINDOW_QUERIES))
    assert [s.name for s in both] == ["window_queries", "attention"]
    with pytest.raises(TypeError):
        needed("attention")


def test_a_view_takes_statistics_by_name():
    t = torch.zeros(1, 1, 3, 2)
    flags, pos = torch.ones(1, 1, 3, dtype=torch.bool), torch.arange(3, dtype=torch.int32).view(1, 1, 3)
    view = LayerView(t, t, flags, pos, torch.tensor([3]), torch.tensor([3]), 0, 1, "decode", attention=pos.float())
    assert torch.equal(view.attention, pos.float()) and view.window_queries is None
    view.window_queries = torch.ones(1)
    assert set(view.stats) == {"attention", "window_queries"}
    with pytest.raises(TypeError, match="unexpected keyword argument 'attentoin'"):
        LayerView(t, t, flags, pos, torch.tensor([3]), torch.tensor([3]), 0, 1, "decode", attentoin=pos)
    with pytest.raises(AttributeError):
        view.no_such_field  # noqa: B018
    t2, flags2, pos2 = t.expand(2, 1, 3, 2), flags.expand(2, 1, 3), pos.expand(2, 1, 3)
    two = LayerView(t2, t2, flags2, pos2, torch.tensor([3, 2]), torch.tensor([3, 1]), 0, 1, "decode",
                    attention=torch.rand(2, 1, 3))  # fmt: skip
    one = two.rows(torch.tensor([1]))
    assert torch.equal(one.attention, two.attention[1:]) and one.budget.tolist() == [1] and one.layer_idx == 0


def test_a_statistic_cannot_take_a_name_that_is_in_use():
    with pytest.raises(TypeError, match="taken by LayerView"):

        class Keys(Statistic):
            name = "my_keys"
            fields = ("keys",)

    with pytest.raises(TypeError, match="belong to statistic 'attention'"):

        class Attention2(Statistic):
            name = "attention_again"
            fields = ("attention",)

    # a bundled statistic's name, with fields of its own: refused too, never a silent process-wide replacement
    with pytest.raises(TypeError, match="'attention': the name is taken by squeezekit.statistics.AttentionMass"):

        class Attention3(Statistic):
            name = "attention"
            fields = ("my_attention",)

    assert needed(Stat.ATTENTION)[0].__qualname__ == "AttentionMass"


def test_a_statistic_taking_the_attention_mass_must_say_what_to_do_with_it():
    with pytest.raises(TypeError, match="'mass_only' sets attention_mass but does not define add_attention"):

        class MassOnly(Statistic):
            name = "mass_only"
            fields = ("mass_only",)
            per_slot = True
            attention_mass = True


def test_a_statistic_whose_check_raises_is_a_load_failure_not_a_crash(plugin_site, capsys):
    """``Statistic.problem`` runs while the registry loads: what it raises is that plugin's recorded failure;
    ``squeezekit plugins`` and every other plugin keep working."""
    from squeezekit.cli import main

    plugin_site.add(
        "sk_fussy",
        textwrap.dedent("""
        from dataclasses import dataclass

        import squeezekit


        class Fussy(squeezekit.Statistic):
            name = "fussy"
            fields = ("fussy",)

            @classmethod
            def problem(cls, policy):
                raise RuntimeError("cannot decide")


        @dataclass
        class NeedsFussy(squeezekit.TokenEvictor):
            name = "needs_fussy"
            needs = Fussy

            def score(self, view):
                return view.positions.float()


        @squeezekit.hookimpl
        def register_evictors(register):
            register(NeedsFussy)
    """),
        package="sk-fussy",
        version="1.0",
        entry_points={"fussy": "sk_fussy"},
    )
    registry = plugin_site.reload()
    assert [str(f) for f in registry.failures] == [
        "plugin 'needs_fussy' from sk-fussy 1.0: statistic 'fussy': problem() raised RuntimeError: cannot decide"
    ]
    assert main(["plugins"]) == 0
    assert "streaming" in capsys.readouterr().out
    with pytest.raises(squeezekit.PluginError, match="problem\\(\\) raised RuntimeError"):
        Config.from_kwargs(evictor="needs_fussy")


def test_misdeclared_statistics_are_contract_errors(plugin_site):
    plugin_site.add(
        "sk_badstats",
        textwrap.dedent("""
        from dataclasses import dataclass

        import squeezekit


        class Scratch(squeezekit.Statistic):
            name = "scratch_pad"
            fields = ("scratch_pad",)
            per_slot = True


        @dataclass
        class SlotHungry(squeezekit.LayerBudgetAllocator):
            name = "slot_hungry"
            needs = Scratch

            def allocate(self, request):
                return None


        @dataclass
        class WantsScratch(squeezekit.TokenEvictor):
            name = "wants_scratch"
            needs = (squeezekit.Stat.ATTENTION, Scratch)

            def score(self, view):
                return view.scratch_pad


        @squeezekit.hookimpl
        def register_allocators(register):
            register(SlotHungry)


        @squeezekit.hookimpl
        def register_evictors(register):
            register(WantsScratch)
    """),
        package="sk-badstats",
        version="1.0",
        entry_points={"badstats": "sk_badstats"},
    )
    registry = plugin_site.reload()
    problems = " | ".join(str(f) for f in registry.failures)
    assert "SlotHungry.needs must be Stat.NONE or statistics of one step" in problems
    with pytest.raises(squeezekit.ConfigError, match="needs scratch_pad statistics, which evictor 'h2o' does not"):
        Config.from_kwargs(evictor="h2o", fallback_evictor="wants_scratch")
    Config.from_kwargs(evictor="wants_scratch", fallback_evictor="h2o")  # attention is collected for both
