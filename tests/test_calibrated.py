"""The ``calibrated`` allocator, `squeezekit.budget.waterfill` and ``squeezekit calibrate``, tested by behaviour.

Profiles for the property tests are written by hand; the command is run end to end on a tiny random model (seconds).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled

import squeezekit
from squeezekit import AllocationRequest, Config, ConfigError
from squeezekit.budget import check_budgets, waterfill_row
from squeezekit.cli import main
from squeezekit.models import load_model

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMAT = "squeezekit-calibration-profile/1"
_DIR = tempfile.TemporaryDirectory(prefix="sk-profiles-")
_N = itertools.count()


def write_profile(loss, levels, model=None, evictor=None, path=None, stderr=None) -> str:
    """A profile file as `squeezekit calibrate` writes it (only the keys the allocator reads, plus identities)."""
    path = path or str(Path(_DIR.name) / f"p{next(_N)}.json")
    data = {
        "format": FORMAT,
        "model": model or {"name": "m"},
        "evictor": evictor or {"name": "streaming", "sinks": 4, "window": 8},
        "levels": [float(x) for x in levels],
        "loss": [[float(x) for x in row] for row in loss],
    }
    if stderr is not None:
        data["stderr"] = [[float(x) for x in row] for row in stderr]
    Path(path).write_text(json.dumps(data))
    return path


def calibrated(loss, levels=(0.05, 0.1, 0.2, 0.4), rule="sqrt"):
    return squeezekit.registry().get("allocator", "calibrated").cls(profile=write_profile(loss, levels), rule=rule)


def request(total, floor, cap, L) -> AllocationRequest:
    B = len(total)
    return AllocationRequest(
        importance=torch.zeros(B, L), total=torch.tensor(total), floor=floor, cap=torch.tensor(cap)
    )


def assert_contract(budgets, req) -> None:
    assert budgets.dtype == torch.long
    assert check_budgets(budgets, req.total, req.floor, req.cap, tuple(req.importance.shape)) is None


@st.composite
def cases(draw, max_layers=32):
    """(loss (L, K), levels (K,), request): a random profile and a feasible request of 1-3 sequences."""
    L = draw(st.integers(1, max_layers))
    levels = sorted(draw(st.sets(st.floats(0.01, 0.95), min_size=1, max_size=5)))
    loss = draw(
        st.lists(st.lists(st.floats(-0.05, 3.0), min_size=len(levels), max_size=len(levels)), min_size=L, max_size=L)
    )
    floor = draw(st.integers(1, 30))
    caps, totals = [], []
    for _ in range(draw(st.integers(1, 3))):
        caps.append(draw(st.integers(floor, 3000)))
        totals.append(draw(st.integers(floor * L, caps[-1] * L)))
    return loss, levels, request(totals, floor, caps, L)


# ---- the allocator ---------------------------------------------------------------------------------------------


RULES = ["sqrt", "greedy"]


@pytest.mark.parametrize("rule", RULES)
@SETTINGS
@given(case=cases())
def test_contract_exact_total_floor_cap_and_determinism(rule, case):
    loss, levels, req = case
    budgets = calibrated(loss, levels, rule).allocate(req)
    assert_contract(budgets, req)
    assert torch.equal(calibrated(loss, levels, rule).allocate(req), budgets)  # a fresh instance, a fresh file: same


@pytest.mark.parametrize("rule", RULES)
@settings(max_examples=30, deadline=None)
@given(case=cases(max_layers=12))
def test_rows_are_independent(rule, case):
    loss, levels, req = case
    alloc = calibrated(loss, levels, rule)
    both = alloc.allocate(req)
    for b in range(req.total.shape[0]):
        one = request(req.total[b : b + 1].tolist(), req.floor, req.cap[b : b + 1].tolist(), req.importance.shape[1])
        assert torch.equal(alloc.allocate(one)[0], both[b])


@pytest.mark.parametrize("rule", RULES)
@SETTINGS
@given(L=st.integers(1, 32), curve=st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4), data=st.data())
def test_equal_curves_split_like_uniform(rule, L, curve, data):
    """Every layer measured alike (a flat profile included): the split is uniform, to one token."""
    floor = data.draw(st.integers(1, 20))
    cap = data.draw(st.integers(floor, 2000))
    total = data.draw(st.integers(floor * L, cap * L))
    budgets = calibrated([curve] * L, rule=rule).allocate(request([total], floor, [cap], L))[0]
    assert int(budgets.max() - budgets.min()) <= 1


@pytest.mark.parametrize("rule", RULES)
@SETTINGS
@given(scales=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=16), data=st.data())
def test_a_costlier_layer_never_gets_fewer_tokens(rule, scales, data):
    """Curves of one shape scaled per layer: the layer that loses more at every level keeps at least as much."""
    shape = [1.0, 0.6, 0.25, 0.05]
    L = len(scales)
    floor = data.draw(st.integers(1, 20))
    cap = data.draw(st.integers(floor, 2000))
    total = data.draw(st.integers(floor * L, cap * L))
    budgets = calibrated([[s * v for v in shape] for s in scales], rule=rule).allocate(
        request([total], floor, [cap], L)
    )[0]
    for i, j in itertools.permutations(range(L), 2):
        if scales[i] > scales[j]:
            assert budgets[i] >= budgets[j]


@pytest.mark.parametrize("rule", RULES)
def test_a_layer_costlier_by_a_rounding_error_still_gets_the_spare_token(rule):
    """Slopes equal to 1e-16 share their tokens evenly; the one token left over goes to the costlier layer
    (found by hypothesis: scales 9.999999999999998 and 10.0, floor 1, cap 2, 17 tokens over 16 layers)."""
    scales = [1.0] * 14 + [9.999999999999998, 10.0]
    budgets = calibrated([[s * v for v in (1.0, 0.6, 0.25, 0.05)] for s in scales], rule=rule).allocate(
        request([17], 1, [2], 16)
    )[0]
    assert budgets.tolist() == [1] * 15 + [2]


def test_sqrt_budgets_follow_the_square_root_of_each_layers_fitted_cost():
    """Curves of the form a (1/f - 1) with a = 4, 1, 0, 0.25: budgets in the ratio 2 : 1 : 0 : 0.5 at every budget
    (the cost-free layer keeps the floor, taken from the others)."""
    a = [4.0, 1.0, 0.0, 0.25]
    levels = (0.1, 0.2, 0.5)
    loss = [[x * (1 / f - 1) for f in levels] for x in a]
    assert calibrated(loss, levels).allocate(request([700], 1, [875], 4))[0].tolist() == [400, 200, 1, 99]
    assert calibrated(loss, levels).allocate(request([525], 1, [875], 4))[0].tolist() == [300, 150, 1, 74]
    noisy = [[x * (1 / f - 1) + e for f, e in zip(levels, (0.0, 0.01, -0.02), strict=True)] for x in a]
    got = calibrated(noisy, levels).allocate(request([700], 1, [875], 4))[0]  # measurement noise moves little
    assert (got - torch.tensor([400, 200, 1, 99])).abs().max() <= 3


def test_a_layer_the_calibration_cannot_clear_is_not_starved():
    """Layers 1 and 2 measured alike, layer 2 only on average (its documents disagreed): layer 2 keeps more than 1."""
    levels = (0.1, 0.2, 0.5)
    loss = [[4 * (1 / f - 1) for f in levels], [0.01, 0.0, 0.0], [0.01, 0.0, 0.0]]
    stderr = [[0.0] * 3, [0.0] * 3, [0.5, 0.3, 0.1]]
    path = write_profile(loss, levels, stderr=stderr)
    budgets = (
        squeezekit.registry().get("allocator", "calibrated").cls(profile=path).allocate(request([300], 4, [500], 3))[0]
    )
    assert budgets[2] > 2 * budgets[1] and int(budgets.sum()) == 300


def test_greedy_tokens_go_where_they_save_the_most():
    """Layer 0 loses a lot below a quarter of the prompt, layer 1 little, layer 2 nothing: 0 fills first."""
    loss = [[2.0, 1.5, 1.0, 0.5], [0.2, 0.15, 0.1, 0.05], [0.0, 0.0, 0.0, 0.0]]
    # per token saved: layer 0 0.01 up to 100 tokens, 0.005 to 200, 0.0025 to 400, 0.0008 beyond; layer 1 a tenth
    budgets = calibrated(loss, rule="greedy").allocate(request([900], 10, [1000], 3))[0].tolist()
    assert budgets == [790, 100, 10]  # 0 to 400, then 1 to 100, then the rest to 0


def test_waterfill_is_the_greedy_optimum_on_convex_curves():
    """On convex curves the greedy split costs no more than any other split of the same total
    (checked by brute force)."""
    rng = np.random.default_rng(0)
    knots = np.array([2, 4, 6, 8])
    for _ in range(20):
        steps = np.sort(rng.uniform(0, 1, (3, 5)), axis=1)[:, ::-1]  # decreasing gains: convex, decreasing cost
        costs = np.cumsum(steps[:, ::-1], axis=1)[:, ::-1][:, 1:]  # cost at 2, 4, 6, 8 tokens; 0 at the cap 10
        full = np.concatenate([costs, np.zeros((3, 1))], axis=1)

        def cost(b, full=full):
            return sum(np.interp(b[i], np.concatenate([knots, [10]]), full[i]) for i in range(3))

        got = waterfill_row(costs, knots, 15, 2, 10)
        best = min(cost(b) for b in itertools.product(range(2, 11), repeat=3) if sum(b) == 15)
        assert got.sum() == 15 and cost(got) <= best + 1e-9


# ---- the profile: round trip and mismatches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from squeezekit.evaluators.testing import make_tiny_model, standin_text

    root = tmp_path_factory.mktemp("calibrate")
    model_dir = make_tiny_model(root / "tiny", layers=3)
    text = root / "text.txt"
    text.write_text(standin_text(8000))
    return root, model_dir, text


@pytest.fixture(scope="module")
def calibrate_run(tiny):
    """One `squeezekit calibrate` run on the tiny model (the command end to end: a few seconds), with stderr not a
    terminal: (the profile, what it printed on stdout, on stderr)."""
    import contextlib
    import io

    root, model_dir, text = tiny
    out = root / "profile.json"
    argv = [
        "calibrate",
        "--model",
        str(model_dir),
        "--text",
        str(text),
        "--out",
        str(out),
        "--evictor",
        "streaming",
        "--set",
        "sinks=2",
        "--documents",
        "2",
        "--prompt-tokens",
        "96",
        "--scored-tokens",
        "32",
        "--levels",
        "0.2,0.5",
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.delenv("SQUEEZEKIT_PROGRESS", raising=False)
        assert main(argv) == 0
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def profile(calibrate_run):
    return calibrate_run[0]


def test_calibrate_reports_its_progress_off_a_terminal(calibrate_run):
    """Off a terminal: a line as the model loads, progress lines counted in forwards (2 documents x (the reference and
    2 levels) x (a prefill and 2 chunks of 16 scored tokens)), the last one at 100 %; no tqdm bar (no carriage
    return) and no transformers loading bar; counts in words."""
    _, out, err = calibrate_run
    lines = err.splitlines()
    assert "\r" not in err and "Loading" not in err
    assert lines[0] == "squeezekit: loading the model tiny on cpu (float32) ..."
    assert lines[1].startswith("squeezekit: calibrate 0/18 forwards (0%), ")
    assert lines[-1].startswith("squeezekit: calibrate 18/18 forwards (100%), ")
    assert lines[-1].endswith(" elapsed: document 2/2, level 0.5")
    assert all(line.startswith("squeezekit: calibrate ") for line in lines[1:])
    assert ", 2 documents of " in out and "the 3 costliest layers at level 0.2: " in out


def test_calibrate_writes_a_profile_of_every_layer_and_level(profile, capsys):
    data = json.loads(profile.read_text())
    assert data["model"]["name"] == "tiny" and data["model"]["num_hidden_layers"] == 3
    assert data["evictor"] == {"name": "streaming", "sinks": 2, "window": 8}
    assert data["levels"] == [0.2, 0.5] and data["layers"] == [0, 1, 2]
    assert np.isfinite(np.array(data["loss"])).all() and np.array(data["loss"]).shape == (3, 2)
    assert data["measured"]["documents"] == 2 and data["measured"]["prompt_tokens"] == 96


def test_profile_round_trip_through_every_config_surface(profile, tiny, tmp_path):
    from squeezekit.cli_options import add_config_flags, config_from_args

    root, model_dir, _ = tiny
    keys = {"allocator": "calibrated", "profile": str(profile), "evictor": "streaming", "sinks": 2, "budget": 0.3}
    configs = [Config.from_kwargs(**keys), Config.from_string(",".join(f"{k}={v}" for k, v in keys.items()))]
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {v}\n" for k, v in keys.items()))
    configs.append(Config.from_file(tmp_path / "run.yaml"))
    import argparse

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    argv = [
        "--allocator",
        "calibrated",
        "--set",
        f"profile={profile}",
        "--evictor",
        "streaming",
        "--sinks",
        "2",
        "--budget",
        "0.3",
    ]
    configs.append(config_from_args(parser.parse_args(argv)))
    assert all(c == configs[0] for c in configs)

    model, tok = load_model(model_dir)
    ids = tok(["the king said unto them " * 20], return_tensors="pt")
    with squeezekit.compress(model, configs[0]) as c:
        model(**ids, use_cache=True)
        s = c.summary()
    n = int(s["prompt_len"][0])
    assert int(s["budgets"][0].sum()) == round(0.3 * n * 3) and int(s["budgets"][0].min()) >= 10


def test_lm_eval_model_args_reach_the_profile(profile):
    pytest.importorskip("lm_eval")
    from squeezekit.evaluators.lm_eval_adapter import split_model_args

    config, hf = split_model_args(
        {"allocator": "calibrated", "profile": str(profile), "evictor": "streaming", "sinks": "2", "batch_size": 2}
    )
    assert config.build_allocator().profile == str(profile) and hf == {"batch_size": 2}


def one_line_config_error(fn) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_profile_for_another_evictor_or_model_is_a_one_line_error(profile, tiny, tmp_path):
    _, model_dir, _ = tiny
    model, _ = load_model(model_dir)
    other_evictor = Config.from_kwargs(allocator="calibrated", profile=str(profile), evictor="h2o")
    message = one_line_config_error(lambda: squeezekit.compress(model, other_evictor).__enter__())
    assert "made for model tiny(" in message and "not evictor h2o(" in message
    other_params = Config.from_kwargs(allocator="calibrated", profile=str(profile), evictor="streaming", sinks=4)
    assert "not evictor streaming(sinks=4" in one_line_config_error(
        lambda: squeezekit.compress(model, other_params).__enter__()
    )

    from squeezekit.evaluators.testing import make_tiny_model

    bigger, _ = load_model(make_tiny_model(tmp_path / "tiny", layers=4))
    config = Config.from_kwargs(allocator="calibrated", profile=str(profile), evictor="streaming", sinks=2)
    message = one_line_config_error(lambda: squeezekit.compress(bigger, config).__enter__())
    assert "made for model tiny(model_type=llama, num_hidden_layers=3" in message and "num_hidden_layers=4" in message
    from squeezekit.transformers_api import attn_implementation

    assert attn_implementation(bigger) == "sdpa"  # nothing was installed: no attention switch, no hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bigger.modules())


def test_missing_or_malformed_profile_is_a_one_line_error(tmp_path):
    assert "no such file" in one_line_config_error(
        lambda: Config.from_kwargs(allocator="calibrated", profile=str(tmp_path / "nope.json"))
    )
    assert "required" in one_line_config_error(lambda: Config.from_kwargs(allocator="calibrated"))
    assert "must be 'sqrt' or 'greedy'" in one_line_config_error(
        lambda: Config.from_kwargs(allocator="calibrated", profile=write_profile([[1.0]], [0.5]), rule="fast")
    )
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not JSON" in one_line_config_error(
        lambda: Config.from_string(f"allocator=calibrated,profile={tmp_path / 'bad.json'}")
    )
    (tmp_path / "other.json").write_text(json.dumps({"format": "other/1", "levels": [0.2, 0.5], "loss": [[1, 2]]}))
    assert "not a calibration profile" in one_line_config_error(
        lambda: Config.from_kwargs(allocator="calibrated", profile=str(tmp_path / "other.json"))
    )


# ---- malformed profiles ------------------------------------------------------------------------------------------
#: JSON values a broken or hand-edited profile may hold where a number belongs
ODD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 1e6, -1e6, 1.0000001e6, 1e-300, -0.0, 10**400, -(10**30), 0, 1]),
    st.integers(),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(0, 1), max_size=2),
)


@st.composite
def malformed_profiles(draw):
    """A profile as `squeezekit calibrate` writes it, then broken in a few ways: numbers replaced by odd values,
    keys dropped or replaced, rows cut or lengthened, levels reordered. Some come out still valid."""
    L, K = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    levels = sorted(draw(st.sets(st.floats(0.01, 0.95), min_size=K, max_size=K)))
    number = st.floats(-0.05, 3.0)
    data = {
        "format": FORMAT,
        "model": {"name": "m"},
        "evictor": {"name": "streaming", "sinks": 4, "window": 8},
        "levels": levels,
        "loss": [[draw(number) for _ in range(K)] for _ in range(L)],
        "stderr": [[draw(st.floats(0, 0.5)) for _ in range(K)] for _ in range(L)],
    }
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["number", "number", "number", "key", "drop", "row", "reverse"]))
        key = draw(st.sampled_from(["format", "model", "evictor", "levels", "loss", "stderr"]))
        if how == "number" and key in ("loss", "stderr") and isinstance(data.get(key), list) and data[key]:
            row = draw(st.integers(0, len(data[key]) - 1))
            if isinstance(data[key][row], list) and data[key][row]:
                data[key][row][draw(st.integers(0, len(data[key][row]) - 1))] = draw(ODD)
        elif how == "number" and key == "levels" and isinstance(data.get(key), list) and data[key]:
            data[key][draw(st.integers(0, len(data[key]) - 1))] = draw(ODD)
        elif how == "key":
            data[key] = draw(st.one_of(ODD, st.just([]), st.just({}), st.just([[0.1]])))
        elif how == "drop":
            data.pop(key, None)
        elif how == "row" and isinstance(data.get(key), list) and data[key]:
            data[key] = data[key][:-1] if draw(st.booleans()) else [*data[key], data[key][-1]]
        elif how == "reverse" and isinstance(data.get("levels"), list):
            data["levels"] = data["levels"][::-1]
    return data


@pytest.mark.parametrize("rule", RULES)
@SETTINGS
@given(data=malformed_profiles(), floor=st.integers(1, 8), cap=st.integers(8, 3000), share=st.floats(0, 1))
def test_a_malformed_profile_is_refused_with_a_catalogue_message_or_gives_valid_budgets(rule, data, floor, cap, share):
    """Whatever a profile holds, reading it either refuses it with one of docs/errors.md's messages, or accepts it,
    and then the allocator's budgets keep the contract (exact total, floor, cap) at any budget."""
    from test_errors import documented

    path = Path(_DIR.name) / f"p{next(_N)}.json"
    path.write_text(json.dumps(data))  # (Python's json writes NaN and Infinity, as a NaN measurement would be)
    try:
        config = Config.from_mapping({"allocator": "calibrated", "profile": str(path), "rule": rule}, source="test")
    except squeezekit.SqueezekitError as error:
        assert documented(error) and "\n" not in str(error), str(error)
        event("refused")
        return
    event("accepted")
    allocator = config.build_allocator()
    L = len(data["loss"])
    total = L * floor + round(share * L * (cap - floor))
    req = request([total], floor, [cap], L)
    assert_contract(allocator.allocate(req), req)


# ---- bundled profiles --------------------------------------------------------------------------------------------
#: one bundled profile per bundled evictor
#: the evictors squeezekit ships a SmolLM2 profile for (those of the H200 allocator study, docs/results/README.md);
#: the evictors bundled since (tova, chunkkv, knorm, keydiff, random) have none yet
EVICTORS = ["h2o", "sliding_window", "snapkv", "streaming"]


def test_bundled_profiles_are_for_the_embedded_model_and_each_evictor_at_its_defaults():
    """``profile=bundled:smollm2/E`` serves the embedded SmolLM2 with evictor E at its default parameters: the
    identities the allocator checks when a compress() block starts."""
    from types import SimpleNamespace

    from squeezekit.plugins.calibrated import bundled_profiles, evictor_identity, load_profile, model_identity
    from transformers import AutoConfig

    from squeezekit.models import default_model_dir

    assert bundled_profiles() == [f"bundled:smollm2/{e}" for e in EVICTORS]
    assert set(EVICTORS) <= set(bundled("evictor"))
    smollm2 = model_identity(SimpleNamespace(config=AutoConfig.from_pretrained(default_model_dir())))
    for evictor in EVICTORS:
        config = Config.from_kwargs(allocator="calibrated", profile=f"bundled:smollm2/{evictor}", evictor=evictor)
        data = load_profile(config.build_allocator().profile)
        assert data["model"] == smollm2 and data["evictor"] == evictor_identity(config.build_evictor())
        assert len(data["loss"]) == smollm2["num_hidden_layers"]


def test_a_wheel_ships_the_bundled_profiles_and_they_serve_outside_the_checkout(tmp_path, build_wheel):
    """A wheel built from the tree holds the profiles as package data, and, unpacked as site-packages, names them
    from a process whose working directory is not the checkout (nothing is read from docs/ or the tree)."""
    import zipfile

    wheel = build_wheel()
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"squeezekit/plugins/profiles/smollm2/{e}.json" for e in EVICTORS} <= names
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    code = (
        "import squeezekit.plugins.calibrated as c\n"
        "from squeezekit import Config\n"
        "config = Config.from_mapping({'allocator': 'calibrated', 'profile': 'bundled:smollm2/snapkv', "
        "'evictor': 'snapkv'})\n"
        "print(c.profile_path(config.build_allocator().profile))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{site / 'squeezekit' / 'plugins' / 'profiles' / 'smollm2' / 'snapkv.json'}\n"


# ---- the command's bad inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--text", "/nonexistent/text.txt"], "--text = '/nonexistent/text.txt': no such file"),
        (["--text", "{fifo}"], "is not a regular file (a FIFO, socket or device)"),  # (reading it blocked)
        (["--text", "/dev/zero"], "is not a regular file (a FIFO, socket or device)"),  # (reading it never ended)
        (["--text", "{empty}"], "is empty"),
        (["--evictor", "h2x"], "unknown evictor"),
        (["--out", "{afile}/p.json"], "p.json': cannot be written: Not a directory"),
        (["--out", "/proc/p.json"], "--out = '/proc/p.json': cannot be written"),
        (["--levels", "0.1,1.5"], "--levels"),
        (["--set", "sinks"], "expected KEY=VALUE"),
        (["--documents", "0"], "argument --documents: invalid integer >= 1 value: '0'"),
        (["--documents", "9" * 30], "argument --documents: at most 10000 documents"),  # (allocating never ended)
        (["--device", "bogus"], "--device = 'bogus': expected cpu, cuda or cuda:N"),
        (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ],
)
def test_calibrate_bad_inputs_are_one_line_errors_before_the_model_loads(argv, expected, tiny, capsys, monkeypatch):
    import squeezekit.models

    root, model_dir, text = tiny
    (root / "empty.txt").write_text("  \n")
    (root / "afile").write_text("")
    if not (root / "fifo").exists():
        os.mkfifo(root / "fifo")
    names = {"{empty}": str(root / "empty.txt"), "{fifo}": str(root / "fifo"), "{afile}": str(root / "afile")}
    argv = [functools.reduce(lambda a, kv: a.replace(*kv), names.items(), a) for a in argv]

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(squeezekit.models, "load_model", load_model)
    base = ["calibrate", "--model", str(model_dir), "--text", str(text), "--out", str(root / "x.json")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("squeezekit: ") and expected in err, err
    assert not (root / "x.json").exists()


def test_calibrate_help_lists_the_evictor_alone_and_every_default(capsys):
    """A profile depends on the evictor and its parameters only: no allocator, budget or fallback flags; every option
    shows its default (or says it has none) and a metavar saying what it takes."""
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--allocator",
        "--budget",
        "--fallback-allocator",
        "--fallback-evictor",
        "--profile",
        "--rule",
        "--p X",
    ):
        assert flag not in text, flag
    for shown in ("--evictor NAME", "--window N", "--sinks N", "--heavy-ratio X", "--kernel-size N",
                  "--pooling {max,avg}", "--set KEY=VALUE", "--config FILE"):  # fmt: skip
        assert shown in text, shown
    defaults = {
        "--model DIR": "default: the embedded SmolLM2-135M-Instruct",
        "--text FILE": "default: the reST sources",
        "--out FILE": "(default: profile.json)",
        "--levels F,F,...": "(default: 0.05,0.1,0.2,0.4)",
        "--documents N": "(default: 4)",
        "--prompt-tokens N": "(default: 512)",
        "--scored-tokens N": "(default: 128)",
        "--extend-chunk N": "(default: 16)",
        "--batch-size N": "(default: 0, one per layer)",
        "--device DEVICE": "(default: cuda when there is one)",
        "--dtype {bfloat16,float16,float32}": "(default: float32",
        "--threads N": "(default: torch's own)",
        "--evictor NAME": "(default: streaming)",
    }
    for option, default in defaults.items():
        after = text.partition(f" {option} ")[2]
        assert after and default in after.split(" --")[0], (option, after[:200])


def test_calibrate_on_a_missing_cuda_device_is_a_one_line_error(tiny, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root, model_dir, text = tiny
    assert main(["calibrate", "--model", str(model_dir), "--text", str(text), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "squeezekit: --device cuda: no CUDA device is available here; use --device cpu\n"


# ---- the sweep -------------------------------------------------------------------------------------------------------


def test_sweep_reaches_the_profile_of_each_evictor_and_compares_with_uniform(profile, tiny, tmp_path):
    """``--set profile=DIR/{evictor}.json`` goes to the calibrated cells only (uniform has no such key), one profile per
    evictor; the report compares calibrated with uniform at equal budgets and at 0.7x a budget."""
    pytest.importorskip("lm_eval")
    root, model_dir, text = tiny
    (tmp_path / "streaming.json").write_text(profile.read_text())
    out = tmp_path / "results"
    argv = [
        "eval",
        "--sweep",
        "--model",
        str(model_dir),
        "--text-file",
        str(text),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--suite",
        "squeezekit_ppl@256:2",
        "--allocators",
        "uniform,calibrated",
        "--evictors",
        "streaming",
        "--budgets",
        "0.35,0.5",
        "--sinks",
        "2",
        "--set",
        f"profile={tmp_path}/{{evictor}}.json",
    ]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    profile_of = f"profile={tmp_path}/streaming.json"
    keys = {
        "uniform+streaming@0.35/sinks=2",
        "uniform+streaming@0.5/sinks=2",
        f"calibrated+streaming@0.35/{profile_of}/sinks=2",
        f"calibrated+streaming@0.5/{profile_of}/sinks=2",
    }
    assert set(data["cells"]) == keys
    assert all(Config.from_label(k).label == k for k in keys)  # a path in a label round-trips
    table = (out / "results.md").read_text()
    assert f"| calibrated ({profile_of}) | streaming (sinks=2) | 0.35 | 0.5 |" in table  # 0.7x a budget


@pytest.mark.slow
def test_smollm2_calibrate_and_use_the_profile(tmp_path, capsys):
    """The command on the real model (one short document, one level: seconds to a minute on CPU): a profile of its 30
    layers that serves SmolLM2 with that evictor, and names SmolLM2 when used with another."""
    from test_smollm2 import english_text

    text = tmp_path / "text.txt"
    text.write_text(english_text(20000))
    out = tmp_path / "smollm2-streaming.json"
    argv = [
        "calibrate",
        "--text",
        str(text),
        "--out",
        str(out),
        "--documents",
        "1",
        "--levels",
        "0.1",
        "--prompt-tokens",
        "128",
        "--scored-tokens",
        "32",
    ]
    assert main(argv) == 0
    assert ", 1 document of " in capsys.readouterr().out  # (not "1 documents")
    data = json.loads(out.read_text())
    assert data["model"]["name"] == "SmolLM2-135M-Instruct" and len(data["loss"]) == 30
    model, tok = squeezekit.load_default_model()
    ids = tok([english_text(3000)], return_tensors="pt")["input_ids"][:, :400]
    with squeezekit.compress(model, allocator="calibrated", profile=str(out), budget=0.2) as c:
        model(input_ids=ids, use_cache=True)
        assert int(c.summary()["budgets"][0].sum()) == round(0.2 * 400 * 30)
    other = Config.from_kwargs(allocator="calibrated", profile=str(out), evictor="snapkv")
    assert "made for model SmolLM2-135M-Instruct(" in one_line_config_error(
        lambda: squeezekit.compress(model, other).__enter__()
    )


# ---- one prefill for all the probes of a document ----------------------------------------------------------------
@pytest.mark.parametrize("evictor", ["streaming", "h2o", "snapkv"])
def test_a_branched_prefill_is_a_batch_of_identical_rows(evictor):
    """`squeezekit calibrate` prefills a document once and branches the cache into one copy per probe
    (`SqueezeCache.branch`): budgets, kept slots and every later logit equal those of the same rows prefilled as a
    batch, bit for bit, whatever statistics the evictor collects (accumulated attention, window queries)."""
    import torch
    from squeezekit.evaluators.calibrate import _probe_class
    from tiny_models import tiny_model

    from squeezekit.transformers_api import output_cache

    model = tiny_model("llama")
    doc = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(0))
    rows = doc.expand(4, -1)
    config = Config.from_mapping({"allocator": "uniform", "evictor": evictor, "budget": 0.8125}, source="test")

    def run(branches):
        with torch.no_grad(), squeezekit.compress(model, config) as c:
            c.runner.use("allocator", _probe_class()(layers=(0, 1, 2, 3)))
            cache = c.new_cache(branches=branches)
            first = rows[:1] if branches > 1 else rows
            out = model(input_ids=first[:, :64], use_cache=True, logits_to_keep=1, **c.cache_kwargs(cache))
            cache, logits = output_cache(out), []
            for k in range(64, 95, 8):
                out = model(input_ids=rows[:, k : k + 8], use_cache=True, **c.cache_kwargs(cache))
                cache = output_cache(out)
                logits.append(out.logits)
        return torch.cat(logits, 1), cache

    batched, a = run(1)
    branched, b = run(4)
    assert torch.equal(a.budgets, b.budgets) and not torch.equal(a.budgets[0], a.budgets[1])  # probes differ
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.valid, y.valid) and torch.equal(x.positions, y.positions)
    assert torch.equal(batched, branched)


def test_greedy_splits_evenly_when_a_curve_breaks_into_collinear_segments():
    """Found by hypothesis: equal curves whose first two segments are collinear up to rounding split into two
    segments per layer; the tokens of equally good segments go evenly over the layers, not to the first layer's."""
    from squeezekit.budget import waterfill_row

    costs = np.array([[2.875, 0.5, 0.0, 0.0]] * 3)
    budgets = waterfill_row(costs, np.array([72, 145, 289, 578]), 5, 1, 1446)
    assert sorted(budgets.tolist()) == [1, 2, 2] and int(budgets.sum()) == 5
