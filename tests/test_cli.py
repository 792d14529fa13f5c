"""``squeezekit plugins`` and ``squeezekit config check``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from plugin_factory import BUNDLED, OLDEST_FIRST, installed_names

from squeezekit.cli import main


def rows(stdout: str) -> dict[tuple[str, str], str]:
    """(name, kind) -> origin from the ``squeezekit plugins`` table (a name may serve several kinds: uniform)."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["name", "kind", "from", "description"]
    out = {}
    for line in lines[1:]:
        name, kind, package, version, *_ = line.split()
        out[name, kind] = f"{package} {version}"
    return out


def assert_lists_bundled(stdout: str) -> None:
    table = rows(stdout)
    for kind, names in BUNDLED.items():
        for name in names:
            assert table[name, kind] == "squeezekit 0.1.0", (name, kind)


# ---- squeezekit plugins ----------------------------------------------------------------------------------------


def test_plugins_lists_the_bundled_nine(capsys):
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert_lists_bundled(out)
    assert len(out.splitlines()) == 1 + sum(len(installed_names(kind).split(", ")) for kind in BUNDLED)
    assert err == ""
    assert "StreamingLLM: attention sinks plus the most recent tokens." in out


def test_plugins_strict_passes_when_all_load(capsys):
    assert main(["plugins", "--strict"]) == 0


def test_plugins_console_script():
    """The installed ``squeezekit`` executable, in a fresh process."""
    exe = shutil.which("squeezekit") or shutil.which("squeezekit", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the squeezekit console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "SQUEEZEKIT_PLUGINS"}
    proc = subprocess.run([exe, "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_lists_bundled(proc.stdout)
    assert proc.stderr == ""


def test_plugins_shows_third_party_origin_and_failures(plugin_site, capsys):
    plugin_site.add("squeezekit_testplugin", OLDEST_FIRST, package="squeezekit-testplugin", version="0.3.1")
    plugin_site.add(
        "sk_boom",
        "raise RuntimeError('boom at import')\n",
        package="sk-boom",
        version="2.0",
        entry_points={"boom": "sk_boom"},
    )
    plugin_site.reload()
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert_lists_bundled(out)
    assert rows(out)["oldest_first", "evictor"] == "squeezekit-testplugin 0.3.1"
    assert err == "error: plugin 'boom' from sk-boom 2.0: failed to import: RuntimeError: boom at import\n"
    assert main(["plugins", "--strict"]) == 1


def test_plugins_honours_the_env_restriction(plugin_site, capsys):
    plugin_site.setenv("SQUEEZEKIT_PLUGINS", "uniform,h2o")
    plugin_site.reload()
    assert main(["plugins"]) == 0
    assert rows(capsys.readouterr().out) == {  # (the default head split is never hidden: configs need it)
        ("uniform", "allocator"): "squeezekit 0.1.0",
        ("h2o", "evictor"): "squeezekit 0.1.0",
        ("uniform", "heads"): "squeezekit 0.1.0",
    }


# ---- squeezekit config check -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "summary"),
    [
        (
            "run.yaml",
            "allocator: squeeze\nevictor: h2o\nbudget: 0.2\np: 0.3\n",
            "squeeze(p=0.3, n_init=10, random_state=0, per=batch) + h2o(heavy_ratio=0.5, window=8) @ budget 0.2",
        ),
        (
            "run.toml",
            'evictor = "snapkv"\nkernel_size = 5\nbudget = 512\n',
            "squeeze(p=0.4, n_init=10, random_state=0, per=batch) + snapkv(window=8, kernel_size=5, pooling=max) @ 512 "
            "tokens",
        ),
        ("run.json", '{"allocator": "uniform", "budget": 1}', "uniform() + streaming(sinks=4, window=8) @ full cache"),
    ],
)
def test_config_check_ok(tmp_path, capsys, name, text, summary):
    path = tmp_path / name
    path.write_text(text)
    assert main(["config", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok: {summary}\n"
    assert err == ""


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "budget: 1.5\n", "config error: {path}: budget = 1.5: must be a fraction of the prompt in (0, 1]"),
        (
            "run.yaml",
            "evictor: h20\n",
            "config error: {path}: evictor = 'h20': unknown evictor; installed: {installed}; did you mean 'h2o'?",
        ),
        ("run.yaml", "budgte: 0.2\n", "config error: {path}: budgte = 0.2: unknown key"),
        ("run.toml", "sinks = true\n", "config error: {path}: sinks = True: expected an integer, got bool"),
        (
            "run.json",
            '{"evictor": "snapkv", "kernel_size": 4}',
            "config error: {path}: kernel_size = 4: must be an odd integer >= 1",
        ),
        ("run.yaml", "budget: [0.2\n", "config error: (file) = '{path}': is not valid YAML: "),
        ("run.json", "{", "config error: (file) = '{path}': is not valid JSON: "),
        ("run.ini", "budget=0.2\n", "config error: (file) = '{path}': unsupported config file type"),
        ("missing.yaml", None, "config error: (file) = '{path}': cannot be read: No such file or directory"),
    ],
)
def test_config_check_bad(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")  # exactly one line
    assert err.startswith("squeezekit: " + message.format(path=path, installed=installed_names("evictor"))), err


# ---- the command lines of docs/plugins.md ----------------------------------------------------------------------


def _doc_console_lines() -> list[str]:
    import re

    from plugin_factory import DOC

    blocks = re.findall(r"^```console\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines()]


def test_doc_typo_message_is_exact(plugin_site, tmp_path, capsys, monkeypatch):
    plugin_site.add_doc_example()
    plugin_site.isolate()  # the doc shows a machine with squeezekit and this plugin only
    plugin_site.reload()
    monkeypatch.chdir(tmp_path)
    lines = _doc_console_lines()
    i = lines.index("$ squeezekit config check run.yaml")
    (tmp_path / "run.yaml").write_text("evictor: keynrom\n")
    assert main(["config", "check", "run.yaml"]) == 2
    assert capsys.readouterr().err == lines[i + 1] + "\n"


def test_doc_config_file_and_generate_flags(plugin_site, tmp_path, capsys, monkeypatch):
    import re
    import shlex

    from plugin_factory import DOC

    from squeezekit import Config
    from squeezekit.cli import build_parser
    from squeezekit.cli_options import config_from_args

    plugin_site.add_doc_example()
    plugin_site.reload()
    expected = Config.from_kwargs(allocator="squeeze", evictor="keynorm", window=16, budget=0.2)

    yaml_text = re.search(r"^```yaml\n(.*?)^```", DOC.read_text(), flags=re.S | re.M).group(1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    assert Config.from_file(path) == expected
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ok: squeeze(")

    (line,) = [ln for ln in _doc_console_lines() if ln.startswith("$ squeezekit generate")]
    argv = shlex.split(line)[2:]
    monkeypatch.chdir(tmp_path)
    if "--context" in argv:  # the document the doc's command reads
        (tmp_path / argv[argv.index("--context") + 1]).write_text("a document")
    args = build_parser(argv).parse_args(argv)
    assert args.command == "generate"
    assert config_from_args(args) == Config.from_kwargs(evictor="keynorm", window=16, budget=0.2)


# ---- a third-party plugin's parameters are first-class -----------------------------------------------------------


def test_a_plugins_parameter_is_a_flag_with_help_and_default(plugin_site, capsys):
    """A plugin field (with its #: comment) is a flag of every config-taking command, in --help with its default,
    and reaches the config like any key."""
    from squeezekit import Config
    from squeezekit.cli import build_parser
    from squeezekit.cli_options import config_from_args

    plugin_site.add("squeezekit_testplugin", OLDEST_FIRST, package="squeezekit-testplugin", version="0.3.1")
    plugin_site.reload()
    for command in ("generate", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--skip N [oldest_first] ignore this many leading tokens (default: 0)" in help_text, command
    argv = ["generate", "hi", "--evictor", "oldest_first", "--skip", "3", "--budget", "0.5"]
    args = build_parser(argv).parse_args(argv)
    assert config_from_args(args) == Config.from_kwargs(evictor="oldest_first", skip=3, budget=0.5)


def test_the_sweep_defaults_are_the_bundled_policies_that_build_at_their_defaults(plugin_site, capsys, monkeypatch):
    """``squeezekit eval --sweep`` without --allocators / --evictors sweeps every bundled allocator but calibrated
    (it needs a profile, made for one model and evictor) and every bundled evictor, as --help shows; an installed
    third-party plugin is swept only when named."""
    from squeezekit.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # (argparse breaks a comma-separated default wider than the column)

    plugin_site.add("squeezekit_testplugin", OLDEST_FIRST, package="squeezekit-testplugin", version="0.3.1")
    plugin_site.reload()
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    expected = {"allocator": BUNDLED["allocator"] - {"calibrated"}, "evictor": BUNDLED["evictor"]}
    args = build_parser(["eval"]).parse_args(["eval", "--sweep"])
    for kind, names in expected.items():
        shown = re.search(rf"--{kind}s {kind.upper()}S {kind}s of the sweep \(default: ([a-z0-9_,]+)\)", help_text)
        assert shown is not None and set(shown.group(1).split(",")) == names, help_text
        assert set(getattr(args, f"{kind}s").split(",")) == names


def test_help_shows_every_option_with_its_default(capsys):
    """Every option of every command has help text; those with a value show their default."""
    import argparse

    from squeezekit.cli import build_parser
    from squeezekit.registry import registry

    for command in registry().commands:
        parser = build_parser([command])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (command, action.option_strings)
                if action.nargs != 0 and action.default not in (None, False, [], argparse.SUPPRESS):
                    assert "default" in sub.formatter_class(command)._get_help_string(action), (command, action.dest)
