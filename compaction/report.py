"""`compaction report`: one study's models x benchmarks, with bootstrap intervals, plots and maps.

Reads the study's MLflow experiment (``tracking.experiment``) in the layout of
docs/decisions.md ("Orchestration and tracking contract"):

1. **Which eval runs.** Finished runs tagged ``stage=eval``. ``report.scope: latest`` (default)
   keeps those under the latest flow run (root parent run, by start time) that has any: one
   ``make demo`` / one ``compaction`` flow run is one comparison. ``scope: experiment`` keeps, per
   model label, every eval run of the label's latest ``policy_ref``: for a study assembled from
   several flow runs (one deployment per condition). Several eval runs of the same model in the
   selection are seeds (e.g. one flow evaluating with several ``eval.seed``).
2. **Per rollout data.** Each eval run's tag ``eval_dir`` holds ``<bench>/rollouts.parquet`` and
   ``<bench>/grades.parquet`` (joined on ``rollout_id``). A row's accuracy is the mean verdict
   over every sample of every seed (avg@k), its length the mean of ``response_tokens``: what
   the evaluate job logs, recomputed from the files.
3. **Intervals.** Percentile bootstrap (``report.bootstrap_samples``, ``report.confidence``,
   seeded by ``report.seed``): problems are resampled with replacement, and seeds too where a
   model has several. Deltas against the baseline model (``report.baseline``, default ``rlvr``)
   are paired: both models are evaluated on the same problems, so one problem resample is
   applied to both, which removes the between-problem variance from the difference.
4. **Outputs** in ``artifacts/reports/<study>/`` (one folder renamed into place):
   ``report.md`` (the table), ``report.json`` (the ``--json`` payload), ``accuracy_vs_tokens.png``,
   ``length_histograms.png``, ``training_curves.png`` (metric histories of the ``stage=rlvr`` /
   ``stage=opsd`` runs of the same selection, and of the runs that trained its evaluated
   checkpoints: tag ``train_run_id``, so a fully cached rerun still shows them),
   ``redundancy_map_<condition>.html`` (the last round's map of each OPSD condition, from the opsd
   runs' ``stage_dir`` tag), all logged as
   artifacts ``report/`` of a run tagged ``stage=report`` (nested under the flow run reported on).
   The promotion gate (compaction/promotion.py) is evaluated for each OPSD model against the
   baseline and shown in the report; the registry is left alone here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from compaction.artifacts import atomic_dir, atomic_path, read_parquet
from compaction.enums import BASELINE, CONDITIONS
from compaction.params import Params

#: Table order of the model labels: the stages, then one `opsd-<condition>` per OPSD condition.
MODEL_ORDER = ["sft", "rlvr", *(f"opsd-{c}" for c in CONDITIONS)]
CURVE_METRICS = ["rlvr/reward_mean", "rlvr/mean_response_tokens", "opsd/loss", "opsd/accuracy",
                 "opsd/mean_response_tokens"]
ROLLOUT_COLUMNS = ("rollout_id", "problem_id", "response_tokens", "finish_reason")
GRADE_COLUMNS = ("rollout_id", "correct")
PARENT_TAG = "mlflow.parentRunId"


#: The compaction flow's evaluation of its starting checkpoint (condition `baseline`).
SAME_AS_RLVR = f"opsd-{BASELINE}"


class ReportError(ValueError):
    """The study cannot be reported (no experiment, no eval runs, unreadable eval folder)."""


@dataclass
class EvalRun:
    run_id: str
    model: str
    condition: str | None
    policy_ref: str | None
    eval_dir: Path
    start_time: int
    root_id: str
    train_run_id: str | None = None  # the stage run that trained the checkpoint (tag ``train_run_id``)


@dataclass
class Report:
    payload: dict[str, Any]
    out_dir: Path
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- MLflow
def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _search(client, exp_id: str, filter_string: str) -> list:
    """Every run of the experiment matching ``filter_string`` (all pages), newest first."""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _root_of(run, client, cache: dict) -> str:
    """The id of the top-most ancestor of ``run`` (the flow run), following ``mlflow.parentRunId``."""
    seen, cur = set(), run
    while True:
        parent = cur.data.tags.get(PARENT_TAG)
        if not parent or parent in seen:
            return cur.info.run_id
        seen.add(cur.info.run_id)
        if parent not in cache:
            try:
                cache[parent] = client.get_run(parent)
            except Exception:  # parent deleted: the run is its own root
                return cur.info.run_id
        cur = cache[parent]


def find_experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ReportError(f"no MLflow experiment {name!r} (tracking.experiment) in tracking store {uri}")
    return exp


def latest_experiment(uri: str) -> str:
    """Name of the experiment whose newest finished eval run is the newest of the store (`--study latest`)."""
    client = _client(uri)
    best = None
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'eval' and attributes.status = 'FINISHED'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        if runs and (best is None or runs[0].info.start_time > best[0]):
            best = (runs[0].info.start_time, exp.name)
    if best is None:
        raise ReportError(f"no experiment with finished eval runs (tag stage=eval) in tracking store {uri}")
    return best[1]


def select_eval_runs(client, exp, uri: str, scope: str = "latest",
                     parent_run_id: str | None = None) -> tuple[list[EvalRun], str | None]:
    """The eval runs to report on and the flow run they belong to (None for scope `experiment`)."""
    runs = _search(client, exp.experiment_id, "tags.stage = 'eval' and attributes.status = 'FINISHED'")
    if not runs:
        raise ReportError(f"experiment {exp.name!r} (id {exp.experiment_id}) in tracking store {uri} has no "
                          "finished eval runs (tag stage=eval): run the evaluation first")
    cache: dict = {}
    evals = []
    for r in runs:
        tags = r.data.tags
        if not tags.get("eval_dir"):
            raise ReportError(f"eval run {r.info.run_id} of experiment {exp.name!r} has no tag eval_dir")
        evals.append(EvalRun(
            run_id=r.info.run_id, model=tags.get("model") or r.info.run_name, condition=tags.get("condition"),
            policy_ref=tags.get("policy_ref"), eval_dir=Path(tags["eval_dir"]), start_time=r.info.start_time,
            root_id=_root_of(r, client, cache), train_run_id=tags.get("train_run_id")))
    if parent_run_id:
        # A subflow's run (compaction inside post-train) reports on its whole flow run tree.
        parent_run_id = _root_of(client.get_run(parent_run_id), client, cache)
        chosen = [e for e in evals if e.root_id == parent_run_id]
        if not chosen:
            raise ReportError(f"flow run {parent_run_id} of experiment {exp.name!r} has no finished eval runs")
        return chosen, parent_run_id
    if scope == "latest":
        def root_start(root_id: str) -> int:
            root = cache.get(root_id)
            return root.info.start_time if root is not None else max(e.start_time for e in evals if e.root_id == root_id)

        root = max({e.root_id for e in evals}, key=root_start)
        return [e for e in evals if e.root_id == root], root
    if scope == "experiment":
        chosen = []
        for model in {e.model for e in evals}:
            mine = [e for e in evals if e.model == model]
            latest_ref = max(mine, key=lambda e: e.start_time).policy_ref
            chosen += [e for e in mine if e.policy_ref == latest_ref]
        return chosen, None
    raise ValueError(f"report.scope: unknown scope {scope!r} (latest | experiment)")


def _stage_runs(client, exp, stage: str, root: str | None, scope_runs: Iterable[EvalRun]) -> list:
    """Finished-or-not runs of ``stage`` in the selection: those under ``root`` and those that
    trained a selected evaluation's checkpoint (its ``train_run_id``: a stage this flow run took
    from the cache was trained by an earlier flow run); without a root, the latest per condition."""
    runs = _search(client, exp.experiment_id, f"tags.stage = '{stage}'")
    if root is not None:
        named = {e.train_run_id for e in scope_runs if e.train_run_id}
        cache: dict = {}
        return [r for r in runs if r.info.run_id in named or _root_of(r, client, cache) == root]
    latest: dict = {}
    for r in runs:  # newest first
        latest.setdefault(r.data.tags.get("condition") or r.data.tags.get("model") or "", r)
    return list(latest.values())


# ---------------------------------------------------------------------------- data
def load_benchmarks(run: EvalRun) -> dict[str, pd.DataFrame]:
    """``{bench: rollouts joined with their verdicts}`` from the run's eval folder."""
    d = run.eval_dir
    if not d.is_dir():
        raise ReportError(f"eval run {run.run_id} (model {run.model}): eval_dir {d} is not a folder")
    out = {}
    for bench_dir in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rollouts = read_parquet(bench_dir / "rollouts.parquet", required=ROLLOUT_COLUMNS)
        grades = read_parquet(bench_dir / "grades.parquet", required=GRADE_COLUMNS)
        if rollouts["rollout_id"].duplicated().any() or grades["rollout_id"].duplicated().any():
            raise ReportError(f"{bench_dir}: duplicate rollout_id in rollouts.parquet or grades.parquet")
        df = rollouts[list(ROLLOUT_COLUMNS)].merge(grades[list(GRADE_COLUMNS)], on="rollout_id", how="left",
                                                   validate="one_to_one")
        ungraded = df["correct"].isna()
        if ungraded.any():
            raise ReportError(f"{bench_dir / 'grades.parquet'}: no verdict for {int(ungraded.sum())} rollout(s) of "
                              f"rollouts.parquet, e.g. {list(df.loc[ungraded, 'rollout_id'][:3])}")
        df["correct"] = df["correct"].astype(bool)
        if df.empty:
            raise ReportError(f"{bench_dir / 'rollouts.parquet'}: no rollouts")
        out[bench_dir.name] = df
    if not out:
        raise ReportError(f"eval run {run.run_id} (model {run.model}): no <bench>/rollouts.parquet in {d}")
    return out


def _cells(frames: Sequence[pd.DataFrame], problems: Sequence[str], column: str) -> tuple[np.ndarray, np.ndarray]:
    """Per (seed, problem) sums of ``column`` and sample counts."""
    index = {p: i for i, p in enumerate(problems)}
    sums = np.zeros((len(frames), len(problems)))
    counts = np.zeros((len(frames), len(problems)))
    for s, df in enumerate(frames):
        df = df[df["problem_id"].isin(index)]
        cols = df["problem_id"].map(index).to_numpy(dtype=int)
        np.add.at(sums[s], cols, df[column].to_numpy(dtype=float))
        np.add.at(counts[s], cols, 1.0)
    return sums, counts


def _ratio(sums, counts, w_seed=None, w_prob=None) -> np.ndarray | float:
    if w_seed is None:
        den = counts.sum()
        return float(sums.sum() / den) if den else float("nan")
    num = np.einsum("bs,sp,bp->b", w_seed, sums, w_prob)
    den = np.einsum("bs,sp,bp->b", w_seed, counts, w_prob)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """Bootstrap multiplicities: ``b`` resamples of ``n`` items with replacement."""
    if n == 1:
        return np.ones((b, 1))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(float)


def _rng(seed: int, *labels: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(label.encode()) for label in labels)])


def _interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    a = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(samples, [a, 100 - a])
    return [float(lo), float(hi)]


def bootstrap_row(frames: Sequence[pd.DataFrame], b: int, confidence: float, rng) -> dict[str, Any]:
    """Point estimates and intervals of accuracy and mean tokens over problems (and seeds)."""
    problems = sorted(set().union(*(set(f["problem_id"]) for f in frames)))
    w_seed, w_prob = _weights(rng, len(frames), b), _weights(rng, len(problems), b)
    row: dict[str, Any] = {}
    for name, column in (("accuracy", "correct"), ("mean_response_tokens", "response_tokens")):
        sums, counts = _cells(frames, problems, column)
        row[name] = _ratio(sums, counts)
        row[f"{name}_ci"] = _interval(_ratio(sums, counts, w_seed, w_prob), confidence)
    return row


def bootstrap_delta(frames: Sequence[pd.DataFrame], base: Sequence[pd.DataFrame], b: int, confidence: float,
                    rng) -> dict[str, Any]:
    """Paired deltas (model - baseline) over the problems both were evaluated on."""
    problems = sorted(set().union(*(set(f["problem_id"]) for f in frames))
                      & set().union(*(set(f["problem_id"]) for f in base)))
    out: dict[str, Any] = {"delta_problems": len(problems)}
    if not problems:
        for name in ("accuracy", "mean_response_tokens"):
            out[f"{name}_delta"], out[f"{name}_delta_ci"] = None, None
        return out
    w_prob = _weights(rng, len(problems), b)
    w_m, w_b = _weights(rng, len(frames), b), _weights(rng, len(base), b)
    for name, column in (("accuracy", "correct"), ("mean_response_tokens", "response_tokens")):
        sm, cm = _cells(frames, problems, column)
        sb, cb = _cells(base, problems, column)
        out[f"{name}_delta"] = _ratio(sm, cm) - _ratio(sb, cb)
        out[f"{name}_delta_ci"] = _interval(_ratio(sm, cm, w_m, w_prob) - _ratio(sb, cb, w_b, w_prob), confidence)
    return out


def _model_key(model: str) -> tuple:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def build_rows(data: dict[str, list[tuple[EvalRun, dict[str, pd.DataFrame]]]], baseline: str, b: int,
               confidence: float, seed: int) -> list[dict[str, Any]]:
    """One row per (model, benchmark), models in pipeline order."""
    rows = []
    for model in sorted(data, key=_model_key):
        runs = data[model]
        benches = sorted(set().union(*(set(frames) for _, frames in runs)))
        for bench in benches:
            frames = [frames[bench] for _, frames in runs if bench in frames]
            used = [r for r, frames in runs if bench in frames]
            pooled = pd.concat(frames, ignore_index=True)
            row: dict[str, Any] = {
                "model": model, "benchmark": bench,
                "condition": next((r.condition for r in used if r.condition), None),
                "policy_ref": used[-1].policy_ref,
                "eval_runs": [r.run_id for r in used], "seeds": len(frames),
                "problems": int(pooled["problem_id"].nunique()), "samples": int(len(pooled)),
            }
            row.update(bootstrap_row(frames, b, confidence, _rng(seed, "row", model, bench)))
            row["median_response_tokens"] = float(pooled["response_tokens"].median())
            row["truncation_rate"] = float((pooled["finish_reason"] == "length").mean())
            if model != baseline and baseline in data and any(bench in f for _, f in data[baseline]):
                base = [f[bench] for _, f in data[baseline] if bench in f]
                row.update(bootstrap_delta(frames, base, b, confidence, _rng(seed, "delta", model, bench)))
            else:
                row.update({"accuracy_delta": None, "accuracy_delta_ci": None, "mean_response_tokens_delta": None,
                            "mean_response_tokens_delta_ci": None, "delta_problems": None})
            rows.append(row)
    return rows


def promotion_verdicts(rows: list[dict[str, Any]], baseline: str, params: Params) -> dict[str, dict[str, Any]]:
    """The promotion gate of each OPSD model against the baseline, on the report's own numbers."""
    from compaction.promotion import decide_promotion

    def metrics(model: str) -> dict[str, float]:
        m = {}
        for r in rows:
            if r["model"] == model:
                m[f"eval/{r['benchmark']}/accuracy"] = r["accuracy"]
                m[f"eval/{r['benchmark']}/mean_response_tokens"] = r["mean_response_tokens"]
        return m

    base = metrics(baseline)
    if not base:
        return {}
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        if model.startswith("opsd-") and model != SAME_AS_RLVR:
            ok, reason = decide_promotion(base, metrics(model), params.promotion.benchmarks,
                                          params.promotion.max_accuracy_drop)
            out[model] = {"promote": ok, "reason": reason}
    return out


# ---------------------------------------------------------------------------- rendering
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
                        label=r["model"])
            ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_title(f"{bench}: accuracy vs length")
        ax.set_xlabel("mean response tokens")
        ax.set_ylabel("accuracy (avg@k, %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_length_histograms(data: dict[str, dict[str, pd.DataFrame]], path: Path) -> None:
    """``data``: {bench: {model: pooled frame}}; one panel per benchmark, one step histogram per model."""
    import matplotlib.pyplot as plt

    benches = sorted(data)
    models = sorted({m for d in data.values() for m in d}, key=_model_key)
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


# ---------------------------------------------------------------------------- the report
def make_report(params: Params, out_dir: str | Path | None = None, parent_run_id: str | None = None,
                log_to_mlflow: bool = True) -> Report:
    """Build the study's report, write it to ``out_dir`` (default ``artifacts/reports/<study>/``)
    and log it to MLflow; returns the payload of ``report.json``."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    rp = params.report
    uri = params.tracking.tracking_uri
    if not uri:
        raise ReportError("tracking.tracking_uri is empty: load params with compaction.params.load_params")
    client = _client(uri)
    exp = find_experiment(client, params.tracking.experiment, uri)
    evals, root = select_eval_runs(client, exp, uri, rp.scope, parent_run_id)
    notes: list[str] = []

    data: dict[str, list[tuple[EvalRun, dict[str, pd.DataFrame]]]] = {}
    for e in sorted(evals, key=lambda e: e.start_time):
        data.setdefault(e.model, []).append((e, load_benchmarks(e)))
    baseline = rp.baseline
    if baseline not in data and SAME_AS_RLVR in data:
        # A `compaction` flow started from a registered checkpoint evaluates it as opsd-baseline:
        # the same weights as the rlvr row, so deltas are taken against it.
        notes.append(f"baseline model {baseline!r} has no eval run here; deltas are against {SAME_AS_RLVR!r}, "
                     "the same checkpoint as evaluated by the compaction flow")
        baseline = SAME_AS_RLVR
    elif baseline not in data:
        notes.append(f"baseline model {baseline!r} has no eval run in this selection: no deltas")
    rows = build_rows(data, baseline, rp.bootstrap_samples, rp.confidence, rp.seed)
    for r in rows:
        base = next((b for b in rows if b["model"] == baseline and b["benchmark"] == r["benchmark"]), None)
        r["mean_response_tokens_change"] = (
            r["mean_response_tokens_delta"] / base["mean_response_tokens"]
            if r["mean_response_tokens_delta"] is not None and base and base["mean_response_tokens"] else None)

    out_dir = Path(out_dir) if out_dir else params.artifacts_dir / "reports" / params.study
    run_id = None
    if log_to_mlflow:
        tags = {"stage": "report", "study": params.study, "mlflow.runName": f"report-{params.study}"}
        if root:
            tags[PARENT_TAG] = root
        if commit := _git_commit():
            tags["git_commit"] = commit
        run_id = client.create_run(exp.experiment_id, tags=tags, run_name=f"report-{params.study}").info.run_id
    try:
        with atomic_dir(out_dir) as tmp:
            files = _write_figures(client, exp, evals, root, data, rows, rp, tmp, notes)
            payload = {
                "study": params.study, "experiment": exp.name, "experiment_id": exp.experiment_id,
                "tracking_uri": uri, "scope": rp.scope if not parent_run_id else "parent",
                "parent_run_id": root, "report_run_id": run_id, "baseline": baseline,
                "confidence": rp.confidence, "bootstrap_samples": rp.bootstrap_samples, "bootstrap_seed": rp.seed,
                "max_accuracy_drop": params.promotion.max_accuracy_drop,
                "rows": rows, "promotion": promotion_verdicts(rows, baseline, params),
                "files": sorted(files) + ["report.md", "report.json"], "notes": notes,
            }
            (tmp / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
            (tmp / "report.md").write_text(render_markdown(payload))
        if run_id:
            client.log_artifacts(run_id, str(out_dir), "report")
            client.set_terminated(run_id, "FINISHED")
    except BaseException:
        if run_id:
            client.set_terminated(run_id, "FAILED")
        raise
    return Report(payload, out_dir, run_id, notes)


def _write_figures(client, exp, evals, root, data, rows, rp, tmp: Path, notes: list[str]) -> list[str]:
    from compaction.redundancy_map import MAP_FILE, write_html

    files = []
    plot_accuracy_vs_tokens(rows, tmp / "accuracy_vs_tokens.png")
    files.append("accuracy_vs_tokens.png")
    by_bench: dict[str, dict[str, pd.DataFrame]] = {}
    for model, runs in data.items():
        for bench in sorted(set().union(*(set(f) for _, f in runs))):
            by_bench.setdefault(bench, {})[model] = pd.concat([f[bench] for _, f in runs if bench in f])
    plot_length_histograms(by_bench, tmp / "length_histograms.png")
    files.append("length_histograms.png")

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    opsd_runs = []
    for stage in ("rlvr", "opsd"):
        runs = _stage_runs(client, exp, stage, root, evals)
        if stage == "opsd":
            opsd_runs = runs
        for r in runs:
            label = r.data.tags.get("model") or (f"opsd-{r.data.tags['condition']}" if stage == "opsd"
                                                 and r.data.tags.get("condition") else stage)
            for metric in sorted(k for k in r.data.metrics if k.startswith(f"{stage}/")):
                if metric not in CURVE_METRICS:
                    continue
                hist = client.get_metric_history(r.info.run_id, metric)
                if hist:
                    curves.setdefault(metric, {})[label] = sorted((m.step, m.value) for m in hist)
    if curves:
        plot_training_curves(curves, tmp / "training_curves.png")
        files.append("training_curves.png")
    else:
        notes.append("no rlvr/opsd training runs with metric histories in this selection: no training curves")

    for r in opsd_runs:
        cond = r.data.tags.get("condition")
        out = r.data.tags.get("stage_dir")  # the folder of its rounds (tasks.opsd)
        if not cond or cond == "baseline":
            continue
        maps = sorted(Path(out).glob(f"round-*/{MAP_FILE}")) if out else []
        if not maps:
            notes.append(f"opsd run {r.info.run_id} ({cond}): no round-*/{MAP_FILE} under stage_dir {out!r}")
            continue
        name = f"redundancy_map_{cond}.html"
        if name in files:
            continue
        write_html(maps[-1], tmp / name, f"Redundancy map: opsd-{cond}, {maps[-1].parent.name}")
        files.append(name)
    return files
