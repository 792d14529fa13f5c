"""CI smoke test: the literal ``lm_eval --model squeezekit ...`` command, in a subprocess, with lm-eval unmodified.

It works only if the installed package registered the model: through the startup hook for lm-eval 0.4.13 (see
squeezekit/evaluators/_lm_eval_hook.py) or the ``lm_eval.models`` entry point for later releases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from squeezekit.evaluators.testing import make_tiny_model, write_tiny_tasks  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    tasks = write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))
    return model, tasks


def _lm_eval(*args: str, **env: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lm_eval") or shutil.which("lm-eval")
    cmd = [exe] if exe else [sys.executable, "-m", "lm_eval"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)


def _installed_hook_is_current() -> None:
    """The hook lm-eval runs is the one in site-packages, copied there at install time: it must be this one."""
    import importlib.util

    spec = importlib.util.find_spec("_squeezekit_lm_eval_hook")
    assert spec is not None and spec.origin, "the lm-eval start-up hook is not installed: pip install -e ."
    source = Path(__file__).resolve().parents[1] / "evaluators" / "_lm_eval_hook.py"
    assert Path(spec.origin).read_text() == source.read_text(), (
        f"{spec.origin} is an older copy of evaluators/_lm_eval_hook.py: reinstall (pip install --no-deps -e .)"
    )


def test_literal_lm_eval_command(setup):
    model, tasks = setup
    out = _lm_eval(
        "--model", "squeezekit",
        "--model_args", f"pretrained={model},allocator=squeeze,evictor=streaming,budget=0.5",
        "--tasks", "tiny_gen,tiny_mc,tiny_ppl",
        "--include_path", str(tasks),
        "--limit", "2", "--device", "cpu", "--batch_size", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert text.lstrip().startswith("squeezekit (") and "'evictor': 'streaming'" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    assert {"tiny_gen", "tiny_mc", "tiny_ppl"} <= set(rows)
    assert "exact_match" in rows["tiny_gen"] and "acc" in rows["tiny_mc"] and "bits_per_byte" in rows["tiny_ppl"]


def _readme_command() -> list[str]:
    """The arguments of the README's ``lm_eval`` command (its lm-eval section's first code block)."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.partition("## Quality evaluation with lm-eval")[2]
    block = section.partition("```bash\n")[2].partition("```")[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[0] == "lm_eval" and "pretrained" not in block, block
    return words[1:]


def test_readme_ruler_command_without_pretrained(tmp_path):
    """The README's command as a new user types it (plus --limit 2): no pretrained=, a RULER task. The tiny model,
    saved where squeezekit keeps its embedded model ($SQUEEZEKIT_CACHE/SmolLM2-135M-Instruct), is the default."""
    from squeezekit.models import DEFAULT_MODEL

    _installed_hook_is_current()
    default = make_tiny_model(tmp_path / DEFAULT_MODEL)
    out = _lm_eval(*_readme_command(), "--limit", "2", SQUEEZEKIT_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("|niah_single_1")]
    assert rows and rows[0][5].strip() == "1024", out.stdout  # scored at the asked length
    assert f"squeezekit: no pretrained= in --model_args: using the embedded model {default}" in out.stderr
    assert f"Using tokenizer {default} for synthetic tasks" in out.stderr  # RULER sized its prompts with it
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # a second lm-eval start-up (~15 s); the error itself is covered in-process too
def test_unknown_model_arg_is_a_config_error(setup):
    model, tasks = setup
    out = _lm_eval(
        "--model", "squeezekit", "--model_args", f"pretrained={model},evictor=streaming,budgte=0.2",
        "--tasks", "tiny_gen", "--include_path", str(tasks), "--limit", "1", "--device", "cpu",
    )  # fmt: skip
    assert out.returncode != 0
    assert (
        "config error: model_args: budgte = 0.2: unknown key" in out.stderr and "did you mean 'budget'?" in out.stderr
    )


def test_startup_hook_is_installed_and_cheap():
    """The .pth hook is active in this environment and imports nothing heavy at start-up."""
    code = (
        "import sys; heavy = [m for m in ('torch', 'transformers', 'lm_eval', 'squeezekit') if m in sys.modules]; "
        "print('hook' if '_squeezekit_lm_eval_hook' in sys.modules else 'no-hook', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "hook []", out.stdout + out.stderr


@pytest.mark.slow  # builds and installs the package into a throwaway venv (~30 s)
def test_regular_install_registers_the_model(tmp_path):
    """``pip install .`` (not editable) into a venv also gets the hook, and lm-eval resolves the model from it."""
    import sysconfig
    import venv

    root = Path(__file__).resolve().parents[1]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    # The test's own environment (lm-eval, torch, ...) as plain path entries after the new venv's site-packages: its
    # .pth files (the editable squeezekit, its hook) are not run, so only the regular install can register the model.
    # (``system_site_packages`` would give the base interpreter's packages, not this venv's, when run inside a venv.)
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_outer_environment.pth").write_text("".join(f"{p}\n" for p in outer))
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(root)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (site / "squeezekit-lm-eval.pth").exists() and (site / "_squeezekit_lm_eval_hook.py").exists()
    code = (
        "from lm_eval.api.registry import get_model; import inspect; "
        "print(inspect.getfile(get_model('squeezekit')), get_model('hf').__name__)"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    where, hf = out.stdout.split()
    assert where.startswith(str(site)) and hf == "HFLM"
