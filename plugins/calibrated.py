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
"""

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import squeezekit
from squeezekit.budget import sqrt_split, waterfill

FORMAT = "squeezekit-calibration-profile/1"
ARCH_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


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


@functools.lru_cache(maxsize=16)
def _read(path: str, stamp: tuple) -> dict:
    import torch  # (here: listing plugins imports no torch)

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise squeezekit.ConfigError(
            "profile", path, f"cannot be read ({exc.strerror or exc}); write one with squeezekit calibrate --out FILE"
        ) from None
    except ValueError:
        raise squeezekit.ConfigError(
            "profile", path, "is not JSON; write one with squeezekit calibrate --out FILE"
        ) from None
    ok = isinstance(data, dict) and data.get("format") == FORMAT
    try:
        levels, loss = (
            torch.tensor(data["levels"], dtype=torch.float64),
            torch.tensor(data["loss"], dtype=torch.float64),
        )
        ok = ok and levels.dim() == 1 and loss.dim() == 2 and loss.shape[1] == levels.numel() > 0
        ok = ok and tuple(torch.tensor(data.get("stderr", data["loss"]), dtype=torch.float64).shape) == tuple(
            loss.shape
        )
        ok = (
            ok
            and bool((levels > 0).all() and (levels < 1).all() and (levels.diff() > 0).all())
            and bool(loss.isfinite().all())
        )
    except (KeyError, TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise squeezekit.ConfigError(
            "profile", path, f"is not a calibration profile ({FORMAT}) written by squeezekit calibrate"
        )
    return data


def load_profile(path: str) -> dict:
    """The profile at ``path`` (cached while the file is unchanged); `ConfigError` if missing or malformed."""
    try:
        st = os.stat(path)
    except OSError:
        raise squeezekit.ConfigError(
            "profile", path, "no such file; write one with squeezekit calibrate --out FILE"
        ) from None
    return _read(str(path), (st.st_mtime_ns, st.st_size, st.st_ino))


@dataclass
class Calibrated(squeezekit.LayerBudgetAllocator):
    """Budgets from each layer's measured loss increase under eviction (a `squeezekit calibrate` profile)."""

    name = "calibrated"
    #: the JSON profile written by `squeezekit calibrate --out FILE`
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
        data = load_profile(self.profile)
        made_for = f"made for model {describe(data['model'])} with evictor {describe(data['evictor'])}"
        this = f"not model {describe(model_identity(model))}" if data["model"] != model_identity(model) else None
        if this is None and data["evictor"] != evictor_identity(evictor):
            this = f"not evictor {describe(evictor_identity(evictor))}"
        if this:
            raise squeezekit.ConfigError(
                "profile", self.profile, f"{made_for}, {this}; calibrate this combination with squeezekit calibrate"
            )

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
        sure = loss + torch.tensor(data.get("stderr", torch.zeros_like(loss).tolist()), dtype=torch.float64)
        a = (sure * g).sum(1) / (g * g).sum()
        return sqrt_split(a.expand(request.total.shape[0], -1), request.total, request.floor, request.cap)


@squeezekit.hookimpl
def register_allocators(register):
    register(Calibrated)
