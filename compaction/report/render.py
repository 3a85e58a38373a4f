"""The report's rendering: the markdown table and the three figures (Agg backend, no display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from compaction.artifacts import atomic_path
from compaction.report.table import CURVE_METRICS, model_order_key

def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None, scale: float = 1.0, fmt: str = "{:.1f}", signed: bool = False) -> str:
    if ci is None:
        return ""
    f = (lambda v: ("{:+" + fmt[2:]).format(v * scale)) if signed else (lambda v: fmt.format(v * scale))
    return f" [{f(ci[0])}, {f(ci[1])}]"


def render_markdown(payload: dict[str, Any]) -> str:
    conf = round(100 * payload["confidence"])
    base = payload["baseline"]
    lines = [
        f"# Report: study {payload['study']}", "",
        f"Experiment `{payload['experiment']}` in `{payload['tracking_uri']}`"
        + (f", flow run `{payload['parent_run_id']}`" if payload.get("parent_run_id") else "")
        + f" (scope `{payload['scope']}`).",
        f"Accuracy is avg@k over all samples; brackets are {conf}% percentile bootstrap intervals over problems "
        f"(and seeds), {payload['bootstrap_samples']} resamples; deltas are paired against `{base}` on the same "
        "problems.", "",
        f"| model | benchmark | accuracy | Δ accuracy vs {base} | mean tokens | Δ mean tokens vs {base} | problems | "
        "samples | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        acc = _pct(r["accuracy"]) + _ci(r["accuracy_ci"], 100)
        tok = f"{r['mean_response_tokens']:.1f}" + _ci(r["mean_response_tokens_ci"])
        if r["accuracy_delta"] is None:
            dacc = dtok = "-"
        else:
            dacc = f"{100 * r['accuracy_delta']:+.1f} pt" + _ci(r["accuracy_delta_ci"], 100, signed=True)
            dtok = f"{r['mean_response_tokens_delta']:+.1f}" + _ci(r["mean_response_tokens_delta_ci"], signed=True)
            if r.get("mean_response_tokens_change") is not None:
                dtok += f" ({100 * r['mean_response_tokens_change']:+.1f}%)"
        lines.append(f"| {r['model']} | {r['benchmark']} | {acc} | {dacc} | {tok} | {dtok} | {r['problems']} | "
                     f"{r['samples']} | {r['seeds']} |")
        if r["seeds"] > 1:  # a row per seed: point values, deltas against the baseline's run of that seed
            for s in r.get("per_seed", []):
                sd_acc = "-" if s["accuracy_delta"] is None else f"{100 * s['accuracy_delta']:+.1f} pt"
                sd_tok = "-" if s["mean_response_tokens_delta"] is None else f"{s['mean_response_tokens_delta']:+.1f}"
                lines.append(f"| &nbsp;&nbsp;seed {s['seed']} | | {_pct(s['accuracy'])} | {sd_acc} | "
                             f"{s['mean_response_tokens']:.1f} | {sd_tok} | | | |")
    if payload.get("verdict"):
        lines += ["", f"## Verdict: the paper's directions in this study (seeds {payload.get('seeds')})", ""]
        mark = {True: "holds", False: "does not hold", None: "not tested"}
        for v in payload["verdict"]:
            head = v["claim"] if v["claim"].startswith("(") else f"{v['claim']}: **{mark[v['holds']]}**"
            lines.append(f"- {v['benchmark']}: {head} ({v['evidence']})")
    if payload.get("promotion"):
        lines += ["", f"## Promotion gate (max accuracy drop {payload['max_accuracy_drop']:g} pt, shorter on every "
                  "benchmark)", ""]
        for model, v in payload["promotion"].items():
            lines.append(f"- **{model}**: {v['reason']}")
    figures = [f for f in payload["files"] if f.endswith(".png")]
    maps = [f for f in payload["files"] if f.endswith(".html")]
    if figures:
        lines += ["", "## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    if maps:
        lines += ["", "## Redundancy maps", ""] + [f"- [{Path(f).stem}]({f})" for f in maps]
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _colors(models: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def plot_accuracy_vs_tokens(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in rows})
    colors = _colors(list(dict.fromkeys(r["model"] for r in rows)))
    fig, axes = plt.subplots(1, len(benches), figsize=(5.5 * len(benches), 4.5), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for r in (r for r in rows if r["benchmark"] == bench):
            x, y = r["mean_response_tokens"], 100 * r["accuracy"]
            xerr = yerr = None
            if r["mean_response_tokens_ci"]:
                lo, hi = r["mean_response_tokens_ci"]
                xerr = [[max(x - lo, 0)], [max(hi - x, 0)]]
            if r["accuracy_ci"]:
                lo, hi = (100 * v for v in r["accuracy_ci"])
                yerr = [[max(y - lo, 0)], [max(hi - y, 0)]]
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=colors[r["model"]], capsize=3,
                        label=r["model"] + (f" (mean of {r['seeds']} seeds)" if r["seeds"] > 1 else ""))
            if r["seeds"] > 1:  # every seed's own point, small, around the mean
                ax.scatter([s["mean_response_tokens"] for s in r["per_seed"]],
                           [100 * s["accuracy"] for s in r["per_seed"]], s=14, alpha=0.5, marker="x",
                           color=colors[r["model"]])
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_title(f"{bench}: accuracy vs length")
        ax.set_xlabel("mean response tokens")
        ax.set_ylabel("accuracy (avg@k, %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_length_histograms(data: dict[str, dict[str, pd.DataFrame]], path: Path) -> None:
    """``data``: {bench: {model: pooled frame}}; one panel per benchmark, one step histogram per model."""
    import matplotlib.pyplot as plt

    benches = sorted(data)
    models = sorted({m for d in data.values() for m in d}, key=model_order_key)
    colors = _colors(models)
    fig, axes = plt.subplots(len(benches), 1, figsize=(8, 3.5 * len(benches)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benches):
        top = max(int(df["response_tokens"].max()) for df in data[bench].values())
        bins = np.linspace(0, max(top, 1) + 1, min(40, max(top, 1) + 2))
        for model in (m for m in models if m in data[bench]):
            tokens = data[bench][model]["response_tokens"].to_numpy(dtype=float)
            ax.hist(tokens, bins=bins, histtype="step", linewidth=1.6, color=colors[model],
                    label=f"{model} (mean {tokens.mean():.1f})")
        ax.set_title(f"{bench}: response length per model")
        ax.set_xlabel("response tokens")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_training_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """``curves``: {metric: {run label: [(step, value), ...]}}; one panel per metric."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in CURVE_METRICS if m in curves] + sorted(m for m in curves if m not in CURVE_METRICS)
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.5 * nrows), squeeze=False)
    labels = sorted({label for m in metrics for label in curves[m]})
    colors = _colors(labels)
    for ax, metric in zip(axes.ravel(), metrics):
        for label, points in sorted(curves[metric].items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=colors[label], label=label)
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    _save(fig, path)


def plot_heldout_curves(curves: dict[str, dict[str, list[list[tuple[int, float]]]]], path: Path) -> None:
    """Accuracy and mean tokens on the held-out subset against rounds done, one colour per model
    label: the mean over its runs (seeds) bold, each run thin."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from compaction.report.table import HELDOUT_METRICS

    names = [n for n in HELDOUT_METRICS if n in curves]
    titles = {"heldout_accuracy": ("held-out accuracy (avg@n, %)", 100.0),
              "heldout_mean_response_tokens": ("held-out mean response tokens", 1.0)}
    labels = sorted({label for n in names for label in curves[n]}, key=model_order_key)
    colors = _colors(labels)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        title, scale = titles[name]
        for label in labels:
            runs = curves[name].get(label, [])
            by_step: dict[int, list[float]] = {}
            for series in runs:
                steps, values = zip(*series)
                if len(runs) > 1:
                    ax.plot(steps, [scale * v for v in values], color=colors[label], alpha=0.3, linewidth=0.8)
                for st, v in series:
                    by_step.setdefault(st, []).append(v)
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [scale * float(np.mean(by_step[st])) for st in steps], marker="o", color=colors[label],
                        linewidth=1.8, label=label + (f" (mean of {len(runs)})" if len(runs) > 1 else ""))
        ax.set_title(title)
        ax.set_xlabel("rounds done")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
