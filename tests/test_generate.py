"""``squeezekit generate`` as a new user meets it: short prompts kept whole (and said so), the device and dtype
options, the comparison with the full cache, progress off a terminal, and plots whose titles fit."""

from __future__ import annotations

import pytest

from squeezekit import progress
from squeezekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_a_short_prompt_is_kept_whole_and_the_summary_says_why(capsys, tiny_dir):
    code, out, err = _run(capsys, "What is the capital of France?", "--model", tiny_dir, "--raw",
                          "--max-new-tokens", "4")  # fmt: skip
    assert code == 0, err
    summary = out[-1]
    assert "kept whole: budget 0.2 would keep" in summary and "below the floor of evictor 'streaming' (12)" in summary
    assert "(100.0%)" in summary


def test_compare_runs_the_full_cache_too(capsys, tiny_dir, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(" ".join(f"word{i}" for i in range(300)))
    code, out, err = _run(capsys, "Which word comes last?", "--model", tiny_dir, "--raw", "--context", str(context),
                          "--max-new-tokens", "6", "--budget", "0.5", "--compare")  # fmt: skip
    assert code == 0, err
    assert out[-1].startswith("compared with the full cache: ")
    assert "% of its KV cache after prefill" in out[-1]
    code, out, err = _run(capsys, "Which word comes last?", "--model", tiny_dir, "--raw", "--context", str(context),
                          "--max-new-tokens", "6", "--budget", "1", "--compare")  # fmt: skip
    assert code == 0, err
    assert out[-1].startswith("compared with the full cache: the same answer (6 tokens)"), out[-1]
    assert out[-2].startswith("[") and "KV cache: full, nothing evicted" in out[-2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--device", "bogus"],
            "squeezekit: config error: command line: --device = 'bogus': expected cpu, cuda or cuda:N",
        ),
        (["--device", "CPU"], "squeezekit: config error: command line: --device = 'CPU': expected cpu, cuda or cuda:N"),
        (["--dtype", "int8"], "squeezekit: argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_bad_device_or_dtype_is_one_line_before_the_model_loads(capsys, tiny_dir, argv, message):
    code, out, err = _run(capsys, "hi", "--model", tiny_dir, *argv)
    assert code == 2 and out == [] and len(err) == 1 and err[0].startswith(message), err


def test_dtype_and_device_reach_the_model(capsys, tiny_dir):
    code, out, err = _run(capsys, "hello there", "--model", tiny_dir, "--raw", "--max-new-tokens", "2",
                          "--device", "cpu", "--dtype", "bfloat16", "--budget", "1")  # fmt: skip
    assert code == 0, err
    assert "squeezekit: loading the model (cpu, bfloat16) ..." in err


def test_progress_shows_off_a_terminal(capsys, tiny_dir, monkeypatch):
    """Off a terminal (here: pytest's captured stderr), progress comes as plain lines: the prefill's layers and the
    generated tokens, never a carriage-return bar, and transformers' own loading bar stays off."""
    monkeypatch.setattr(progress, "EVERY", 0.0)  # a line at every step, so the test needs no slow model
    code, out, err = _run(capsys, "hello there", "--model", tiny_dir, "--raw", "--max-new-tokens", "3")
    assert code == 0
    assert any(line.startswith("squeezekit: prefilling ") and "4/4 layers (100%)" in line for line in err), err
    assert any(line.startswith("squeezekit: generating 3/3 tokens (100%)") for line in err), err
    assert not any("\r" in line or "Loading weights" in line for line in err), err


def test_plot_titles_fit_the_figure(tmp_path):
    """A long config description as the title is wrapped to the figure's width, not cut off on both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from squeezekit.plotting import plot_layers

    title = "calibrated(profile=some/very/long/path/to/a/profile.json, rule=sqrt) + snapkv(window=16, kernel_size=7, "
    title += "pooling=max) @ budget 0.2; fallback: evictor streaming(sinks=4, window=8)"
    captured = {}
    real_close = plt.close

    def keep(fig):  # look at the figure before plot_layers closes it
        renderer = fig.canvas.get_renderer()
        captured["title"] = fig.axes[0].title.get_window_extent(renderer)
        captured["figure"] = fig.bbox
        real_close(fig)

    plt.close = keep
    try:
        plot_layers([0.9, 0.8, 0.95, 0.7], [10, 20, 30, 40], tmp_path / "layers.png", title)
    finally:
        plt.close = real_close
    box, figure = captured["title"], captured["figure"]
    assert box.x0 >= 0 and box.x1 <= figure.x1 and box.y1 <= figure.y1, (box, figure)
    assert (tmp_path / "layers.png").stat().st_size > 0
