"""Task ``report``: the study's comparison (compaction.report) over this flow run's eval runs,
written to ``artifacts/reports/<study>/`` and logged as a ``stage=report`` MLflow run. Not
cached: it reads what the flow run has just recorded."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compaction.params import Params
from tasks.launch import timed_job


@task(name="report", cache_policy=NO_CACHE)
def report(params: Params, parent_run_id: str | None) -> dict:
    from compaction.report import make_report

    # The report is a stage (docs/design.md, "Stages and what they exchange"): its figures
    # and tables are its job's work.
    result, _ = timed_job("report", lambda: make_report(params, parent_run_id=parent_run_id))
    get_run_logger().info("report for study %s: %d rows -> %s", params.study, len(result.payload["rows"]),
                          result.out_dir / "report.md")
    return {"study": params.study, "out_dir": str(result.out_dir), "run_id": result.run_id,
            "rows": len(result.payload["rows"])}
