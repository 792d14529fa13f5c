"""Fake *installed* third-party plugins for tests: a module plus a ``.dist-info`` directory, in a plain directory.

``importlib.metadata`` discovers a distribution from any ``NAME-VERSION.dist-info`` directory on ``sys.path``, so
putting the directory on ``sys.path`` is, for squeezekit's registry, the same as ``pip install``. Use the
``plugin_site`` fixture (tests/conftest.py) rather than calling these directly: it puts the directory on
``sys.path``, reloads the registry, and undoes all of it after the test.

    def test_something(plugin_site):
        plugin_site.add("sk_bad", "raise RuntimeError('boom')")          # module sk_bad, package sk-bad 1.0.0
        reg = plugin_site.reload()
        assert reg.failures[0].plugin == "sk_bad"
"""

from __future__ import annotations

import functools
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path

GROUP = "squeezekit"

#: the policies squeezekit itself ships, by kind
BUNDLED = {
    "allocator": {"uniform", "squeeze", "pyramid", "calibrated", "lost_attention", "dynamickv", "cake", "simlayerkv"},
    "evictor": {
        "streaming",
        "sliding_window",
        "h2o",
        "snapkv",
        "tova",
        "chunkkv",
        "knorm",
        "keydiff",
        "random",
        "criticalkv",
        "expected_attention",
        "lagkv",
    },
    "heads": {"uniform", "adaptive"},
}
#: the policies of other packages installed in the environment the suite runs in (a user's own plugins: the suite
#: must pass beside them), by kind; set once per session by conftest.py before any test installs its own
AMBIENT: dict[str, set[str]] = {"allocator": set(), "evictor": set(), "heads": set()}


def installed(kind: str) -> set[str]:
    """Every policy of ``kind`` the environment has outside a test's own plugin site: squeezekit's and others'."""
    return BUNDLED[kind] | AMBIENT[kind]


def installed_names(kind: str, *extra: str) -> str:
    """``installed`` (plus ``extra``), sorted and comma-separated, as error messages list them."""
    return ", ".join(sorted(installed(kind) | set(extra)))


@functools.cache
def _shipped() -> tuple[tuple[str, type], ...]:
    """``(kind, class)`` of every policy squeezekit's own distribution registers, as its entry points load (and the
    default head split, registered in code)."""
    import importlib

    import pluggy

    from squeezekit import hookspecs
    from squeezekit.registry import _HOOKS, BUNDLED_PACKAGE, KINDS

    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(importlib.import_module("squeezekit.plugins.uniform_heads"), name="uniform_heads")
    for ep in metadata.distribution(BUNDLED_PACKAGE).entry_points:
        if ep.group == GROUP:
            pm.register(ep.load(), name=ep.name)
    found: list[tuple[str, type]] = []
    for kind in KINDS:
        getattr(pm.hook, _HOOKS[kind])(register=lambda cls, kind=kind: found.append((kind, cls)))
    return tuple(found)


def _builds_at_defaults(cls: type) -> bool:
    from squeezekit import SqueezekitError

    try:
        cls()
    except SqueezekitError:  # a required parameter (calibrated's profile)
        return False
    return True


def bundled(kind: str, plain: bool = False) -> list[str]:
    """The names of the policies of ``kind`` that squeezekit ships, sorted: the tests that cover "every bundled
    allocator / evictor" take their list from here, so that a policy added later is covered too.

    Read from squeezekit's own distribution's entry points, not from the process registry, so that it works at
    collection time (a ``parametrize`` argument), before any fixture, whatever ``SQUEEZEKIT_PLUGINS`` the calling
    shell sets. ``plain=True``: only those that build at their default parameters and need no statistic
    (``Stat.NONE``), the allocators that work from layer importance alone (not calibrated, which requires a
    profile, nor lost_attention, which needs window queries)."""
    from squeezekit.statistics import needed

    names = {
        cls.name
        for k, cls in _shipped()
        if k == kind and (not plain or (not needed(getattr(cls, "needs", ())) and _builds_at_defaults(cls)))
    }
    return sorted(names)


# A well-behaved third-party evictor, written as its author would (module source for `make_plugin`).
OLDEST_FIRST = '''
"""Keep the oldest tokens (a deliberately simple test policy)."""

from dataclasses import dataclass

import squeezekit


@dataclass
class OldestFirst(squeezekit.TokenEvictor):
    """Oldest first: keeps the first tokens of the prompt (and the engine keeps the newest)."""

    name = "oldest_first"
    #: ignore this many leading tokens
    skip: int = 0

    def __post_init__(self):
        squeezekit.check("skip", self.skip, self.skip >= 0, "must be an integer >= 0")

    def score(self, view):
        return (-view.positions.float()).masked_fill(view.positions < self.skip, float("-inf"))


@squeezekit.hookimpl
def register_evictors(register):
    register(OldestFirst)
'''


def _normalize(package: str) -> str:
    """The file-name form of a distribution name (PEP 503 / wheel spec)."""
    return re.sub(r"[-_.]+", "_", package).lower()


def make_plugin(
    site: str | Path,
    module: str,
    source: str,
    *,
    package: str | None = None,
    version: str = "1.0.0",
    entry_points: dict[str, str] | None = None,
) -> Path:
    """Write an installed-looking plugin into directory ``site`` and return ``site``.

    ``module`` is the importable module name (written as ``site/module.py``; a dotted name writes a package),
    ``source`` its code (dedented). ``package`` is the distribution name (default: ``module`` with ``-``),
    ``entry_points`` maps entry-point names of the ``squeezekit`` group to ``module[:attr]`` targets (default:
    ``{module: module}``). Several plugins may share one ``site``.
    """
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    package = package or module.replace("_", "-")
    entry_points = entry_points if entry_points is not None else {module: module}

    parts = module.split(".")
    if len(parts) == 1:
        target = site / f"{module}.py"
    else:
        pkg_dir = site.joinpath(*parts[:-1])
        pkg_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, len(parts)):
            init = site.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_text("")
        target = pkg_dir / f"{parts[-1]}.py"
    target.write_text(textwrap.dedent(source))

    dist_info = site / f"{_normalize(package)}-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    lines = [f"[{GROUP}]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (dist_info / "top_level.txt").write_text(parts[0] + "\n")
    return site


def purge_modules(site: str | Path) -> None:
    """Forget every module imported from ``site`` (so the next test can import a different one of that name)."""
    root = str(Path(site).resolve())
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if file and str(Path(file).resolve()).startswith(root):
            del sys.modules[name]


# ---- the documented example plugin (docs/plugins.md): the test suite builds it from the doc itself -------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def doc_example_files(doc: Path = DOC) -> dict[str, str]:
    """The files of the example package in docs/plugins.md: fenced blocks whose first line is ``# file: NAME``."""
    text = doc.read_text()
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        first, _, rest = block.partition("\n")
        m = re.fullmatch(r"# file: (\S+)", first.strip())
        if m:
            files[m.group(1)] = rest
    return files


def install_doc_example(site: str | Path, doc: Path = DOC) -> dict:
    """Write the docs' example package into ``site`` as if ``pip install``-ed; return its ``[project]`` table."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    files = doc_example_files(doc)
    project = tomllib.loads(files["pyproject.toml"])["project"]
    modules = [name for name in files if name.endswith(".py")]
    assert len(modules) == 1, f"expected one module in the doc example, got {modules}"
    make_plugin(
        site,
        modules[0][:-3],
        files[modules[0]],
        package=project["name"],
        version=project["version"],
        entry_points=project["entry-points"][GROUP],
    )
    return project
