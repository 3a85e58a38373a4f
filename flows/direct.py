"""Running a flow directly in this process (``compaction run``, ``make demo``, benchmarks), as
opposed to a deployment run started by a worker.

Without ``PREFECT_API_URL`` the flow talks to an ephemeral server that lives and dies with this
process, so flow-run heartbeats (which let a server mark a run whose process vanished as crashed)
have no one to tell anything. They also cost time: Prefect's heartbeat thread sleeps in 1 s steps
and every flow run joins it on exit, up to 1 s per flow run (a ``post-train`` run is two flow
runs). Against a real server (``make serve``, ``PREFECT_API_URL`` set) they stay on.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def direct_run_settings() -> Iterator[None]:
    """Prefect settings for a flow run directly in this process: heartbeats off in ephemeral mode."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
