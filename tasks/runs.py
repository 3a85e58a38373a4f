"""MLflow run bookkeeping of the flows and stage tasks: the flow's parent run, one nested run per
stage, and the flow's params file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from compaction.params import Params, load_params
from compaction.tracking import git_commit
from tasks.cache import section_payload


def flow_params_file(params: str) -> Path:
    """A flow's params file: a relative path resolves against ``$COMPACTION_HOME`` or the working
    directory (prefect.yaml's pull step sets it to the project)."""
    path = Path(params)
    if not path.is_absolute():
        path = Path(os.environ.get("COMPACTION_HOME", os.getcwd())) / path
    return path


def load_flow_params(params: str, overrides: Sequence[str] = ()) -> Params:
    """The flow's params (:func:`flow_params_file`); errors name the file and key."""
    return load_params(flow_params_file(params), list(overrides or []))


@contextlib.contextmanager
def flow_run(params: Params, flow_name: str) -> Iterator[str]:
    """The flow run's parent MLflow run (nested under the calling flow's run for a subflow);
    yields its id."""
    from prefect.context import FlowRunContext

    from compaction import tracking

    ctx = FlowRunContext.get()
    fr = ctx.flow_run if ctx else None
    tags = {"study": params.study, "seed": str(params.seed), "flow": flow_name, "prefect_flow_run_id": str(fr.id) if fr else "",
            "git_commit": git_commit()}
    name = f"{flow_name}-{fr.name}" if fr else flow_name
    with tracking.start_run(params.tracking, name, nested=True, tags=tags) as run:
        tracking.log_params(params.model_dump(mode="json"))
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(params: Params, parent_run_id: str | None, run_name: str, tags: Mapping[str, str],
              log_sections: Sequence[str] = ()) -> Iterator[str]:
    """The stage's nested MLflow run under the flow's run (one per stage task): the job logs its
    rounds there, step = round. Yields its id."""
    from compaction import tracking

    all_tags = {**tags, "seed": str(params.seed), "git_commit": git_commit()}
    with tracking.start_run(params.tracking, run_name, nested=True, tags=all_tags, parent_run_id=parent_run_id) as run:
        if log_sections:
            tracking.log_params(section_payload(params, log_sections))
        yield run.info.run_id
