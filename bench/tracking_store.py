"""Cost of one evaluation's MLflow run on the project's SQLite store: WAL vs SQLite's default journal.

    python bench/tracking_store.py [--runs 30]

Each sample is what ``record_evaluation`` writes: a nested run with five tags, ~20 params, 16
metrics, then the run ended, through ``MlflowClient`` on a fresh store. Two stores side by side,
samples interleaved: the baseline in SQLite's default rollback journal (what MLflow gives), the
other as ``compaction.tracking.use_write_ahead_log`` sets it up (WAL, ``synchronous=NORMAL``).
Prints the median and p90 per run for each and their ratio, plus the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def make_store(folder: Path, wal: bool):
    import mlflow

    from compaction.tracking import use_write_ahead_log

    db = folder / "mlflow.db"
    if wal:
        use_write_ahead_log(db)
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment("bench", artifact_location=(folder / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="flow").info.run_id
    return client, exp, parent


def one_eval_run(client, exp: str, parent: str, i: int) -> float:
    from mlflow.entities import Metric, Param

    t = time.perf_counter()
    run = client.create_run(exp, run_name=f"eval-{i}", tags={
        "mlflow.parentRunId": parent, "stage": "eval", "model": "rlvr", "policy_ref": "models:/rlvr/1",
        "eval_dir": "/tmp/eval"})
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(f"eval.field_{k}", str(k)) for k in range(20)])
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(f"eval/b{b}/m{m}", 0.5, now, 0) for b in range(2) for m in range(8)])
    client.set_terminated(rid)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-tracking-store-"))
    (root / "journal").mkdir()
    (root / "wal").mkdir()
    stores = {"rollback journal (MLflow default)": make_store(root / "journal", wal=False),
              "WAL + synchronous=NORMAL": make_store(root / "wal", wal=True)}
    for name, (client, exp, parent) in stores.items():  # warm-up: first-use costs are not per run
        one_eval_run(client, exp, parent, -1)
    times: dict[str, list[float]] = {name: [] for name in stores}
    for i in range(args.runs):
        for name, (client, exp, parent) in stores.items():
            times[name].append(one_eval_run(client, exp, parent, i))
    medians = {}
    for name, ts in times.items():
        ts = sorted(ts)
        medians[name] = statistics.median(ts)
        print(f"{name:36s} median {1000 * medians[name]:6.1f} ms   p90 {1000 * ts[int(0.9 * (len(ts) - 1))]:6.1f} ms"
              f"   ({len(ts)} eval runs)")
    base, wal = medians.values()
    print(f"ratio WAL / default: {wal / base:.2f} (median)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
