"""One configuration schema: files, ``k=v`` strings and kwargs give equal `Config` objects; bad input gives one line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_factory import installed_names

import squeezekit
from squeezekit import Config, ConfigError, UnknownPluginError

# The same configuration, written in every supported form.
EXPECTED = {"allocator": "pyramid", "evictor": "snapkv", "budget": 0.25, "window": 16, "kernel_size": 5, "beta": 4.0}
YAML = "allocator: pyramid\nevictor: snapkv\nbudget: 0.25\nwindow: 16\nkernel_size: 5\nbeta: 4\n"
TOML = 'allocator = "pyramid"\nevictor = "snapkv"\nbudget = 0.25\nwindow = 16\nkernel_size = 5\nbeta = 4.0\n'
JSON = json.dumps(EXPECTED)
STRING = "allocator=pyramid, evictor=snapkv,budget=0.25,window=16,kernel_size=5,beta=4"


def one_line_error(excinfo, key: str, value_repr: str | None = None) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    assert f"{key} = " in message, message
    if value_repr is not None:
        assert f"{key} = {value_repr}:" in message, message
    return message


# ---- every source gives the same Config ------------------------------------------------------------------------


def test_every_source_gives_an_equal_config(tmp_path):
    configs = {"kwargs": Config.from_kwargs(**EXPECTED), "string": Config.from_string(STRING)}
    for suffix, text in [(".yaml", YAML), (".yml", YAML), (".toml", TOML), (".json", JSON)]:
        path = tmp_path / f"run{suffix}"
        path.write_text(text)
        configs[suffix] = Config.from_file(path)
        configs[f"coerce {suffix}"] = Config.coerce(str(path))
    configs["mapping"] = Config.from_mapping(dict(EXPECTED))
    configs["coerce dict"] = Config.coerce(dict(EXPECTED))
    configs["coerce string"] = Config.coerce(STRING)
    configs["coerce Config"] = Config.coerce(configs["kwargs"])
    configs["as_dict round trip"] = Config.from_mapping(configs["kwargs"].as_dict())
    reference = configs["kwargs"]
    for source, config in configs.items():
        assert config == reference, source
        assert hash(config) == hash(reference), source
    assert reference.allocator == "pyramid" and reference.evictor == "snapkv" and reference.budget == 0.25
    assert dict(reference.params) == {"beta": 4.0, "kernel_size": 5, "window": 16}
    assert isinstance(dict(reference.params)["window"], int)
    assert Config.from_label(reference.label) == reference
    assert reference.as_dict() == EXPECTED


def test_keyword_overrides_win():
    assert Config.coerce(STRING, budget=0.5).budget == 0.5
    assert Config.coerce({"evictor": "h2o"}, heavy_ratio=0.25) == Config.from_kwargs(evictor="h2o", heavy_ratio=0.25)


def test_defaults():
    config = Config.from_kwargs()
    assert (config.allocator, config.evictor, config.budget) == ("squeeze", "streaming", 0.2)
    assert config == Config.from_string("") == Config()
    assert config.as_dict() == {"allocator": "squeeze", "evictor": "streaming", "budget": 0.2}


def test_config_is_immutable():
    config = Config.from_kwargs()
    with pytest.raises(AttributeError):
        config.budget = 0.5


def test_core_keys_reach_the_plugins():
    config = Config.from_string("evictor=h2o,window=3,heavy_ratio=0.75,allocator=squeeze,p=0.3")
    assert config.build_evictor() == squeezekit.registry().get("evictor", "h2o").cls(window=3, heavy_ratio=0.75)
    assert config.build_allocator().p == 0.3


@settings(max_examples=50, deadline=None)
@given(
    budget=st.one_of(st.floats(0.001, 1.0), st.integers(80, 100_000)),  # absolute: at least sinks + window
    window=st.integers(1, 64),
    sinks=st.integers(0, 16),
    p=st.floats(0.01, 1.0),
)
def test_string_and_kwargs_agree(budget, window, sinks, p):
    kwargs = Config.from_kwargs(budget=budget, window=window, sinks=sinks, p=p)
    text = Config.from_string(f"budget={budget!r},window={window},sinks={sinks},p={p!r}")
    assert kwargs == text
    assert Config.from_mapping(kwargs.as_dict()) == kwargs


# ---- budget semantics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "full", "absolute", "shown"),
    [
        (1, True, False, "full cache"),
        (1.0, True, False, "full cache"),
        (0.2, False, False, "budget 0.2"),
        (512, False, True, "512 tokens"),
        (512.0, False, True, "512 tokens"),
        (12, False, True, "12 tokens"),
    ],
)
def test_budget_semantics(budget, full, absolute, shown):
    config = Config.from_kwargs(budget=budget)
    assert config.full is full and config.absolute is absolute
    assert config.describe().endswith(f"@ {shown}")


def test_describe():
    config = Config.from_kwargs(allocator="squeeze", evictor="h2o", budget=0.2, p=0.3, window=16)
    assert config.describe() == (
        "squeeze(p=0.3, n_init=10, random_state=0, per=batch) + h2o(heavy_ratio=0.5, window=16) @ budget 0.2"
    )
    assert Config.from_kwargs(allocator="uniform", evictor="streaming", sinks=2, window=4, budget=64).describe() == (
        "uniform() + streaming(sinks=2, window=4) @ 64 tokens"
    )


# ---- bad input: one line naming the key and the value ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key", "value_repr", "accepted"),
    [
        ({"budget": 0}, "budget", "0.0", "fraction of the prompt in (0, 1]"),
        ({"budget": -0.5}, "budget", "-0.5", "fraction of the prompt in (0, 1]"),
        ({"budget": 1.5}, "budget", "1.5", "or a whole number of tokens > 1"),
        ({"budget": 512.5}, "budget", "512.5", "whole number of tokens"),
        ({"budget": float("nan")}, "budget", "nan", "fraction of the prompt"),
        ({"budget": float("inf")}, "budget", "inf", "fraction of the prompt"),
        ({"budget": "0.2"}, "budget", "'0.2'", "expected a number, got str"),
        ({"budget": True}, "budget", "True", "expected a number, got bool"),
        ({"budget": None}, "budget", "None", "expected a number, got NoneType"),
        ({"sinks": True}, "sinks", "True", "expected an integer, got bool"),
        ({"sinks": 2.5}, "sinks", "2.5", "expected an integer"),
        ({"sinks": -1}, "sinks", "-1", "must be an integer >= 0"),
        ({"window": 0}, "window", "0", "must be an integer >= 1"),
        ({"window": "8"}, "window", "'8'", "expected an integer, got str"),
        ({"p": 0}, "p", "0.0", "must be in (0, 1]"),
        ({"p": 1.01}, "p", "1.01", "must be in (0, 1]"),
        ({"heavy_ratio": -0.1, "evictor": "h2o"}, "heavy_ratio", "-0.1", "must be in [0, 1]"),
        ({"heavy_ratio": 2, "evictor": "h2o"}, "heavy_ratio", "2.0", "must be in [0, 1]"),
        ({"allocator": 3}, "allocator", "3", "expected a name (string), got int"),
        ({"evictor": "snapkv", "kernel_size": 4}, "kernel_size", "4", "must be an odd integer >= 1"),
        ({"evictor": "snapkv", "kernel_size": "5"}, "kernel_size", "'5'", "expected an integer, got str"),
        ({"evictor": "snapkv", "pooling": "min"}, "pooling", "'min'", "must be 'max' or 'avg'"),
        ({"allocator": "pyramid", "beta": 0.5}, "beta", "0.5", "must be >= 1"),
        ({"allocator": "squeeze", "n_init": 0}, "n_init", "0", "must be an integer >= 1"),
        ({"allocator": "squeeze", "per": "token"}, "per", "'token'", "must be 'batch' or 'sequence'"),
    ],
)
def test_bad_values(kwargs, key, value_repr, accepted):
    with pytest.raises(ConfigError) as excinfo:
        Config.from_kwargs(**kwargs)
    message = one_line_error(excinfo, key, value_repr)
    assert accepted in message
    assert message.startswith(f"config error: kwargs: {key} = ")


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_kwargs(budgte=0.3)
    message = one_line_error(excinfo, "budgte", "0.3")
    assert "unknown key" in message and message.endswith("did you mean 'budget'?")


def test_unknown_key_lists_the_chosen_plugins_keys():
    with pytest.raises(ConfigError) as excinfo:
        Config.from_string("evictor=snapkv,kernel_sise=5")
    message = one_line_error(excinfo, "kernel_sise", "'5'")
    assert "kernel_size" in message and "pooling" in message and message.endswith("did you mean 'kernel_size'?")
    # a parameter of an installed plugin the config does not choose: which plugin to choose
    with pytest.raises(ConfigError, match=r"beta = 2.0: is a parameter of allocator 'pyramid', .*allocator=pyramid$"):
        Config.from_kwargs(beta=2.0)
    assert Config.from_kwargs(beta=2.0, allocator="pyramid").build_allocator().beta == 2.0


def test_unknown_evictor_lists_installed_names_and_suggests():
    with pytest.raises(UnknownPluginError) as excinfo:
        Config.from_kwargs(evictor="h20")
    message = one_line_error(excinfo, "evictor", "'h20'")
    assert f"unknown evictor; installed: {installed_names('evictor')}" in message
    assert message.endswith("did you mean 'h2o'?")
    assert isinstance(excinfo.value, ConfigError)


def test_unknown_allocator_lists_installed_names_and_suggests():
    with pytest.raises(UnknownPluginError) as excinfo:
        Config.from_string("allocator=sqeeze")
    message = one_line_error(excinfo, "allocator", "'sqeeze'")
    assert f"unknown allocator; installed: {installed_names('allocator')}" in message
    assert message.endswith("did you mean 'squeeze'?")
    assert message.startswith("config error: model_args: allocator")


def test_unknown_name_without_a_near_match():
    with pytest.raises(UnknownPluginError) as excinfo:
        Config.from_kwargs(evictor="zzzzzz")
    assert "did you mean" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("text", "key", "accepted"),
    [
        ("budget=abc", "budget", "expected a number"),
        ("window=8.5", "window", "expected an integer"),
        ("window=", "window", "expected an integer"),
        ("evictor=snapkv,kernel_size=4", "kernel_size", "must be an odd integer >= 1"),
        ("evictor=snapkv,kernel_size=x", "kernel_size", "expected an integer"),
        ("budget", "budget", "expected key=value pairs separated by commas"),
        ("=0.2", "=0.2", "expected key=value pairs separated by commas"),
        ("evictor=h20", "evictor", "did you mean 'h2o'?"),
        ("budget=1.5", "budget", "whole number of tokens > 1"),
    ],
)
def test_bad_strings(text, key, accepted):
    with pytest.raises(ConfigError) as excinfo:
        Config.from_string(text)
    message = one_line_error(excinfo, key)
    assert accepted in message
    assert message.startswith(f"config error: model_args: {key}")


@pytest.mark.parametrize(
    ("suffix", "text", "key", "accepted"),
    [
        (".yaml", "budget: 1.5\n", "budget", "whole number of tokens"),
        (".yaml", "budget: '0.2'\n", "budget", "expected a number, got str"),
        (".yaml", "sinks: true\n", "sinks", "expected an integer, got bool"),
        (".yaml", "budget: .nan\n", "budget", "fraction of the prompt"),
        (".toml", "window = 0\n", "window", "must be an integer >= 1"),
        (".toml", 'window = "8"\n', "window", "expected an integer, got str"),
        (".toml", "budgte = 0.3\n", "budgte", "did you mean 'budget'?"),
        (".json", '{"evictor": "h20"}', "evictor", "did you mean 'h2o'?"),
        (".json", '{"evictor": "snapkv", "kernel_size": 4}', "kernel_size", "must be an odd integer >= 1"),
        (".json", '{"p": 1.5}', "p", "must be in (0, 1]"),
        (".json", '{"heavy_ratio": 1.5, "evictor": "h2o"}', "heavy_ratio", "must be in [0, 1]"),
        (".json", "[1, 2]", "(top level)", "expected a mapping of keys to values"),
        (".yaml", "- budget\n", "(top level)", "expected a mapping of keys to values"),
        (".yaml", "budget: {x: 1}\n", "budget", "expected a number, got dict"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, suffix, text, key, accepted):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        Config.from_file(path)
    message = one_line_error(excinfo, key)
    assert accepted in message
    assert message.startswith(f"config error: {path}: {key} = ")


@pytest.mark.parametrize(
    ("suffix", "text", "kind"),
    [
        (".yaml", "budget: [0.2\n", "YAML"),
        (".yaml", "a: b: c\n", "YAML"),
        (".toml", "budget = \n", "TOML"),
        (".toml", "[budget\n", "TOML"),
        (".json", '{"budget": 0.2,}', "JSON"),
        (".json", "", "JSON"),
    ],
)
def test_unparsable_files(tmp_path, suffix, text, kind):
    path = tmp_path / f"broken{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        Config.from_file(path)
    message = one_line_error(excinfo, "(file)", repr(str(path)))
    assert f"is not valid {kind}: " in message


def test_empty_yaml_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert Config.from_file(path) == Config.from_kwargs()


@pytest.mark.parametrize("name", ["run.ini", "run.txt", "run", "run.yaml.bak"])
def test_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("budget: 0.2\n")
    with pytest.raises(ConfigError) as excinfo:
        Config.from_file(path)
    message = one_line_error(excinfo, "(file)", repr(str(path)))
    assert "unsupported config file type: use .yaml, .yml, .toml or .json" in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        Config.from_file(path)
    assert "cannot be read: No such file or directory" in one_line_error(excinfo, "(file)", repr(str(path)))


def test_coerce_rejects_other_types():
    with pytest.raises(ConfigError) as excinfo:
        Config.coerce(42)
    assert "expected a Config, a dict, a k=v string or a config file path" in one_line_error(excinfo, "config", "42")
