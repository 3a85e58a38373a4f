"""Task ``report``: the study's comparison (compaction.report) over this flow run's eval runs,
written to ``artifacts/reports/<study>/`` and logged as a ``stage=report`` MLflow run. Not
cached: it reads what the flow run has just recorded."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compaction.params import Params
from tasks.base import JOB_SECONDS


@task(name="report", cache_policy=NO_CACHE)
def report(params: Params, parent_run_id: str | None) -> dict:
    import time

    from compaction.report import make_report

    t0 = time.perf_counter()
    result = make_report(params, parent_run_id=parent_run_id)
    # The report is a stage (DESIGN.md's table): its figures and tables are its job's work.
    JOB_SECONDS.append(("report", time.perf_counter() - t0))
    get_run_logger().info("report for study %s: %d rows -> %s", params.study, len(result.payload["rows"]),
                          result.out_dir / "report.md")
    return {"study": params.study, "out_dir": str(result.out_dir), "run_id": result.run_id,
            "rows": len(result.payload["rows"])}
