"""What a careless plugin or a hostile input can no longer do (issue 13), beyond the one-line errors of
tests/test_errors.py: writes to the copies a plugin is given change nothing, messages stay short and printable,
a stale start-up hook is silent, a stale build folder ships no module the tree no longer has, an empty cache variable
is no cache directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import batch, tiny_model

import squeezekit
from squeezekit import Config
from squeezekit.cache import SqueezeCache
from squeezekit.transformers_api import cache_in

GREEDY = dict(do_sample=False, pad_token_id=0)


def test_writes_to_budget_and_seen_change_nothing(plugin_site):
    """An evictor that overwrites ``view.budget`` / ``view.seen`` writes into its own copies: every layer still holds
    at most its budget at every step, and the output equals the well-behaved evictor's."""
    plugin_site.add(
        "sk_greedy",
        textwrap.dedent('''
        from dataclasses import dataclass

        import squeezekit


        @dataclass
        class Greedy(squeezekit.TokenEvictor):
            """Tries to keep everything by raising its own budget."""

            name = "greedy"

            def score(self, view):
                view.budget.fill_(10**6)
                view.seen.zero_()
                return view.positions.float()


        @squeezekit.hookimpl
        def register_evictors(register):
            register(Greedy)
    '''),
        package="sk-greedy",
        version="1.0",
        entry_points={"greedy": "sk_greedy"},
    )
    plugin_site.reload()
    model = tiny_model("llama")
    ids, mask = batch(2, 48, pad=6)
    held = []

    def spy(module, args, kwargs, output):
        cache = cache_in(kwargs)
        if isinstance(cache, SqueezeCache) and cache.budgets is not None:
            held.append(all(bool((layer.counts() <= layer.budget.view(-1, 1)).all()) for layer in cache.layers))

    outs = {}
    for evictor in ("greedy", "sliding_window"):
        params = {"window": 1} if evictor == "sliding_window" else {}
        with squeezekit.compress(model, allocator="uniform", evictor=evictor, budget=0.25, **params) as c:
            handle = model.model.register_forward_hook(spy, with_kwargs=True)
            try:
                outs[evictor] = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
            finally:
                handle.remove()
            assert c.summary()["kv_bytes_kept"] <= 0.25 * c.summary()["kv_bytes_full"] * 1.05
    assert held and all(held)
    assert torch.equal(outs["greedy"], outs["sliding_window"])  # the same ranking: most recent first


def test_huge_values_give_short_messages():
    """A 50 MB value (or key) gives an error line of a few hundred characters, not 50 MB."""
    big = "x" * 50_000_000
    for kwargs in ({"evictor": big}, {big: 1}, {"budget": big}):
        try:
            Config.from_kwargs(**kwargs)
        except squeezekit.ConfigError as exc:
            message = str(exc)
        assert len(message) < 600 and "\n" not in message, len(message)


def test_control_characters_are_never_echoed_raw(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('"\\e[31mbudget\\e[0m": 0.2\n')
    try:
        Config.from_file(path)
    except squeezekit.ConfigError as exc:
        message = str(exc)
    assert "\x1b" not in message and "\\x1b[31mbudget" in message


def test_a_stale_startup_hook_is_silent(tmp_path):
    """The .pth line squeezekit installs imports its hook only if the hook module is there: after a partial
    uninstall, Python still starts without a traceback."""
    from squeezekit.evaluators._build import PTH, PTH_LINE

    (tmp_path / PTH).write_text(PTH_LINE)  # the line alone, its module gone
    code = f"import site; site.addsitedir({str(tmp_path)!r}); print('started')"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "started\n" and out.stderr == "", out.stderr


def test_a_stale_build_folder_ships_no_module_the_tree_no_longer_has(build_wheel):
    """pip builds a checkout's wheel in its build/ folder and the wheel packs all of build/lib: a module moved out of
    the package (benchmarks/gpu_perf.py was squeezekit/evaluators/gpu_perf.py) must not ship again from an old build."""
    import zipfile

    def old_build(src):
        stale = src / "build" / "lib" / "squeezekit" / "evaluators"
        stale.mkdir(parents=True)
        (stale / "gpu_perf.py").write_text("raise SystemExit('an old build')\n")

    wheel = build_wheel(old_build)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "squeezekit/evaluators/bench_models.py" in names and "squeezekit-lm-eval.pth" in names
    assert not {n for n in names if n.rpartition("/")[2] in ("gpu_perf.py", "lm_eval_timing.py", "reference.py")}


def test_an_empty_cache_variable_means_unset(monkeypatch, tmp_path):
    from pathlib import Path

    from squeezekit.models import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("SQUEEZEKIT_CACHE", "")
    assert cache_dir() == tmp_path / "squeezekit"  # never ~/.cache itself
    monkeypatch.setenv("SQUEEZEKIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == Path(tmp_path / "mine")


# ---- allocators that look at the layers (Stat.WINDOW_QUERIES) --------------------------------------------------------
def _window_allocator(write=None, fail_prepare=None):
    import dataclasses

    @dataclasses.dataclass
    class Looking(squeezekit.LayerBudgetAllocator):
        name = "looking"
        needs = squeezekit.Stat.WINDOW_QUERIES
        window: int = 4

        def prepare(self, model, evictor):
            if fail_prepare is not None:
                raise fail_prepare

        def allocate(self, request):
            for view in request.layers:
                assert view.window_queries is not None and view.window_queries.shape[3] == 4
                if write is not None:
                    getattr(view, write).add_(1)
            from squeezekit.budget import distribute

            L = request.importance.shape[1]
            return distribute(request.total.double().view(-1, 1).expand(-1, L) / L, request.total, request.floor,
                              request.cap)  # fmt: skip

    return Looking


def test_an_allocator_writing_into_the_layers_it_is_shown_is_stopped():
    """The prefill views an allocator gets (``AllocationRequest.layers``) are the cache's own tensors where they can
    be (no copies of a whole cache): a write to them is a one-line PluginError, as it is for evictors."""
    model = tiny_model("llama")
    ids, mask = batch(2, 40)
    with torch.no_grad(), squeezekit.compress(model, allocator="uniform", evictor="streaming", budget=0.5) as c:
        c.runner.use("allocator", _window_allocator(write="keys")())
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        except squeezekit.PluginError as exc:
            message = str(exc)
        else:
            raise AssertionError("the write went unnoticed")
    assert "\n" not in message and "looking" in message and "wrote to view.keys in place" in message


def test_an_allocator_reading_the_layers_leaves_the_output_unchanged():
    """Looking costs nothing to the result: the same budgets as uniform give the same tokens, with the queries of the
    allocator's own window collected (the evictor, streaming, needs none)."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    ids, mask = batch(2, 40)
    outs = []
    for looking in (False, True):
        with squeezekit.compress(model, allocator="uniform", evictor="streaming", budget=0.5) as c:
            if looking:
                c.runner.use("allocator", _window_allocator()())
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=6, **GREEDY))
    assert torch.equal(outs[0], outs[1])


def test_prepare_failing_is_one_line_and_a_config_error_passes_through():
    model = tiny_model("llama")
    from squeezekit.runner import PolicyRunner

    runner = PolicyRunner(Config.from_kwargs(allocator="uniform"))
    runner._policies["allocator"] = _window_allocator(fail_prepare=RuntimeError("no GPU\nat all"))()
    try:
        runner.prepare(model)
    except squeezekit.PluginError as exc:
        assert "prepare() raised RuntimeError" in str(exc) and "looking" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("prepare() failing went unnoticed")
    runner._policies["allocator"] = _window_allocator(fail_prepare=squeezekit.ConfigError("profile", "x", "bad"))()
    try:
        runner.prepare(model)
    except squeezekit.PluginError:
        raise AssertionError("a ConfigError from prepare() must reach the user as it is") from None
    except squeezekit.ConfigError as exc:
        assert "profile" in str(exc)


def test_an_evictor_failing_inside_an_allocators_call_is_the_evictors_error(plugin_site):
    """``AllocationRequest.evictor`` scores through the runner: an evictor whose scores are wrong when lost_attention
    ranks tokens with it is reported as that evictor (not as the allocator), and its fallback takes over."""
    plugin_site.add(
        "sk_wrongshape",
        textwrap.dedent("""
        from dataclasses import dataclass

        import squeezekit


        @dataclass
        class WrongShape(squeezekit.TokenEvictor):
            name = "wrong_shape"

            def score(self, view):
                return view.positions[..., :-1].float()


        @squeezekit.hookimpl
        def register_evictors(register):
            register(WrongShape)
    """),
        package="sk-wrongshape",
        version="1.0",
        entry_points={"wrong_shape": "sk_wrongshape"},
    )
    plugin_site.reload()
    model = tiny_model("llama")
    ids, mask = batch(2, 40)
    with torch.no_grad(), squeezekit.compress(model, allocator="lost_attention", evictor="wrong_shape", budget=0.5):
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        except squeezekit.PluginError as exc:
            message = str(exc)
        else:
            raise AssertionError("the wrong shape went unnoticed")
    assert message.startswith("plugin 'wrong_shape'") and "score() returned shape" in message, message
    config = dict(allocator="lost_attention", evictor="wrong_shape", fallback_evictor="streaming", budget=0.5)
    with torch.no_grad(), squeezekit.compress(model, **config) as c:
        with pytest.warns(squeezekit.PluginFallbackWarning, match="wrong_shape"):
            model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert c.runner.evictor.name == "streaming" and "allocator" not in c.runner.failures


def test_an_allocator_selects_through_the_evictor_as_the_engine_would(plugin_site):
    """``request.evictor.select`` is the engine's choice (the top of a scoring evictor's scores, newest kept), and an
    evictor whose own ``select`` breaks the contract there is reported as that evictor."""
    import dataclasses

    from squeezekit.budget import distribute
    from squeezekit.selection import top_slots

    picks = []

    @dataclasses.dataclass
    class Selecting(squeezekit.LayerBudgetAllocator):
        name = "selecting"
        needs = squeezekit.Stat.WINDOW_QUERIES
        window: int = 4

        def allocate(self, request):
            for view in request.layers:
                keep = torch.full((view.keys.shape[0],), 5)
                picks.append((request.evictor.select(view, keep), view))
            L = request.importance.shape[1]
            return distribute(request.total.double().view(-1, 1).expand(-1, L) / L, request.total, request.floor,
                              request.cap)  # fmt: skip

    plugin_site.add(
        "sk_duplicates",
        textwrap.dedent("""
        from dataclasses import dataclass

        import torch

        import squeezekit


        @dataclass
        class Duplicates(squeezekit.TokenEvictor):
            name = "duplicates"

            def score(self, view):
                return view.positions.float()

            def select(self, view, keep):
                B, H, S = view.valid.shape
                return torch.zeros(B, H, int(keep.max()), dtype=torch.long)


        @squeezekit.hookimpl
        def register_evictors(register):
            register(Duplicates)
    """),
        package="sk-duplicates",
        version="1.0",
        entry_points={"duplicates": "sk_duplicates"},
    )
    plugin_site.reload()
    model = tiny_model("llama")
    ids, mask = batch(2, 40, pad=3)
    with torch.no_grad(), squeezekit.compress(model, evictor="streaming", budget=0.5, sinks=2, window=2) as c:
        c.runner.use("allocator", Selecting())
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        streaming = c.runner.evictor
    assert picks
    for idx, view in picks:
        assert torch.equal(idx, top_slots(streaming.score(view), view, torch.full((2,), 5)))
    with torch.no_grad(), squeezekit.compress(model, evictor="duplicates", budget=0.5) as c:
        c.runner.use("allocator", Selecting())
        broken = "^plugin 'duplicates'.*select\\(\\) (returned duplicate|kept an invalid)"
        with pytest.raises(squeezekit.PluginError, match=broken):
            model(input_ids=ids, attention_mask=mask, use_cache=True)
