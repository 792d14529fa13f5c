"""The evaluation results store (evaluators/results.py) and its plot (evaluators/reports.py): any damaged store is
refused in one documented line or read whole, never half used; a cell computed with a file that has changed since (a
calibration profile rewritten at the same path) runs again; nothing of the plot is cut off."""

from __future__ import annotations

import copy
import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_factory import bundled
from squeezekit.evaluators import reports
from squeezekit.evaluators.results import ResultStore, cell_key
from squeezekit.evaluators.suite import Unit
from test_errors import ROWS, template_regex

from squeezekit import Config, SqueezekitError

IDENTITY = {"model": "tiny", "batch_size": 2, "device": "cpu", "dtype": "float32"}
UNITS = [Unit("squeezekit_ppl", 256, 2), Unit("niah_single_1", 512, 2)]


def _result(value: float) -> dict:
    return {"metric": "accuracy", "value": value, "stderr": 0.1, "n": 2, "scores": [value, value], "seconds": 0.1,
            "kv_fraction": 0.5}  # fmt: skip


@functools.cache
def _written_store() -> str:
    """A store as a sweep writes it (JSON): the full cache and two configs, two units each."""
    store = ResultStore(None, IDENTITY)
    for config in (Config.from_kwargs(budget=1.0), Config.from_kwargs(allocator="uniform", budget=0.5),
                   Config.from_kwargs(budget=0.5, evictor="h2o", window=4)):  # fmt: skip
        for i, unit in enumerate(UNITS):
            store.put(config, unit, _result(0.25 * i))
    return json.dumps(store.data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, path=()):
    """Every place in a JSON document: the paths of its nodes."""
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


@st.composite
def damaged_stores(draw) -> dict:
    """A valid store with one place replaced by any JSON value, or removed."""
    data = json.loads(_written_store())
    path = draw(st.sampled_from([p for p in _paths(data) if p]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return data


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=damaged_stores())
def test_any_damaged_store_is_read_whole_or_refused_in_one_documented_line(tmp_path, data):
    (tmp_path / "results.json").write_text(json.dumps(data))
    try:
        store = ResultStore(tmp_path, IDENTITY)
    except SqueezekitError as error:  # one of the store's own rows (not the catch-all of plugin parameters)
        rows = [ROWS[key] for key in ("results-format", "results-malformed", "results-setting")]
        assert any(type(error).__name__ == row.error and template_regex(row.template).match(str(error)) for row in rows)
        assert "\n" not in str(error)
        return
    # what is read serves every report and every lookup
    assert reports.markdown_table(store.data) and reports.comparisons_markdown(store.data)
    for key, cell in store.cells.items():
        reports.summarize(cell)
        assert isinstance(store.has(Config.from_kwargs(), UNITS[0]), bool) and isinstance(key, str)


def test_the_stores_in_docs_are_read():
    from pathlib import Path

    from squeezekit.evaluators.results import FORMAT

    stores = sorted((Path(__file__).resolve().parents[1] / "docs" / "results").glob("*/results.json"))
    current = [(path, json.loads(path.read_text())) for path in stores]
    current = [(path, data) for path, data in current if data.get("format") == FORMAT]
    assert current
    for path, data in current:
        assert ResultStore(path.parent, data["meta"]).cells, path


# ---- a file rewritten at the same path -----------------------------------------------------------------------------


def _profile(path, loss: float) -> str:
    from squeezekit.plugins.calibrated import FORMAT

    made = {"format": FORMAT, "model": {"name": "tiny"}, "evictor": {"name": "streaming"}, "levels": [0.1, 0.4],
            "layers": [0, 1], "loss": [[loss, 0.1], [0.1, 0.0]]}  # fmt: skip
    path.write_text(json.dumps(made))
    return str(path)


class Recorder:
    """Stands in for the Evaluator: records what it is asked to run (no model, no lm-eval)."""

    runs: list[tuple[str, str]] = []

    def __init__(self, *args, **kwargs):
        pass

    def run(self, config, unit, **kwargs):
        Recorder.runs.append((cell_key(config), unit.key))
        return _result(1.0)


@pytest.fixture
def fake_sweep(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from squeezekit.evaluators import evaluator, sweep
    from squeezekit.evaluators.testing import standin_text

    monkeypatch.setattr(evaluator, "Evaluator", Recorder)
    monkeypatch.setattr(reports, "write_reports", lambda data, out: None)
    text = tmp_path / "text.txt"
    text.write_text(standin_text(300))

    def run(configs, units):
        Recorder.runs = []
        data = sweep.run_sweep(configs, units, tmp_path / "out", tiny_dir, text_file=str(text), progress=False,
                               device="cpu")  # fmt: skip
        return sorted(Recorder.runs), data

    return run


def test_a_profile_rewritten_at_the_same_path_runs_its_cell_again(fake_sweep, tmp_path, capsys):
    from squeezekit.evaluators.sweep import sweep_configs

    profile = _profile(tmp_path / "profile.json", 0.2)
    configs = sweep_configs(["uniform", "calibrated"], ["streaming"], [0.5], {"profile": profile})
    calibrated = f"calibrated+streaming@0.5/profile={profile}"
    ran, _ = fake_sweep(configs, UNITS)
    assert len(ran) == 4
    assert fake_sweep(configs, UNITS)[0] == [] and capsys.readouterr().err == ""  # unchanged: nothing runs again

    _profile(tmp_path / "profile.json", 0.3)  # recalibrated: the same path, another content
    ran, data = fake_sweep(configs, UNITS[:1])
    assert ran == [(calibrated, UNITS[0].key)]  # only the cell whose file changed
    assert capsys.readouterr().err == (
        f"squeezekit: {calibrated}: profile={profile} has changed since its 2 recorded units were computed: running "
        "them again\n"
    )
    assert set(data["cells"][calibrated]["units"]) == {UNITS[0].key}  # the stale unit of another suite is gone too
    assert set(data["cells"]["uniform+streaming@0.5"]["units"]) == {u.key for u in UNITS}
    assert fake_sweep(configs, UNITS[:1])[0] == []


def test_a_cell_recorded_without_fingerprints_runs_again(fake_sweep, tmp_path, capsys):
    from squeezekit.evaluators.sweep import sweep_configs

    profile = _profile(tmp_path / "profile.json", 0.2)
    configs = sweep_configs(["calibrated"], ["streaming"], [0.5], {"profile": profile})
    fake_sweep(configs, UNITS[:1])
    path = tmp_path / "out" / "results.json"
    old = json.loads(path.read_text())
    for cell in old["cells"].values():  # as squeezekit wrote cells before it fingerprinted files
        del cell["fingerprints"]
    path.write_text(json.dumps(old))
    capsys.readouterr()
    assert fake_sweep(configs, UNITS[:1])[0] == [(cell_key(configs[0]), UNITS[0].key)]
    assert "may have changed (not fingerprinted then)" in capsys.readouterr().err


def test_fingerprints_are_kept_for_files_only(tmp_path):
    from squeezekit.evaluators.results import file_fingerprints

    profile = _profile(tmp_path / "profile.json", 0.2)
    config = Config.from_kwargs(allocator="calibrated", profile=profile, budget=0.5)
    prints = file_fingerprints(config)
    assert list(prints) == ["profile"]
    assert file_fingerprints(copy.copy(config)) == prints  # the content decides, not the object
    assert file_fingerprints(Config.from_kwargs(allocator="calibrated", profile=profile, budget=1.0)) == {}
    assert file_fingerprints(Config.from_kwargs(evictor="h2o", window=4)) == {}


# ---- the plot ---------------------------------------------------------------------------------------------------


def _sweep_store(evictors: list[str], model: str) -> dict:
    store = ResultStore(None, {**IDENTITY, "model": model})
    units = [Unit("niah_single_1", 512, 2), Unit("squeezekit_passkey", 256, 2), Unit("squeezekit_ppl", 256, 2)]
    configs = [Config.from_kwargs(budget=1.0)] + [
        Config.from_kwargs(allocator=allocator, evictor=evictor, budget=budget)
        for evictor in evictors
        for allocator in ("uniform", "squeeze", "lost_attention")
        for budget in (0.2, 0.5)
    ]
    for i, config in enumerate(configs):
        for unit in units:
            store.put(config, unit, _result(0.1 * (i % 7)))
    return store.data


@pytest.mark.parametrize("evictors", [["h2o"], bundled("evictor")])
@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", "Meta-Llama-3.1-70B-Instruct-" * 4])
def test_every_label_of_the_plot_lies_within_the_figure(evictors, model):
    """The title (wrapped), the axes' titles, labels, ticks and legends: none is cut off, with one evictor's column
    (a single-config eval) or every bundled one, and a long model name."""
    from squeezekit.plotting import pyplot

    fig = reports.figure(_sweep_store(evictors, model))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inches = fig.get_size_inches()
    drawn = fig.get_tightbbox(renderer)  # (inches) everything drawn: titles, labels, ticks, legends
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01 and drawn.x1 <= inches[0] + 0.01 and drawn.y1 <= inches[1] + 0.01
    (title,) = [t for t in fig.texts if t.get_text().startswith("squeezekit on ")]
    extent, box = title.get_window_extent(renderer), fig.bbox  # (pixels)
    assert box.x0 <= extent.x0 < extent.x1 <= box.x1 and box.y0 <= extent.y0 < extent.y1 <= box.y1, extent.bounds
    pyplot().close(fig)


def test_a_sweep_over_head_splits_pairs_each_split_with_the_uniform_one(fake_sweep):
    """``--heads uniform,adaptive``: each cell runs under both splits (the split's own parameters reach only its
    cells), and the report pairs every adaptive cell with its uniform twin."""
    from squeezekit.evaluators.sweep import sweep_configs

    configs = sweep_configs(["uniform", "squeeze"], ["snapkv"], [0.2, 1.0], {"safeguard": 0.3, "window": 4},
                            heads=("uniform", "adaptive"))  # fmt: skip
    keys = [cell_key(c) for c in configs]
    assert keys == [
        "full",
        "uniform+snapkv@0.2/window=4",
        "uniform+snapkv@0.2/heads=adaptive/safeguard=0.3/window=4",
        "squeeze+snapkv@0.2/window=4",
        "squeeze+snapkv@0.2/heads=adaptive/safeguard=0.3/window=4",
    ]
    ran, data = fake_sweep(configs, UNITS)
    assert len(ran) == 2 * len(keys)
    rows = reports.head_comparisons(data)
    assert [(r["heads"], r["allocator"], r["evictor"], r["budget"]) for r in rows] == [
        ("adaptive (safeguard=0.3)", "squeeze", "snapkv", 0.2),
        ("adaptive (safeguard=0.3)", "uniform", "snapkv", 0.2),
    ]
    assert "| adaptive (safeguard=0.3) | uniform | snapkv | 0.2 |" in reports.head_comparisons_markdown(data)
    with pytest.raises(SqueezekitError, match="heads = 'adaptve': unknown head split"):
        sweep_configs(["uniform"], ["snapkv"], [0.2], heads=("adaptve",))
