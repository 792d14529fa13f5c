"""Build step (pyproject ``[tool.setuptools.cmdclass]``): install the lm-eval startup hook next to the package.

Adds two files at the top of site-packages: ``_squeezekit_lm_eval_hook.py`` (a copy of ``_lm_eval_hook.py``) and
``squeezekit-lm-eval.pth`` (one line that imports it at startup). A regular wheel takes them from ``build_lib``; an
editable install (PEP 660) ships only its own finder from there, so they go into the editable wheel's folder
(the ``install`` command's ``install_lib``) instead. pip records both, so uninstalling removes them. A regular build
also deletes the modules of an earlier build that the tree no longer has (see `build_py._drop_stale_modules`).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools.command.build_py import build_py as _build_py

HOOK_SOURCE = Path(__file__).with_name("_lm_eval_hook.py")
HOOK_MODULE = "_squeezekit_lm_eval_hook.py"
PTH = "squeezekit-lm-eval.pth"
# Runs at every interpreter start: it must never fail, even once the hook module is gone (a stale .pth after a
# partial uninstall), so it imports the hook only if it can be found.
PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('_squeezekit_lm_eval_hook') and __import__('_squeezekit_lm_eval_hook')\n"
)


class build_py(_build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            self._write(Path(self.get_finalized_command("install").install_lib))
        else:
            self._drop_stale_modules()
            self._write(Path(self.build_lib))

    def _drop_stale_modules(self) -> None:
        """Delete the modules that an earlier build left in ``build_lib`` and the tree no longer has: the wheel packs
        all of ``build_lib``, so a module moved out of the package (to benchmarks/, say) would ship again from a
        checkout's old build/ folder."""
        built = {os.path.abspath(path) for path in super().get_outputs(include_bytecode=False)}
        for package in self.packages or ():
            for path in Path(self.build_lib, *package.split(".")).glob("*.py"):
                if os.path.abspath(path) not in built:
                    path.unlink()

    def _write(self, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(HOOK_SOURCE), str(target / HOOK_MODULE), preserve_mode=False)
        (target / PTH).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs += [os.path.join(self.build_lib, HOOK_MODULE), os.path.join(self.build_lib, PTH)]
        return outputs
