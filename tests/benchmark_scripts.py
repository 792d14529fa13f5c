"""The scripts of benchmarks/ in the tests. They are not installed with squeezekit: ``python benchmarks/NAME.py``
runs one with its own folder on ``sys.path`` (where lm_eval_timing.py finds lm_eval_reference.py), and `load` imports
one from the checkout the same way."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """benchmarks/NAME.py as the module ``NAME``."""
    if str(FOLDER) not in sys.path:
        sys.path.append(str(FOLDER))
    return importlib.import_module(name)
