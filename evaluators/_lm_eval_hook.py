"""Make ``lm_eval --model squeezekit`` work with lm-eval 0.4.13, which has no plugin discovery for models.

Installed by squeezekit's build (evaluators/_build.py) as the top-level module ``_squeezekit_lm_eval_hook`` plus
``squeezekit-lm-eval.pth``, whose one line imports it when Python starts. Importing it costs one import-hook
object: no lm-eval, torch or transformers import. The hook answers for two lm-eval modules only, each the first
time it is imported, and removes itself once both are:

* ``lm_eval.api.registry``: it registers the lazy placeholder
  ``squeezekit -> squeezekit.evaluators.lm_eval_adapter:SqueezekitLM`` in lm-eval's model registry (the adapter
  itself is imported only when ``--model squeezekit`` is asked for). lm-eval releases that read the
  ``lm_eval.models`` entry-point group (they have ``load_plugins``) are left to that entry point.
* ``lm_eval.config.evaluate_config``: the ``squeezekit`` model's ``pretrained`` defaults to the embedded model, but
  lm-eval hands RULER's task functions the ``--model_args`` merged with ``--metadata`` as given
  (``EvaluatorConfig._process_arguments``), before any model exists, and RULER sizes its prompts with the tokenizer
  named there (``lm_eval/tasks/ruler/common_utils.py``), so without ``pretrained=`` the literal command ended in an
  assertion. `default_pretrained` wraps ``_process_arguments``: only when the model is ``squeezekit`` and none of
  ``pretrained``, ``tokenizer`` and ``model`` (the keys RULER reads a tokenizer from) is in the merged metadata, it
  adds ``pretrained=<the embedded model's directory>`` to the task metadata (the model args stay as given). Other
  models cost one comparison.

Tested with lm-eval 0.4.13, the version pyproject's ``eval`` extra pins (``lm-eval==0.4.13``). Whatever goes wrong
inside the hook (another lm-eval layout, squeezekit not importable) leaves lm-eval exactly as it is.
``SQUEEZEKIT_LM_EVAL_HOOK=0`` turns the hook off.
"""

from __future__ import annotations

import functools
import os
import sys

NAME = "squeezekit"
PLACEHOLDER = "squeezekit.evaluators.lm_eval_adapter:SqueezekitLM"
#: the keys RULER's tasks read a tokenizer name from (lm_eval/tasks/ruler/common_utils.py, TOKENIZER_ARG_KEYS)
TOKENIZER_KEYS = ("tokenizer", "pretrained", "model")


def register(module) -> bool:
    """Register the placeholder in an imported ``lm_eval.api.registry``; True when it is (or already was) there."""
    if hasattr(module, "load_plugins"):  # newer lm-eval: the entry point in group lm_eval.models does it
        return False
    registry = getattr(module, "model_registry", None)
    if registry is None or not hasattr(registry, "register"):
        return False
    try:
        if NAME not in registry:
            try:
                registry.register(NAME, target=PLACEHOLDER)  # lm-eval 0.4.13
            except TypeError:
                registry.register(NAME, lazy=PLACEHOLDER)  # the pre-release spelling of the same call
        # get_model() imports lm-eval's own model table only into an *empty* registry: import it now.
        import lm_eval.models  # noqa: F401
    except Exception:  # never break lm-eval itself
        return False
    return True


def add_default_pretrained(config) -> None:
    """Give the task metadata of an lm-eval ``EvaluatorConfig`` for ``--model squeezekit`` the embedded model's
    directory as ``pretrained``, unless it names a tokenizer already (see the module docstring)."""
    if getattr(config, "model", None) != NAME:
        return
    metadata = getattr(config, "metadata", None)
    if not isinstance(metadata, dict) or any(metadata.get(k) for k in TOKENIZER_KEYS):
        return
    from squeezekit.models import default_model_dir

    metadata["pretrained"] = str(default_model_dir())


def default_pretrained(module) -> bool:
    """Wrap ``EvaluatorConfig._process_arguments`` of an imported ``lm_eval.config.evaluate_config`` with
    `add_default_pretrained`; True when it is (or already was) wrapped."""
    try:
        cls = module.EvaluatorConfig
        original = cls._process_arguments
        if getattr(original, "_squeezekit", False):
            return True

        @functools.wraps(original)
        def _process_arguments(self):
            result = original(self)
            try:
                add_default_pretrained(self)
            except Exception:  # never break lm-eval itself: RULER then asks for pretrained= as before
                pass
            return result

        _process_arguments._squeezekit = True  # type: ignore[attr-defined]
        cls._process_arguments = _process_arguments
    except Exception:  # another lm-eval layout: leave it as it is
        return False
    return True


#: what the hook does to each module it answers for, once that module has been executed
TARGETS = {"lm_eval.api.registry": register, "lm_eval.config.evaluate_config": default_pretrained}


class _Loader:
    """Runs the real loader, then ``after`` on the fresh module; everything else is the real loader's."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after(module)


class _Finder:
    """A `sys.meta_path` entry that answers for the `TARGETS` only, each once; it removes itself after the last."""

    def __init__(self, targets=None):
        self.pending = dict(TARGETS if targets is None else targets)

    def find_spec(self, fullname, path=None, target=None):
        after = self.pending.pop(fullname, None)
        if after is None:
            return None
        if not self.pending:
            uninstall()
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, after)
                return spec
        return None


def install() -> None:
    if os.environ.get("SQUEEZEKIT_LM_EVAL_HOOK") == "0":
        return
    pending = {}
    for name, after in TARGETS.items():
        if name in sys.modules:  # imported before the hook: do it now
            after(sys.modules[name])
        else:
            pending[name] = after
    if pending and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(pending))


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


if __name__ == "_squeezekit_lm_eval_hook":  # imported by the .pth line at startup (not as squeezekit.evaluators...)
    install()
