"""Flow ``watch-rlvr``: poll the registry for RLVR versions not seen yet and start compaction.

Scheduled (prefect.yaml: every 300 s) as the fallback of the ``rlvr.checkpoint.landed`` trigger,
for checkpoints registered by something that does not emit the event. The last version seen is
the Prefect Variable ``rlvr-last-seen-version``; on the first poll (no Variable) only the newest
version is compacted, after that every newer version, oldest first.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.variables import Variable

from compaction.registry import list_versions
from tasks.runs import load_flow_params

LAST_SEEN = "rlvr-last-seen-version"


@flow(name="watch-rlvr")
def watch_rlvr(params: str = "params/demo.yaml", overrides: list[str] = [],  # noqa: B006 (Prefect parameter)
               deployment: str = "compaction/opsd-correct") -> list[str]:
    log = get_run_logger()
    p = load_flow_params(params, overrides)
    versions = list_versions(p.tracking, p.registry.rlvr_model)
    last = Variable.get(LAST_SEEN, default=None)
    new = [v for v in versions if last is None or int(v.version) > int(last)]
    if last is None:
        new = new[-1:]
    started = []
    for v in new:
        run = run_deployment(deployment, parameters={"params": params, "overrides": list(overrides),
                                                     "checkpoint": v.uri}, timeout=0)
        log.info("%s: new version %s -> flow run %s of %s", p.registry.rlvr_model, v.uri, run.name, deployment)
        Variable.set(LAST_SEEN, v.version, overwrite=True)
        started.append(str(run.id))
    if not new:
        log.info("%s: no version after %s", p.registry.rlvr_model, last)
    return started
