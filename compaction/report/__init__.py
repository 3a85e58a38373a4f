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

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from compaction import tracking
from compaction.artifacts import atomic_dir
from compaction.params import Params
from compaction.report.render import (
    plot_accuracy_vs_tokens, plot_heldout_curves, plot_length_histograms, plot_training_curves, render_markdown,
)
from compaction.report.runs import (
    EvalRun, ReportError, find_experiment, latest_experiment, load_benchmarks, select_eval_runs,
    stage_runs, tracking_client,
)
from compaction.report.table import (
    CURVE_METRICS, HELDOUT_METRICS, MODEL_ORDER, SAME_AS_RLVR, build_rows, promotion_verdicts, verdict,
)

__all__ = ["MODEL_ORDER", "SAME_AS_RLVR", "Report", "ReportError", "latest_experiment", "make_report",
           "render_markdown"]


@dataclass
class Report:
    payload: dict[str, Any]
    out_dir: Path
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)


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
    client = tracking_client(uri)
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
    # The report's own run (stage=report), nested under the flow run it reports on; FINISHED, or
    # FAILED when the report fails (tracking.start_run). No system metrics: it is not a job.
    run_context = contextlib.nullcontext() if not log_to_mlflow else tracking.start_run(
        params.tracking.model_copy(update={"system_metrics": False}), f"report-{params.study}",
        tags={"stage": "report", "study": params.study, "git_commit": tracking.git_commit()},
        experiment=exp.name, parent_run_id=root)
    with run_context as run:
        run_id = run.info.run_id if run is not None else None
        with atomic_dir(out_dir) as tmp:
            files = _write_figures(client, exp, evals, root, data, rows, rp, tmp, notes)
            payload = {
                "study": params.study, "experiment": exp.name, "experiment_id": exp.experiment_id,
                "tracking_uri": uri, "scope": rp.scope if not parent_run_id else "parent",
                "parent_run_id": root, "report_run_id": run_id, "baseline": baseline,
                "confidence": rp.confidence, "bootstrap_samples": rp.bootstrap_samples, "bootstrap_seed": rp.seed,
                "max_accuracy_drop": params.promotion.max_accuracy_drop,
                "seeds": seeds_of(evals),
                "rows": rows, "promotion": promotion_verdicts(rows, baseline, params),
                "verdict": verdict(rows, baseline),
                "files": sorted(files) + ["report.md", "report.json"], "notes": notes,
            }
            (tmp / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
            (tmp / "report.md").write_text(render_markdown(payload))
        if run_id:
            client.log_artifacts(run_id, str(out_dir), "report")
            if root:  # where a person looks first: the flow's own run gets the figure and the table
                for name in ("accuracy_vs_tokens.png", "report.md"):
                    client.log_artifact(root, str(out_dir / name), "report")
    return Report(payload, out_dir, run_id, notes)


def seeds_of(evals) -> list[int]:
    return sorted({e.seed for e in evals})


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
    heldout: dict[str, dict[str, list[list[tuple[int, float]]]]] = {}  # {name: {label: one series per run}}
    opsd_runs = []
    for stage in ("rlvr", "opsd"):
        runs = stage_runs(client, exp, stage, root, evals)
        if stage == "opsd":
            opsd_runs = runs
        for r in sorted(runs, key=lambda r: int(r.data.tags.get("seed", 0))):
            label = r.data.tags.get("model") or (f"opsd-{r.data.tags['condition']}" if stage == "opsd"
                                                 and r.data.tags.get("condition") else stage)
            seed = r.data.tags.get("seed", "0")
            for metric in sorted(k for k in r.data.metrics if k.startswith(f"{stage}/")):
                name = metric.split("/", 1)[1]
                if metric not in CURVE_METRICS and name not in HELDOUT_METRICS:
                    continue
                hist = client.get_metric_history(r.info.run_id, metric)
                if not hist:
                    continue
                series = sorted((m.step, m.value) for m in hist)
                if name in HELDOUT_METRICS:
                    heldout.setdefault(name, {}).setdefault(label, []).append(series)
                else:  # one line per run: the seed in the label when there are several
                    curves.setdefault(metric, {})[label if len(seeds_of(evals)) <= 1 else f"{label} s{seed}"] = series
    if curves:
        plot_training_curves(curves, tmp / "training_curves.png")
        files.append("training_curves.png")
    else:
        notes.append("no rlvr/opsd training runs with metric histories in this selection: no training curves")
    if heldout:
        plot_heldout_curves(heldout, tmp / "heldout_vs_round.png")
        files.append("heldout_vs_round.png")
    else:
        notes.append("no held-out curve in this selection (opsd.eval_every = 0): no accuracy and length by round")

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
