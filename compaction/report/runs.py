"""The report's inputs from MLflow: the study's experiment, which eval runs it compares (``report.scope``),
the stage runs behind them, and each eval run's per-rollout data from its ``eval_dir``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from compaction.artifacts import read_parquet

ROLLOUT_COLUMNS = ("rollout_id", "problem_id", "response_tokens", "finish_reason")
GRADE_COLUMNS = ("rollout_id", "correct")
PARENT_TAG = "mlflow.parentRunId"


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
    ancestors: tuple[str, ...] = ()  # the run itself, its parent, ..., its root
    seed: int = 0  # the study seed (tag ``seed``; 0 for runs made outside a study)


def tracking_client(uri: str):
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


#: The flow whose run holds one flow run per seed (flows/study.py): a report asked for one of those
#: reports on that seed's flow run only.
STUDY_FLOW = "study"


def _chain(run, client, cache: dict) -> list:
    """``run``, its parent, ... up to its top-most ancestor, following ``mlflow.parentRunId``."""
    seen, cur, chain = set(), run, [run]
    while True:
        parent = cur.data.tags.get(PARENT_TAG)
        if not parent or parent in seen:
            return chain
        seen.add(cur.info.run_id)
        if parent not in cache:
            try:
                cache[parent] = client.get_run(parent)
            except Exception:  # parent deleted: the run is its own root
                return chain
        cur = cache[parent]
        chain.append(cur)


def _scope_root(run, client, cache: dict) -> str:
    """What a report on ``run`` covers: its top-most ancestor, stopping below a study's run (a
    flow of one seed reports on that seed), or the study's run itself."""
    chain = _chain(run, client, cache)
    for child, parent in zip(chain, chain[1:]):
        if parent.data.tags.get("flow") == STUDY_FLOW:
            return child.info.run_id
    return chain[-1].info.run_id


def find_experiment(client, name: str, uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ReportError(f"no MLflow experiment {name!r} (tracking.experiment) in tracking store {uri}")
    return exp


def latest_experiment(uri: str) -> str:
    """Name of the experiment whose newest finished eval run is the newest of the store (`--study latest`)."""
    client = tracking_client(uri)
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
        try:
            seed = int(tags.get("seed", 0))
        except ValueError:
            raise ReportError(f"eval run {r.info.run_id} of experiment {exp.name!r}: tag seed "
                              f"{tags['seed']!r} is not an integer") from None
        chain = tuple(c.info.run_id for c in _chain(r, client, cache))
        evals.append(EvalRun(
            run_id=r.info.run_id, model=tags.get("model") or r.info.run_name, condition=tags.get("condition"),
            policy_ref=tags.get("policy_ref"), eval_dir=Path(tags["eval_dir"]), start_time=r.info.start_time,
            root_id=chain[-1], train_run_id=tags.get("train_run_id"), ancestors=chain, seed=seed))
    if parent_run_id:
        # A subflow's run (compaction inside post-train) reports on its whole flow run tree; a
        # seed's flow inside a study on that seed's tree; the study's run on every seed's.
        parent_run_id = _scope_root(client.get_run(parent_run_id), client, cache)
        chosen = [e for e in evals if parent_run_id in e.ancestors]
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


def stage_runs(client, exp, stage: str, root: str | None, scope_runs: Iterable[EvalRun]) -> list:
    """Finished-or-not runs of ``stage`` in the selection: those under ``root`` and those that
    trained a selected evaluation's checkpoint (its ``train_run_id``: a stage this flow run took
    from the cache was trained by an earlier flow run); without a root, the latest per condition."""
    runs = _search(client, exp.experiment_id, f"tags.stage = '{stage}'")
    if root is not None:
        named = {e.train_run_id for e in scope_runs if e.train_run_id}
        cache: dict = {}
        return [r for r in runs if r.info.run_id in named
                or root in (c.info.run_id for c in _chain(r, client, cache))]
    latest: dict = {}
    for r in runs:  # newest first
        latest.setdefault(r.data.tags.get("condition") or r.data.tags.get("model") or "", r)
    return list(latest.values())


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
