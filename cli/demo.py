"""`compaction demo`: the whole `post-train` flow on the embedded default, in Prefect's ephemeral
mode (no server), ending with the report's comparison table and how to open the MLflow UI.

data -> base model -> SFT -> RLVR -> compaction under every `opsd.conditions` -> evaluation ->
report. Every stage is a cached Prefect task, so a second `make demo` reuses what the first made.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table


def run_demo(params_path: str, overrides: Sequence[str], console: Console | None = None) -> dict:
    from flows.direct import direct_run_settings
    from flows.post_train import post_train

    # At least 120 columns: a piped or logged demo (80 by default) would cut the model names.
    console = console or Console(width=max(Console().width, 120))
    t0 = time.perf_counter()
    with direct_run_settings():
        state = post_train(params=str(Path(params_path).resolve()), overrides=list(overrides), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"post-train flow {state.name}: {state.message}")
    result = state.result()
    report = result["compaction"]["report"]
    payload = _read_json(Path(report["out_dir"]) / "report.json")
    print_table(console, payload)
    console.print(f"post-train flow completed in {time.perf_counter() - t0:.0f} s; report: {report['out_dir']}/report.md")
    from compaction.params import load_params
    from compaction.tracking import eval_runs_url

    url = eval_runs_url(load_params(params_path, list(overrides)).tracking)
    console.print(f"Open the MLflow UI to compare the runs: [bold]make ui[/], then {url}")
    return payload


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def print_table(console: Console, payload: dict) -> None:
    """Model x benchmark: accuracy (avg@k) and mean response tokens, with deltas against the baseline."""
    table = Table(title=f"study {payload['study']}: accuracy and response length per model "
                        f"(deltas vs {payload['baseline']}, {round(100 * payload['confidence'])}% bootstrap CI)")
    for col in ("model", "benchmark", "accuracy", "Δ acc (pt)", "mean tokens", "Δ tokens"):
        table.add_column(col, justify="left" if col in ("model", "benchmark") else "right")
    for r in payload["rows"]:
        lo, hi = r["accuracy_ci"] or (float("nan"), float("nan"))
        acc = f"{100 * r['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
        d_acc = "" if r.get("accuracy_delta") is None else f"{100 * r['accuracy_delta']:+.1f}"
        d_tok = ("" if r.get("mean_response_tokens_change") is None
                 else f"{100 * r['mean_response_tokens_change']:+.1f}%")
        table.add_row(r["model"], r["benchmark"], acc, d_acc, f"{r['mean_response_tokens']:.1f}", d_tok)
    console.print(table)
