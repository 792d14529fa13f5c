"""Shared fixtures. ``plugin_site``: install fake third-party plugins for one test (see tests/plugin_factory.py);
``one_thread``: torch on one thread for a module's tests; ``tiny_dir``: a tiny local model directory; ``build_wheel``:
squeezekit's wheel, built from a copy of the tree."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if (
    not torch.cuda.is_available()
):  # Triton's interpreter runs squeezekit's kernels on CPU tensors (tests/test_kernels.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")
import plugin_factory
from plugin_factory import install_doc_example, make_plugin, purge_modules

import squeezekit
from squeezekit.registry import Registry


@dataclass
class PluginSite:
    """A directory on ``sys.path`` that plays the role of site-packages for one test."""

    path: Path
    monkeypatch: pytest.MonkeyPatch

    def add(self, module: str, source: str, **kwargs) -> PluginSite:
        """Install a plugin module (see `plugin_factory.make_plugin` for the keyword arguments)."""
        make_plugin(self.path, module, source, **kwargs)
        importlib.invalidate_caches()
        return self

    def add_doc_example(self) -> dict:
        """Install the example package of docs/plugins.md; return its pyproject ``[project]`` table."""
        project = install_doc_example(self.path)
        importlib.invalidate_caches()
        return project

    def setenv(self, name: str, value: str) -> None:
        """Set an environment variable until the end of the test (undone before the registry is restored)."""
        self.monkeypatch.setenv(name, value)

    def isolate(self) -> None:
        """Load only squeezekit's own plugins and those this test installed (``SQUEEZEKIT_PLUGINS``), as on a machine
        with nothing else: for output that lists every installed plugin, as the docs show it."""
        from importlib import metadata

        names = []
        for ep in metadata.entry_points(group="squeezekit"):
            dist = ep.dist
            home = Path(str(dist.locate_file(""))) if dist is not None else None
            if dist is not None and (dist.metadata["Name"] == "squeezekit" or home == self.path):
                names.append(ep.name)
        self.setenv("SQUEEZEKIT_PLUGINS", ",".join(sorted(set(names))))

    def reload(self) -> Registry:
        """Reload the process-wide registry so that it sees what was installed; return it."""
        return squeezekit.registry(reload=True)


@pytest.fixture
def plugin_site(tmp_path):
    site = tmp_path / "site-packages"
    site.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SQUEEZEKIT_PLUGINS", raising=False)
        mp.syspath_prepend(str(site))
        try:
            yield PluginSite(site, mp)
        finally:
            purge_modules(site)
    # sys.path and the environment are back to normal: restore the registry the rest of the suite sees.
    importlib.invalidate_caches()
    squeezekit.registry(reload=True)


@pytest.fixture(autouse=True, scope="session")
def _no_plugin_restriction():
    """Tests see every installed plugin, whatever SQUEEZEKIT_PLUGINS the calling shell sets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SQUEEZEKIT_PLUGINS", raising=False)
        reg = squeezekit.registry(reload=True)
        for kind in plugin_factory.BUNDLED:
            table = reg.table(kind)
            plugin_factory.AMBIENT[kind] = {name for name, info in table.items() if info.package != "squeezekit"}
        yield
    squeezekit.registry(reload=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread and leave the other cores to other work. A module of many such tests
    declares ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with its own small tokenizer, saved like any local model directory (no hub, no SmolLM2)."""
    from squeezekit.evaluators.testing import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def build_wheel(tmp_path):
    """``build_wheel(before=None)``: the path of squeezekit's wheel, built by pip (offline, with the installed
    setuptools) from a copy of the tree's package folders in ``tmp_path / "src"`` (no build/, egg-info or caches);
    ``before(src)`` changes the copy first."""

    def build(before=None) -> Path:
        root = Path(__file__).resolve().parent.parent
        src = tmp_path / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        for name in ("squeezekit", "plugins", "evaluators"):
            shutil.copytree(root / name, src / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(root / name, src / name)
        if before is not None:
            before(src)
        pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        dist = tmp_path / "dist"
        proc = subprocess.run([*pip, "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        (wheel,) = dist.glob("squeezekit-*.whl")
        return wheel

    return build
