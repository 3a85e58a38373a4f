"""The `compaction` command.

    compaction demo   [--params params/demo.yaml] [--set key=value ...]
    compaction grade  IN.parquet OUT.parquet [--problems PROBLEMS.parquet] [--workers N] [--timeout S]
    compaction params [--params FILE] [--set key=value ...]     # validate and print resolved params
    compaction redundancy-map ROUND_DIR_OR_PARQUET --out FILE.html   # OPSD per-token divergences as HTML
    compaction run FLOW --params FILE [--set key=value ...] [--checkpoint REF] [--condition C ...]
                                     # a Prefect flow (post-train, compaction, watch-rlvr) run directly
    compaction report [--params FILE] [--set key=value ...] [--study NAME|latest] [--json] [--out DIR]

The CLI is an entrypoint, above every layer: it imports jobs (and, later, flows) lazily,
so that `compaction grade` does not pay for torch and `--help` is instant. Params are
validated before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from compaction.enums import BRANCHES  # imports only typing: --help stays instant
from compaction.params import add_params_args  # pydantic and yaml, no torch

OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
    # Prefect's ephemeral server (direct flow runs) gets 20 s to start by default: too little on a
    # busy 2-core machine (seen: a timeout while training ran beside it).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compaction", description="Post-RL compaction pipeline (SFT -> RLVR -> OPSD).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the post-train flow on the embedded default (ephemeral Prefect), then the report table")
    add_params_args(demo)

    grade = sub.add_parser("grade", help="grade a rollouts Parquet file with math-verify")
    grade.add_argument("input", help="Parquet with rollout_id, response, and answer (or problem_id + --problems)")
    grade.add_argument("output", help="grades Parquet to write (atomically)")
    grade.add_argument("--problems", default=None, help="problems Parquet to take answers from, joined on problem_id")
    grade.add_argument("--workers", type=int, default=2)
    grade.add_argument("--timeout", type=float, default=5.0, help="hard per-row deadline in seconds")

    show = sub.add_parser("params", help="validate a params file (with overrides) and print the resolved values")
    add_params_args(show)

    rmap = sub.add_parser("redundancy-map", help="render an OPSD round's per-token divergences as an HTML page")
    rmap.add_argument("source", help="an OPSD round folder (round-XXXX/) or its redundancy_map.parquet")
    rmap.add_argument("--out", required=True, help="HTML file to write (atomically)")
    rmap.add_argument("--title", default=None)
    run = sub.add_parser("run", help="run a Prefect flow directly (ephemeral Prefect unless PREFECT_API_URL is set)")
    run.add_argument("flow", choices=sorted(FLOWS), help="flow name")
    add_params_args(run)
    run.add_argument("--checkpoint", default=None,
                     help="compaction: RLVR checkpoint path or models:/ URI (default models:/rlvr@latest)")
    run.add_argument("--condition", dest="conditions", action="append", default=None,
                     choices=BRANCHES,
                     help="compaction, post-train, study: a branch, an OPSD condition or `lenpen` (the "
                     "length-penalty baseline); repeatable; default opsd.conditions")
    run.add_argument("--seeds", default="0,1,2",
                     help="study: comma-separated study seeds, one post-train each (default 0,1,2)")

    rep = sub.add_parser("report", help="one study's models x benchmarks table with bootstrap intervals, plots, maps")
    add_params_args(rep)
    rep.add_argument("--study", default=None,
                     help="study NAME (experiment compaction-NAME, folder artifacts/reports/NAME), or `latest`: the "
                     "experiment of the store with the newest eval run (default: the params' study)")
    rep.add_argument("--json", action="store_true", help="print report.json instead of the table")
    rep.add_argument("--out", default=None, help="folder to write (default: artifacts/reports/<study>/)")
    rep.add_argument("--parent-run", default=None, help="report on this flow run (MLflow run id) instead of the latest")
    rep.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")

    ui = sub.add_parser("ui-url", help="the MLflow UI's page of the study's evaluation runs (make ui prints it)")
    add_params_args(ui)
    ui.add_argument("--ui", default="http://127.0.0.1:5000", help="where the MLflow UI answers")
    return parser


#: Flow name -> (module, function); imported only when run.
FLOWS = {"post-train": ("flows.post_train", "post_train"), "compaction": ("flows.compact", "compaction"),
         "study": ("flows.study", "study"), "watch-rlvr": ("flows.watch_rlvr", "watch_rlvr")}


def _run_flow(args: argparse.Namespace) -> int:
    import importlib

    module, name = FLOWS[args.flow]
    flow_fn = getattr(importlib.import_module(module), name)
    kwargs: dict = {"params": str(Path(args.params).resolve()), "overrides": list(args.overrides)}
    if args.flow == "compaction":
        kwargs.update(checkpoint=args.checkpoint, conditions=args.conditions)
    elif args.flow == "post-train":
        kwargs.update(conditions=args.conditions)
    elif args.flow == "study":
        from flows.study import parse_seeds

        kwargs.update(conditions=args.conditions, seeds=parse_seeds(args.seeds))
    from flows.direct import direct_run_settings

    with direct_run_settings():
        state = flow_fn(**kwargs, return_state=True)
    print(f"flow {args.flow}: {state.name}")
    if not state.is_completed():
        print(f"compaction run: error: {state.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    args = build_parser().parse_args(argv)
    from compaction.params import ParamsError

    try:
        if args.command == "grade":
            return _grade(args)
        if args.command == "redundancy-map":
            from compaction.redundancy_map import write_html

            print(f"redundancy map -> {write_html(args.source, args.out, args.title)}")
            return 0
        from compaction.params import dump_params, load_params

        overrides = list(args.overrides)
        if args.command == "report" and args.study and args.study != "latest":
            overrides = [f"study={args.study}", f"tracking.experiment=compaction-{args.study}", *overrides]
        params = load_params(args.params, overrides)  # fail on bad params before any work
        if args.command == "run" and args.flow == "study":
            from flows.study import parse_seeds

            parse_seeds(args.seeds)  # fail on bad seeds before the server starts
        if args.command in ("run", "demo"):
            from flows.direct import start_ephemeral_server

            start_ephemeral_server()  # boots while the flows are imported (flows/direct.py)
        if args.command == "run":
            return _run_flow(args)
        if args.command == "params":
            print(dump_params(params), end="")
            return 0
        if args.command == "demo":
            from cli.demo import run_demo

            run_demo(args.params, args.overrides)
            return 0
        if args.command == "report":
            return _report(args, params)
        if args.command == "ui-url":
            from compaction.tracking import eval_runs_url

            url = eval_runs_url(params.tracking, args.ui)
            print(url or f"no experiment {params.tracking.experiment!r} in {params.tracking.tracking_uri} yet: "
                         f"run `make demo` first")
            return 0
    except (ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"compaction {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 1


def _report(args: argparse.Namespace, params) -> int:
    import json

    from compaction.report import latest_experiment, make_report, render_markdown

    if args.study == "latest":
        experiment = latest_experiment(params.tracking.tracking_uri)
        params.tracking.experiment = experiment
        params.study = experiment.removeprefix("compaction-")
    report = make_report(params, out_dir=args.out, parent_run_id=args.parent_run, log_to_mlflow=not args.no_mlflow)
    if args.json:
        print(json.dumps(report.payload, indent=1))
    else:
        print(render_markdown(report.payload), end="")
        print(f"report -> {report.out_dir}" + (f" (MLflow run {report.run_id})" if report.run_id else ""))
    return 0


def _grade(args: argparse.Namespace) -> int:
    from compaction.grading import grade_file
    import pandas as pd

    out = grade_file(args.input, args.output, problems_path=args.problems, workers=args.workers, timeout_s=args.timeout)
    grades = pd.read_parquet(out)
    counts = grades["status"].value_counts().to_dict()
    print(f"graded {len(grades)} rows: accuracy {grades['correct'].mean():.3f}, status {counts} -> {Path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
