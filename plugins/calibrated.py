"""Calibrated allocator: budgets from each layer's measured loss increase under eviction (a calibration profile).

`squeezekit calibrate` measures, on calibration text, how much the next-token loss rises when one layer alone is
evicted to a few budget levels (fractions of the prompt; the other layers keep it whole).

``rule="sqrt"`` (default): each layer's curve plus its standard error (what the calibration cannot rule out) is
fitted with ``a x (1/f - 1)`` (least squares over the levels: the loss of keeping a share ``f`` falls as 1/f and
vanishes at the whole prompt), and budgets are proportional to ``sqrt(a)``, the water-filling optimum for such
curves (`squeezekit.budget.sqrt_split`): the same shares at every budget, and no layer starved because a few
calibration documents happened to show it cheap. ``rule="greedy"``: every layer starts at the
evictor's floor and each further token goes to the layer where the measured curves (linear between levels) say it
saves the most (`squeezekit.budget.waterfill`); single-layer costs add up to less than the real loss of starving
many layers at once, so on SmolLM2 the greedy starves too many and loses to uniform (docs/results/allocators).

A profile is made for one model and one evictor (with its parameters): anything else is a one-line `ConfigError`
when the ``compress`` block starts.

``profile`` names a file, or a profile bundled with squeezekit as ``bundled:MODEL/EVICTOR``:
``bundled:smollm2/snapkv`` is the embedded SmolLM2-135M-Instruct with snapkv at its default parameters
(`bundled_profiles` lists them: h2o, sliding_window, snapkv and streaming, the profiles docs/results used). They
ship as package data (squeezekit/plugins/profiles/smollm2/), so a regular install has them, whatever the working
directory. A bundled name is never a relative path by accident: a file whose name starts with ``bundled:`` is given
as ``./bundled:...``.

Reading a profile checks every number in it (`check_profile`): a broken or hand-edited profile is refused when the
config is built, in one line naming the field, instead of changing the budgets silently or failing mid-run.
Levels increase strictly within [1e-6, 1 - 1e-6] (`MIN_LEVEL`, `MAX_LEVEL`); every cost (``loss``, nats per token)
is finite and within +-1e6 (`MAX_COST`); every standard error (``stderr``) finite and in [0, 1e6]. Within these
bounds the allocators' arithmetic stays finite: ``sqrt`` fits ``a = sum((loss + stderr) g) / sum(g**2)`` with
``g = 1/level - 1`` in [1e-6, 1e6], so ``|a| <= 2e12`` (a cost of 1e308 made ``a`` infinite and
`squeezekit.budget.sqrt_split` NaN, blamed on the allocator), and ``greedy``'s slopes stay below 2e6 nats per token;
the bound is still far beyond any real cost (the bundled SmolLM2 profiles' largest is 0.27). A profile file is read
only if it is a regular file of at most 16 MiB (`MAX_PROFILE_BYTES`; 100 layers x 10 levels take about 30 KiB), so
a FIFO or a device never blocks (`squeezekit.files.read_bytes`).
"""

import dataclasses
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import squeezekit
from squeezekit.budget import sqrt_split, waterfill
from squeezekit.errors import shown
from squeezekit.files import MIB, read_bytes

FORMAT = "squeezekit-calibration-profile/1"
ARCH_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
#: ``profile=bundled:NAME`` names ``BUNDLED_DIR / NAME.json``
BUNDLED = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "profiles"
#: the largest profile file read
MAX_PROFILE_BYTES = 16 * MIB
#: the bounds of a budget level (a fraction of the prompt) in a profile
MIN_LEVEL, MAX_LEVEL = 1e-6, 1 - 1e-6
#: the largest magnitude of a cost or a standard error in a profile, in nats per token (see the module docstring)
MAX_COST = 1e6
#: what a profile is, for the messages of a missing or unreadable one
WRITTEN_BY = "profile written by squeezekit calibrate --out FILE"


def model_identity(model) -> dict:
    """What a profile records about its model: its directory's name and the shape of its architecture."""
    config = getattr(model.config, "text_config", None) or model.config
    name = Path(str(getattr(model.config, "_name_or_path", "") or "unnamed").rstrip("/")).name
    return {"name": name, **{k: getattr(config, k, None) for k in ARCH_KEYS}}


def evictor_identity(evictor) -> dict:
    return {"name": evictor.name, **{f.name: getattr(evictor, f.name) for f in dataclasses.fields(evictor) if f.init}}


def describe(identity: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in identity.items() if k != "name")
    return f"{identity['name']}({params})" if params else identity["name"]


# ---- naming a profile -------------------------------------------------------------------------------------------
def bundled_profiles() -> list[str]:
    """The names of the bundled profiles, ``bundled:MODEL/EVICTOR``, sorted."""
    return sorted(f"{BUNDLED}{p.parent.name}/{p.stem}" for p in BUNDLED_DIR.glob("*/*.json"))


def profile_path(name: str) -> Path:
    """The file ``profile=name`` names: a bundled profile's, or ``name`` itself (see the module docstring)."""
    if not name.startswith(BUNDLED):
        return Path(name)
    known = bundled_profiles()
    if name not in known:
        import difflib

        short = [k[len(BUNDLED) :] for k in known]  # (compared without the prefix they all share)
        near = difflib.get_close_matches(name[len(BUNDLED) :], short, n=1, cutoff=0.6)
        hint = f"; did you mean {BUNDLED + near[0]!r}?" if near else ""
        raise squeezekit.ConfigError("profile", name, f"no bundled profile of that name; bundled: {', '.join(known)}"
                                     f"{hint}")  # fmt: skip
    return BUNDLED_DIR / f"{name[len(BUNDLED) :]}.json"


# ---- checking a profile -----------------------------------------------------------------------------------------
class _Bad(Exception):
    """One problem of a profile: ``field = found: rule`` (turned into a ConfigError naming the profile)."""


def _number(value, where: str) -> float:
    """``value`` if it is a finite number (a JSON integer, of any size, stays an int until its range is checked),
    else `_Bad`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(f"{where} = {shown(value)}: expected a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Bad(f"{where} = {shown(value)}: must be a finite number")
    return value


def _table(data: dict, key: str, rows: int | None, columns: int, low: float, rule: str) -> list[list[float]]:
    """``data[key]`` as floats: a list of ``rows`` (any number >= 1 when None) lists of ``columns`` numbers, each in
    [low, `MAX_COST`] (else `_Bad` with ``rule``)."""
    table = data.get(key)
    shape = f"{rows} rows (one per layer, as in loss)" if rows is not None else "rows (one per layer)"
    expected = f"expected a list of {shape} of {columns} numbers each (one per level)"
    if not isinstance(table, list) or not table or (rows is not None and len(table) != rows):
        raise _Bad(f"{key} = {shown(table)}: {expected}")
    out = []
    for i, row in enumerate(table):
        if not isinstance(row, list) or len(row) != columns:
            raise _Bad(f"{key}[{i}] = {shown(row)}: {expected}")
        for j, x in enumerate(row):
            if not low <= _number(x, f"{key}[{i}][{j}]") <= MAX_COST:
                raise _Bad(f"{key}[{i}][{j}] = {shown(x)}: {rule}")
        out.append([float(x) for x in row])
    return out


def check_profile(data: object) -> dict:
    """The profile ``data`` (parsed JSON) with every number checked (see the module docstring), its numbers as
    floats; `_Bad` (the first problem, naming the field) otherwise."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _Bad(f"is not a calibration profile ({FORMAT}) written by squeezekit calibrate")
    for key in ("model", "evictor"):
        identity = data.get(key)
        if not isinstance(identity, dict) or not isinstance(identity.get("name"), str):
            raise _Bad(f"{key} = {shown(identity)}: expected the {key}'s identity (an object with its name)")
    levels = data.get("levels")
    if not isinstance(levels, list) or not levels:
        raise _Bad(f"levels = {shown(levels)}: expected a list of budget levels (fractions of the prompt)")
    levels = [_number(x, f"levels[{i}]") for i, x in enumerate(levels)]
    if not all(MIN_LEVEL <= x <= MAX_LEVEL for x in levels) or any(b <= a for a, b in itertools.pairwise(levels)):
        raise _Bad(f"levels = {shown(levels)}: must increase strictly, each in [{MIN_LEVEL:g}, {MAX_LEVEL:g}] "
                   "(fractions of the prompt)")  # fmt: skip
    loss = _table(data, "loss", None, len(levels), -MAX_COST, f"must be within +-{MAX_COST:,.0f} (a loss increase, "
                  "nats per token)")  # fmt: skip
    checked = {**data, "levels": [float(x) for x in levels], "loss": loss}
    if "stderr" in data:
        rule = f"must be in [0, {MAX_COST:,.0f}] (a standard error over documents, nats per token)"
        checked["stderr"] = _table(data, "stderr", len(loss), len(levels), 0.0, rule)
    return checked


# ---- reading a profile ------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _read(name: str, path: str, stamp: tuple | None) -> dict:
    """The checked profile ``name`` at ``path`` (``stamp``: its modification, for the cache)."""
    raw = read_bytes(path, "profile", MAX_PROFILE_BYTES, what=WRITTEN_BY)
    try:
        data = json.loads(raw)
    except ValueError:
        raise squeezekit.ConfigError(
            "profile", name, "is not JSON; write one with squeezekit calibrate --out FILE"
        ) from None
    except RecursionError:  # valid JSON nested deeper than Python's parser goes: no profile is
        data = None
    try:
        return check_profile(data)
    except _Bad as bad:
        raise squeezekit.ConfigError("profile", name, str(bad)) from None


def load_profile(name: str) -> dict:
    """The profile ``name`` names (a file or ``bundled:...``), checked, cached while the file is unchanged;
    `ConfigError` if it is missing, unreadable or malformed."""
    path = profile_path(name)
    try:
        st = os.stat(path)
        stamp: tuple | None = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        stamp = None  # `read_bytes` says what is wrong
    return _read(name, str(path), stamp)


@dataclass
class Calibrated(squeezekit.LayerBudgetAllocator):
    """Budgets from each layer's measured loss increase under eviction (a `squeezekit calibrate` profile)."""

    name = "calibrated"
    #: a JSON profile written by `squeezekit calibrate --out FILE`, or a bundled one, bundled:smollm2/EVICTOR (the
    #: embedded SmolLM2 with h2o, sliding_window, snapkv or streaming at its defaults)
    profile: str = field(default="", metadata={"metavar": "FILE"})
    #: "sqrt" (budgets ~ square root of each layer's cost at the mean budget) or "greedy" (token by token)
    rule: Literal["sqrt", "greedy"] = "sqrt"

    def __post_init__(self):
        squeezekit.check(
            "profile", self.profile, bool(self.profile), "required: a file written by squeezekit calibrate --out FILE"
        )
        squeezekit.check("rule", self.rule, self.rule in ("sqrt", "greedy"), "must be 'sqrt' or 'greedy'")
        load_profile(self.profile)

    def prepare(self, model, evictor):
        from squeezekit.architectures import resolve

        data = load_profile(self.profile)
        made_for = f"made for model {describe(data['model'])} with evictor {describe(data['evictor'])}"
        this = f"not model {describe(model_identity(model))}" if data["model"] != model_identity(model) else None
        if this is None and data["evictor"] != evictor_identity(evictor):
            this = f"not evictor {describe(evictor_identity(evictor))}"
        if this:
            raise squeezekit.ConfigError(
                "profile", self.profile, f"{made_for}, {this}; calibrate this combination with squeezekit calibrate"
            )
        layers = len(resolve(model).compressible)
        if len(data["loss"]) != layers:  # (a hand-made profile: calibrate measures every compressible layer)
            raise squeezekit.ConfigError(
                "profile", self.profile, f"has the costs of {len(data['loss'])} layers, the model {layers} "
                "compressible layers; calibrate this model with squeezekit calibrate"
            )  # fmt: skip

    def allocate(self, request):
        import torch

        data = load_profile(self.profile)
        loss = torch.tensor(data["loss"], dtype=torch.float64)  # (L, K): loss increase per token at each level
        if loss.shape[0] != request.importance.shape[1]:
            raise ValueError(f"the profile has {loss.shape[0]} layers, the model {request.importance.shape[1]}")
        levels = torch.tensor(data["levels"], dtype=torch.float64)
        if self.rule == "greedy":
            knots = torch.round(levels.view(1, -1) * request.cap.double().view(-1, 1)).long()
            return waterfill(
                loss.expand(request.total.shape[0], -1, -1), knots, request.total, request.floor, request.cap
            )
        # The model: a layer keeping a share f of the prompt loses a (1/f - 1); least squares a, fitted to the cost
        # plus its standard error (a layer the calibration cannot tell from a costly one is not starved).
        g = 1 / levels - 1
        sure = loss + (torch.tensor(data["stderr"], dtype=torch.float64) if "stderr" in data else 0.0)
        a = (sure * g).sum(1) / (g * g).sum()
        return sqrt_split(a.expand(request.total.shape[0], -1), request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(Calibrated)
