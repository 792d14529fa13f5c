"""Make ``lm_eval --model squeezekit`` work with lm-eval 0.4.13, which has no plugin discovery for models.

Installed by squeezekit's build (evaluators/_build.py) as the top-level module ``_squeezekit_lm_eval_hook`` plus
``squeezekit-lm-eval.pth``, whose one line imports it when Python starts. Importing it costs one import-hook
object: no lm-eval, torch or transformers import. Only when ``lm_eval.api.registry`` is imported does it register
the lazy placeholder ``squeezekit -> squeezekit.evaluators.lm_eval_adapter:SqueezekitLM`` in lm-eval's model
registry (the adapter itself is imported only when ``--model squeezekit`` is asked for), then the hook removes
itself. lm-eval releases that read the ``lm_eval.models`` entry-point group (they have ``load_plugins``) are left
to that entry point. ``SQUEEZEKIT_LM_EVAL_HOOK=0`` turns the hook off.
"""

from __future__ import annotations

import os
import sys

TARGET = "lm_eval.api.registry"
NAME = "squeezekit"
PLACEHOLDER = "squeezekit.evaluators.lm_eval_adapter:SqueezekitLM"


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


class _Loader:
    """Runs the real loader, then `register` on the fresh module; everything else is the real loader's."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register(module)


class _Finder:
    """A `sys.meta_path` entry that answers for ``lm_eval.api.registry`` only, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if os.environ.get("SQUEEZEKIT_LM_EVAL_HOOK") == "0":
        return
    if TARGET in sys.modules:
        register(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


if __name__ == "_squeezekit_lm_eval_hook":  # imported by the .pth line at startup (not as squeezekit.evaluators...)
    install()
