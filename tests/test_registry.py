"""The plugin registry with REAL third-party plugins: installed-looking packages (a module plus a ``.dist-info``
directory with entry points) put on ``sys.path`` by the ``plugin_site`` fixture, found through the same
``squeezekit`` entry-point group as the bundled policies."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from plugin_factory import BUNDLED, DOC, OLDEST_FIRST, bundled, doc_example_files, installed, installed_names

import squeezekit
from squeezekit import Config, PluginError


def names(reg) -> dict[str, set[str]]:
    """The policies of each kind but the default head split, which every registry holds (see `test_registry`)."""
    out = {"allocator": set(reg.allocators), "evictor": set(reg.evictors), "heads": set(reg.head_splits) - {"uniform"}}
    return {kind: names for kind, names in out.items() if names or kind != "heads"}


def everything() -> dict[str, set[str]]:
    """What the registry holds with no test plugin installed: the bundled policies and any the environment has."""
    heads = installed("heads") - {"uniform"}
    return {"allocator": installed("allocator"), "evictor": installed("evictor"), "heads": heads}


def assert_bundled_intact(reg) -> None:
    for kind, shipped in BUNDLED.items():
        table = reg.table(kind)
        for name in shipped:
            info = table[name]
            assert (info.package, info.version, info.origin) == ("squeezekit", "0.1.0", "squeezekit 0.1.0"), name
            module = f"{name}_heads" if kind == "heads" else name  # (a head split's file: plugins/NAME_heads.py)
            assert info.cls.__module__ == f"squeezekit.plugins.{module}"
    # ... and they still work end to end through the config schema
    config = Config.from_kwargs(allocator="squeeze", evictor="h2o", budget=0.2)
    assert config.build_evictor().name == "h2o" and config.build_allocator().name == "squeeze"


def simple_view(S: int = 10) -> squeezekit.LayerView:
    g = torch.Generator().manual_seed(0)
    return squeezekit.LayerView(
        keys=torch.randn(1, 2, S, 4, generator=g),
        values=torch.randn(1, 2, S, 4, generator=g),
        valid=torch.ones(1, 2, S, dtype=torch.bool),
        positions=torch.arange(S, dtype=torch.int32).expand(1, 2, S).clone(),
        seen=torch.tensor([S]),
        budget=torch.tensor([4]),
        layer_idx=0,
        n_layers=1,
        phase="prefill",
    )


def kept(view, idx, h: int = 0) -> set[int]:
    row = idx[0, h]
    return set(view.positions[0, h, row[row >= 0]].tolist())


# ---- the bundled plugins ---------------------------------------------------------------------------------------


def test_bundled_plugins_load_through_the_entry_point_group():
    reg = squeezekit.registry(reload=True)
    assert names(reg) == everything()
    assert reg.failures == []
    assert_bundled_intact(reg)
    assert [p.name for p in reg.all() if p.package == "squeezekit"] == [
        *sorted(BUNDLED["allocator"]),
        *sorted(BUNDLED["evictor"]),
        *sorted(BUNDLED["heads"]),
    ]
    for info in (p for p in reg.all() if p.package == "squeezekit"):
        # (the default head split is registered in code, as uniform_heads: the allocator's entry point is uniform)
        assert info.entry_point == ("uniform_heads" if (info.kind, info.name) == ("heads", "uniform") else info.name)
        assert info.doc and "\n" not in info.doc
        assert squeezekit.registry().get(info.kind, info.name) is info


def test_the_collection_time_list_of_bundled_policies_is_the_registrys(plugin_site):
    """`plugin_factory.bundled`, which parametrizes the tests of "every bundled policy", names what the registry
    loads from squeezekit (the bundled nine), also where SQUEEZEKIT_PLUGINS hides some and a third-party plugin is
    installed beside them; ``plain``: those that build at their defaults and need no statistic."""
    reg = squeezekit.registry(reload=True)
    for kind, table in (("allocator", reg.allocators), ("evictor", reg.evictors)):
        assert bundled(kind) == sorted(n for n, info in table.items() if info.package == "squeezekit")
        assert set(bundled(kind)) == BUNDLED[kind]
    assert bundled("allocator", plain=True) == ["pyramid", "squeeze", "uniform"]
    assert bundled("evictor", plain=True) == ["keydiff", "knorm", "lagkv", "random", "sliding_window", "streaming"]
    plugin_site.add("sk_oldest", OLDEST_FIRST)
    plugin_site.setenv("SQUEEZEKIT_PLUGINS", "uniform,sk_oldest")
    assert set(plugin_site.reload().evictors) == {"oldest_first"}
    assert set(bundled("evictor")) == BUNDLED["evictor"]


def test_the_readme_and_the_plugin_guide_name_every_bundled_policy():
    """The README's config-schema table and the introduction of docs/plugins.md name the bundled allocators and
    evictors, all of them and no other."""
    readme = (DOC.parents[1] / "README.md").read_text()
    intro = DOC.read_text().split("- a **layer-budget allocator**", 1)[1].split("\n\n", 1)[0]
    guide = dict(zip(("allocator", "evictor", "heads"), re.split(r"- a \*\*(?:token evictor|head split)\*\*", intro),
                     strict=True))  # fmt: skip
    for kind in ("allocator", "evictor", "heads"):
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{kind}` |")]
        assert set(re.findall(r"`(\w+)`", row.split("|")[2])) == set(bundled(kind)), row
        assert set(re.findall(r"`(\w+)`", guide[kind])) == set(bundled(kind)), guide[kind]


def test_registry_is_cached():
    assert squeezekit.registry() is squeezekit.registry()
    assert squeezekit.registry(reload=True) is squeezekit.registry()


# ---- a real third-party plugin ---------------------------------------------------------------------------------


def test_third_party_evictor_is_found_and_usable_by_name(plugin_site):
    plugin_site.add(
        "squeezekit_testplugin",
        OLDEST_FIRST,
        package="squeezekit-testplugin",
        version="0.3.1",
        entry_points={"oldest_first": "squeezekit_testplugin"},
    )
    reg = plugin_site.reload()
    assert reg.failures == []
    info = reg.get("evictor", "oldest_first")
    assert (info.kind, info.entry_point, info.package, info.version) == (
        "evictor",
        "oldest_first",
        "squeezekit-testplugin",
        "0.3.1",
    )
    assert info.origin == "squeezekit-testplugin 0.3.1"
    assert info.cls.__module__ == "squeezekit_testplugin"
    assert info.doc.startswith("Oldest first: keeps the first tokens")
    assert set(info.params()) == {"skip"}
    assert_bundled_intact(reg)

    config = Config.from_string("evictor=oldest_first,skip=2,allocator=uniform,budget=0.5")
    assert dict(config.params) == {"skip": 2}
    evictor = config.build_evictor()
    assert type(evictor) is info.cls and evictor.skip == 2
    assert config.describe() == "uniform() + oldest_first(skip=2) @ budget 0.5"
    assert Config.from_kwargs(evictor="oldest_first", skip=2, allocator="uniform", budget=0.5) == config

    view = simple_view()
    idx = evictor.select(view, torch.tensor([4]))
    assert squeezekit.selection.check_selection(idx, view, torch.tensor([4])) is None
    assert kept(view, idx) == {2, 3, 4, 9}  # the oldest after the skipped ones, and the newest

    # its parameters are validated by the plugin, and are config keys like any other
    with pytest.raises(squeezekit.ConfigError, match=r"model_args: skip = -1: must be an integer >= 0"):
        Config.from_string("evictor=oldest_first,skip=-1")
    with pytest.raises(squeezekit.ConfigError, match=r"skp = '1': unknown key .*did you mean 'skip'\?"):
        Config.from_string("evictor=oldest_first,skp=1")
    listed = installed_names("evictor", "oldest_first")
    with pytest.raises(squeezekit.UnknownPluginError, match=rf"installed: {listed}; did you mean 'oldest_first'\?"):
        Config.from_string("evictor=oldest_frist")


def test_third_party_plugin_is_gone_after_the_test():
    """The fixture restores the registry: nothing from the previous test leaks."""
    reg = squeezekit.registry()
    assert names(reg) == everything() and reg.failures == []
    with pytest.raises(squeezekit.UnknownPluginError):
        Config.from_string("evictor=oldest_first")


def test_third_party_allocator_and_evictor_in_one_plugin(plugin_site):
    plugin_site.add(
        "sk_pair",
        """
        from dataclasses import dataclass

        import torch

        import squeezekit
        from squeezekit.budget import distribute


        @dataclass
        class Front(squeezekit.LayerBudgetAllocator):
            '''Twice the budget for the first half of the layers.'''

            name = "front"

            def allocate(self, request):
                L = request.importance.shape[1]
                weights = torch.ones(L, dtype=torch.float64)
                weights[: L // 2] = 2
                targets = request.total.double().view(-1, 1) * weights / weights.sum()
                return distribute(targets, request.total, request.floor, request.cap)


        @dataclass
        class Newest(squeezekit.TokenEvictor):
            '''The most recent tokens.'''

            name = "newest"

            def score(self, view):
                return view.positions.float()


        @squeezekit.hookimpl
        def register_allocators(register):
            register(Front)


        @squeezekit.hookimpl
        def register_evictors(register):
            register(Newest)
        """,
        package="sk-pair",
        version="2.0",
    )
    reg = plugin_site.reload()
    assert reg.failures == []
    assert reg.get("allocator", "front").origin == reg.get("evictor", "newest").origin == "sk-pair 2.0"
    config = Config.from_kwargs(allocator="front", evictor="newest")
    request = squeezekit.AllocationRequest(torch.rand(1, 4), torch.tensor([60]), 1, torch.tensor([100]))
    assert config.build_allocator().allocate(request).tolist() == [[20, 20, 10, 10]]


def test_doc_example_package(plugin_site):
    """docs/plugins.md's example package, built from the doc's own code blocks, installs and works as documented."""
    files = doc_example_files()
    assert set(files) == {"pyproject.toml", "squeezekit_keynorm.py"}
    assert sum(len(text.splitlines()) for text in files.values()) < 40  # the doc promises under 40 lines
    project = plugin_site.add_doc_example()
    reg = plugin_site.reload()
    assert reg.failures == []
    info = reg.get("evictor", "keynorm")
    assert info.origin == f"{project['name']} {project['version']}" == "squeezekit-keynorm 0.1.0"

    config = Config.from_string("evictor=keynorm,window=3,budget=0.5")
    evictor = config.build_evictor()
    assert evictor.window == 3 and evictor.floor() == 3
    with pytest.raises(squeezekit.ConfigError, match="window = 0"):
        Config.from_kwargs(evictor="keynorm", window=0)

    # behaviour: the recent window, then the smallest key norms
    view = simple_view(S=12)
    norms = torch.tensor([5.0, 0.1, 4.0, 0.2, 3.0, 6.0, 0.3, 7.0, 8.0, 9.0, 9.5, 9.9])
    view.keys = torch.nn.functional.normalize(view.keys, dim=-1) * norms.view(1, 1, -1, 1)
    idx = evictor.select(view, torch.tensor([6]))
    assert squeezekit.selection.check_selection(idx, view, torch.tensor([6])) is None
    assert kept(view, idx, 0) == kept(view, idx, 1) == {9, 10, 11, 1, 3, 6}


def test_doc_example_package_builds_with_pip(plugin_site, tmp_path):
    """The doc's pyproject.toml really is a buildable package: pip builds its wheel (offline, with the installed
    setuptools), and the wheel's contents, unpacked into site-packages, register the evictor."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "squeezekit-keynorm"
    src.mkdir()
    for name, text in doc_example_files().items():
        (src / name).write_text(text)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    zipfile.ZipFile(wheel).extractall(plugin_site.path)
    reg = plugin_site.reload()
    assert reg.failures == []
    assert reg.get("evictor", "keynorm").origin == "squeezekit-keynorm 0.1.0"
    assert Config.from_kwargs(evictor="keynorm", window=16).build_evictor().window == 16


def test_doc_allocator_example(plugin_site):
    """The allocator snippet of docs/plugins.md works when registered from a plugin."""
    import re

    from plugin_factory import DOC

    block = re.search(r"```python\n(# example: allocator\n.*?)```", DOC.read_text(), flags=re.S).group(1)
    plugin_site.add("sk_doc_allocator", block, package="sk-doc-allocator")
    reg = plugin_site.reload()
    assert reg.failures == []
    info = reg.get("allocator", "dissimilar")
    importance = torch.tensor([[0.6, 0.84, 0.87, 0.97, 0.98, 0.99]])
    request = squeezekit.AllocationRequest(importance, torch.tensor([600]), 8, torch.tensor([400]))
    budgets = info.cls().allocate(request)
    assert squeezekit.budget.check_budgets(budgets, request.total, 8, request.cap, (1, 6)) is None
    assert budgets[0].tolist() == sorted(budgets[0].tolist(), reverse=True)  # less similar layers get more
    assert int(budgets[0, 0]) > 2 * int(budgets[0, -1])


# ---- plugins that break the contract ---------------------------------------------------------------------------

BROKEN = {
    "raises_at_import": (
        "raise RuntimeError('boom at import')\n",
        "failed to import: RuntimeError: boom at import",
    ),
    "not_a_subclass": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class NotAnEvictor:
            name = "not_a_subclass"

        @squeezekit.hookimpl
        def register_evictors(register):
            register(NotAnEvictor)
        """,
        "which is not a subclass of squeezekit.TokenEvictor",
    ),
    "allocator_as_evictor": (
        """
        import squeezekit
        from squeezekit.plugins.uniform import Uniform

        @squeezekit.hookimpl
        def register_evictors(register):
            register(Uniform)
        """,
        "which is not a subclass of squeezekit.TokenEvictor",
    ),
    "not_a_dataclass": (
        """
        import squeezekit

        class Plain(squeezekit.TokenEvictor):
            name = "not_a_dataclass"

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictors(register):
            register(Plain)
        """,
        "Plain must be a dataclass (its fields are its parameters)",
    ),
    "bad_name": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class BadName(squeezekit.TokenEvictor):
            name = "Bad-Name"

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictors(register):
            register(BadName)
        """,
        "BadName.name must be a lowercase identifier, got 'Bad-Name'",
    ),
    "abstract": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class NoScore(squeezekit.TokenEvictor):
            name = "abstract"

        @squeezekit.hookimpl
        def register_evictors(register):
            register(NoScore)
        """,
        "NoScore does not implement score",
    ),
    "no_default": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class NoDefault(squeezekit.LayerBudgetAllocator):
            name = "no_default"
            strength: float

            def allocate(self, request):
                return None

        @squeezekit.hookimpl
        def register_allocators(register):
            register(NoDefault)
        """,
        "NoDefault.strength needs a default value",
    ),
    "bad_needs": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class BadNeeds(squeezekit.TokenEvictor):
            name = "bad_needs"
            needs = "attention"

            def score(self, view):
                return view.attention

        @squeezekit.hookimpl
        def register_evictors(register):
            register(BadNeeds)
        """,
        "BadNeeds.needs must be a squeezekit.Stat, a Statistic class or a tuple of them, got 'attention'",
    ),
    "window_queries_without_window": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class NoWindow(squeezekit.TokenEvictor):
            name = "window_queries_without_window"
            needs = squeezekit.Stat.WINDOW_QUERIES

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictors(register):
            register(NoWindow)
        """,
        "NoWindow needs Stat.WINDOW_QUERIES, so it must have a 'window' field",
    ),
    "hook_raises": (
        """
        import squeezekit

        @squeezekit.hookimpl
        def register_evictors(register):
            raise KeyError("no such thing")
        """,
        "register_evictors raised KeyError: 'no such thing'",
    ),
    "bad_hook_args": (
        """
        import squeezekit

        @squeezekit.hookimpl
        def register_evictors(register, extra):
            pass
        """,
        "is not a valid pluggy plugin",
    ),
    "misspelled_hook": (
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class Fine(squeezekit.TokenEvictor):
            name = "misspelled_hook"

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictor(register):
            register(Fine)
        """,
        "implements unknown hook register_evictor",
    ),
    "registers_nothing": (
        '"""An entry point aimed at a module that registers no policy."""\n',
        "registers nothing (it implements none of the hooks)",
    ),
}


@pytest.mark.parametrize("plugin", sorted(BROKEN))
def test_broken_plugin_is_recorded_and_the_others_keep_working(plugin_site, plugin):
    source, problem = BROKEN[plugin]
    # named by the policy's own name when it has a usable one, else by the entry point
    expected_name = {"allocator_as_evictor": "uniform", "bad_name": "Bad-Name"}.get(plugin, plugin)
    package = f"sk-{plugin.replace('_', '-')}"
    plugin_site.add(f"sk_{plugin}", source, package=package, version="9.9", entry_points={plugin: f"sk_{plugin}"})
    reg = plugin_site.reload()
    assert len(reg.failures) == 1, [str(f) for f in reg.failures]
    failure = reg.failures[0]
    assert isinstance(failure, PluginError)
    assert failure.plugin == expected_name
    assert failure.origin == f"{package} 9.9"
    assert problem in failure.problem
    message = str(failure)
    assert message.startswith(f"plugin {expected_name!r} from {package} 9.9: ") and "\n" not in message
    assert names(reg) == everything()  # nothing of the broken plugin got in...
    assert_bundled_intact(reg)  # ... and nothing else fell out


def test_selecting_a_broken_plugin_says_why(plugin_site):
    source, _ = BROKEN["not_a_dataclass"]
    plugin_site.add("sk_nd", source, package="sk-nd", entry_points={"not_a_dataclass": "sk_nd"})
    plugin_site.reload()
    with pytest.raises(PluginError, match=r"plugin 'not_a_dataclass' from sk-nd 1.0.0: Plain must be a dataclass"):
        Config.from_kwargs(evictor="not_a_dataclass")


def test_constructor_raising_is_a_plugin_error(plugin_site):
    plugin_site.add(
        "sk_fragile",
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class Fragile(squeezekit.TokenEvictor):
            name = "fragile"
            level: int = 1

            def __post_init__(self):
                if self.level > 1:
                    raise ValueError("level too high")

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictors(register):
            register(Fragile)
        """,
        package="sk-fragile",
    )
    plugin_site.reload()
    assert Config.from_kwargs(evictor="fragile").build_evictor().level == 1
    with pytest.raises(PluginError) as excinfo:
        Config.from_kwargs(evictor="fragile", level=2)
    assert str(excinfo.value) == "plugin 'fragile' from sk-fragile 1.0.0: constructor raised ValueError: level too high"


def test_missing_module(plugin_site):
    plugin_site.add("sk_real", "", package="sk-ghost", entry_points={"ghost": "sk_ghost_module_that_is_not_there"})
    reg = plugin_site.reload()
    assert [(f.plugin, f.origin) for f in reg.failures] == [("ghost", "sk-ghost 1.0.0")]
    assert "failed to import: ModuleNotFoundError" in reg.failures[0].problem
    assert_bundled_intact(reg)


@pytest.mark.parametrize("entry_point", ["a_dup", "zz_dup"])
def test_duplicate_name_never_displaces_a_bundled_policy(plugin_site, entry_point):
    """A third-party evictor named like a bundled one is refused, whatever its entry point sorts like."""
    plugin_site.add(
        "sk_dup",
        """
        from dataclasses import dataclass
        import squeezekit

        @dataclass
        class FakeH2O(squeezekit.TokenEvictor):
            name = "h2o"

            def score(self, view):
                return view.positions.float()

        @squeezekit.hookimpl
        def register_evictors(register):
            register(FakeH2O)
        """,
        package="sk-dup",
        entry_points={entry_point: "sk_dup"},
    )
    reg = plugin_site.reload()
    assert [(f.plugin, f.origin) for f in reg.failures] == [("h2o", "sk-dup 1.0.0")]
    assert "evictor name 'h2o' is already registered by squeezekit 0.1.0" in reg.failures[0].problem
    assert_bundled_intact(reg)


def test_duplicate_name_between_third_party_plugins(plugin_site):
    source = OLDEST_FIRST
    plugin_site.add("sk_first", source, package="sk-first", entry_points={"first": "sk_first"})
    plugin_site.add("sk_second", source, package="sk-second", entry_points={"second": "sk_second"})
    reg = plugin_site.reload()
    assert reg.get("evictor", "oldest_first").origin == "sk-first 1.0.0"
    assert [(f.plugin, f.origin) for f in reg.failures] == [("oldest_first", "sk-second 1.0.0")]
    assert "already registered by sk-first 1.0.0" in reg.failures[0].problem


def test_entry_point_named_like_a_bundled_one(plugin_site):
    """A third-party entry point called "h2o" does not silently replace (or hide behind) the bundled one."""
    plugin_site.add("sk_shadow", OLDEST_FIRST, package="sk-shadow", entry_points={"h2o": "sk_shadow"})
    reg = plugin_site.reload()
    assert_bundled_intact(reg)
    assert [(f.plugin, f.origin) for f in reg.failures] == [("h2o", "sk-shadow 1.0.0")]
    assert "entry point name 'h2o' is already used by squeezekit 0.1.0" in reg.failures[0].problem


def test_several_broken_plugins_at_once(plugin_site):
    for plugin in ("raises_at_import", "not_a_subclass", "hook_raises"):
        plugin_site.add(
            f"sk_{plugin}", BROKEN[plugin][0], package=f"sk-{plugin}", entry_points={plugin: f"sk_{plugin}"}
        )
    plugin_site.add("squeezekit_testplugin", OLDEST_FIRST, package="squeezekit-testplugin")
    reg = plugin_site.reload()
    assert sorted(f.plugin for f in reg.failures) == ["hook_raises", "not_a_subclass", "raises_at_import"]
    assert "oldest_first" in reg.evictors
    assert_bundled_intact(reg)


# ---- SQUEEZEKIT_PLUGINS ----------------------------------------------------------------------------------------


def test_env_restricts_the_loaded_plugins(plugin_site):
    plugin_site.setenv("SQUEEZEKIT_PLUGINS", "uniform, streaming")
    reg = plugin_site.reload()
    assert names(reg) == {"allocator": {"uniform"}, "evictor": {"streaming"}}
    assert Config.from_kwargs(allocator="uniform").evictor == "streaming"
    with pytest.raises(
        squeezekit.UnknownPluginError, match=r"allocator = 'squeeze': unknown allocator; installed: uniform"
    ):
        Config.from_kwargs()  # the default allocator is not loaded


def test_env_isolates_a_bad_plugin(plugin_site):
    plugin_site.add(
        "sk_raises_at_import",
        BROKEN["raises_at_import"][0],
        package="sk-bad",
        entry_points={"bad": "sk_raises_at_import"},
    )
    plugin_site.add(
        "squeezekit_testplugin",
        OLDEST_FIRST,
        package="squeezekit-testplugin",
        entry_points={"oldest_first": "squeezekit_testplugin"},
    )
    assert [f.plugin for f in plugin_site.reload().failures] == ["bad"]
    plugin_site.setenv("SQUEEZEKIT_PLUGINS", "squeeze,oldest_first")
    reg = plugin_site.reload()
    assert reg.failures == []
    assert names(reg) == {"allocator": {"squeeze"}, "evictor": {"oldest_first"}}
    assert Config.from_kwargs(evictor="oldest_first").build_evictor().name == "oldest_first"


def test_env_empty_means_everything(plugin_site):
    plugin_site.setenv("SQUEEZEKIT_PLUGINS", " , ")
    assert names(plugin_site.reload()) == everything()


# ---- the helper other tests reuse -------------------------------------------------------------------------------


def test_make_plugin_writes_an_installed_distribution(tmp_path):
    from importlib import metadata

    from plugin_factory import make_plugin

    site = make_plugin(
        tmp_path, "sk_helper", "X = 1\n", package="sk-helper", version="0.0.7", entry_points={"a": "sk_helper:X"}
    )
    dists = list(metadata.distributions(path=[str(site)]))
    assert [(d.metadata["Name"], d.version) for d in dists] == [("sk-helper", "0.0.7")]
    (ep,) = dists[0].entry_points
    assert (ep.group, ep.name, ep.value) == ("squeezekit", "a", "sk_helper:X")
    assert (site / "sk_helper.py").read_text() == "X = 1\n"
    make_plugin(site, "sk_pkg.inner", textwrap.dedent("Y = 2\n"))
    assert (site / "sk_pkg" / "__init__.py").exists() and (site / "sk_pkg" / "inner.py").read_text() == "Y = 2\n"


# ---- docs/plugins.md quotes the contracts verbatim ---------------------------------------------------------------


def _doc_blocks() -> list[str]:
    import re

    from plugin_factory import DOC

    return re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize(
    "hook", ["register_allocators", "register_evictors", "register_head_splits", "register_commands"]
)
def test_doc_quotes_the_hook_specs(hook):
    import inspect

    from squeezekit import hookspecs

    source = inspect.getsource(getattr(hookspecs, hook))  # "@hookspec\ndef register_...: docstring"
    assert any(source.strip() in block for block in _doc_blocks()), f"docs/plugins.md does not quote {hook} verbatim"


@pytest.mark.parametrize("cls", ["LayerView", "AllocationRequest", "HeadSplitRequest"])
def test_doc_quotes_the_view_fields(cls):
    import dataclasses
    import inspect

    from squeezekit import policies

    source = inspect.getsource(getattr(policies, cls))
    body = source.split('"""', 2)[2].strip("\n").split("\n\n")[0]  # the fields, after the class docstring
    assert any(block.rstrip("\n") == body for block in _doc_blocks()), (
        f"docs/plugins.md does not quote {cls}'s fields verbatim"
    )
    for f in dataclasses.fields(getattr(policies, cls)):
        assert f"    {f.name}: " in body
