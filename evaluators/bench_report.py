"""``squeezekit bench``'s reports: the results as JSON, a markdown table and a PNG of decode throughput."""

from __future__ import annotations

import json
from pathlib import Path


def write_reports(results: dict, out: Path) -> None:
    """results.json, a markdown table and a PNG of decode throughput vs batch size."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{results['config']}" + (f"-{results['gpus']}gpu" if results.get("gpus", 1) > 1 else "")
    if "profile" in results:
        (out / f"profile-{stem[6:]}.txt").write_text(results["profile"])
    (out / f"{stem}.json").write_text(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=1))
    rows = [
        "| method | B | prefill s | decode tok/s | end-to-end tok/s | step ms | floor ms | peak GiB | KV GiB "
        "| prefill peak KV GiB | policy % of prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        if r.get("oom"):
            rows.append(f"| {r['method']} | {r['B']} | OOM | | | | | | | | |")
            continue
        share = r.get("policy_share_of_prefill")
        peak_kv = r.get("kv_bytes_peak_prefill")
        rows.append(
            f"| {r['method']} | {r['B']} | {r['prefill_s']} | {r['decode_tok_s']} | {r['e2e_tok_s']} | "
            f"{r['step_ms']} | {r['floor_step_ms']} | {r['peak_gib']} | {r['kv_bytes'] / 2**30:.2f} | "
            f"{'' if peak_kv is None else f'{peak_kv / 2**30:.2f}'} | {'' if share is None else f'{100 * share:.1f}'} |"
        )
    checks = "\n".join(
        f"- {c['method']} vs {c['reference']}: {100 * c['token_agreement']:.1f}% of greedy tokens agree"
        + (
            f"; prefill logits max abs diff {c['prefill_logits_max_abs_diff']} (logits up to {c['logit_scale']})"
            if "logit_scale" in c
            else ""
        )
        for c in results["checks"]
    )
    (out / f"{stem}.md").write_text(
        f"# squeezekit bench: {results['config']} on {results['device']}\n\n"
        f"torch {results['torch']}, transformers {results['transformers']}, prompts {results['prompt_len']} tokens, "
        f"{results['new_tokens']} new tokens, copy bandwidth {results['copy_bandwidth_Bps'] / 1e12:.2f} TB/s.\n\n"
        + "\n".join(rows)
        + "\n\nCorrectness (same inputs):\n\n"
        + checks
        + "\n"
    )
    from squeezekit.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for name in dict.fromkeys(r["method"] for r in results["runs"]):
        pts = [(r["B"], r["decode_tok_s"]) for r in results["runs"] if r["method"] == name and not r.get("oom")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"{results['config']}, {results['prompt_len']}-token prompts, {results['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png")
    plt.close(fig)
