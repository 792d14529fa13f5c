"""The start-up hook registers a lazy placeholder, only in an lm-eval without entry-point discovery."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

HOOK = Path(__file__).resolve().parents[1] / "evaluators" / "_lm_eval_hook.py"


@pytest.fixture()
def hook():
    spec = importlib.util.spec_from_file_location("hook_under_test", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    module.uninstall()


def test_registers_placeholder_without_importing_the_adapter(hook):
    from lm_eval.api.registry import Registry

    fake = types.SimpleNamespace(model_registry=Registry("model"))
    assert hook.register(fake)
    assert fake.model_registry._objs["squeezekit"] == hook.PLACEHOLDER  # lazy: a "module:Class" string
    assert hook.register(fake)  # idempotent


def test_stands_aside_for_entry_point_discovery(hook):
    from lm_eval.api.registry import Registry

    fake = types.SimpleNamespace(model_registry=Registry("model"), load_plugins=lambda *a: None)
    assert not hook.register(fake)
    assert "squeezekit" not in fake.model_registry


def test_finder_answers_for_the_registry_only_once(hook, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    hook.uninstall()
    monkeypatch.delitem(sys.modules, hook.TARGET, raising=False)
    hook.install()
    finder = next(f for f in sys.meta_path if isinstance(f, hook._Finder))
    assert finder.find_spec("json") is None
    spec = finder.find_spec(hook.TARGET, importlib.import_module("lm_eval.api").__path__)
    assert spec is not None and isinstance(spec.loader, hook._Loader)
    assert not any(isinstance(f, hook._Finder) for f in sys.meta_path)  # removed itself


def test_placeholder_resolves_to_the_adapter():
    from lm_eval.api.registry import get_model

    cls = get_model("squeezekit")
    assert f"{cls.__module__}:{cls.__name__}" == "squeezekit.evaluators.lm_eval_adapter:SqueezekitLM"
