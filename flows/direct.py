"""Running a flow directly in this process (``compaction run``, ``make demo``, benchmarks), as
opposed to a deployment run started by a worker.

Without ``PREFECT_API_URL`` the flow talks to an ephemeral server that lives and dies with this
process, so flow-run heartbeats (which let a server mark a run whose process vanished as crashed)
have no one to tell anything. They also cost time: Prefect's heartbeat thread sleeps in 1 s steps
and every flow run joins it on exit, up to 1 s per flow run (a ``post-train`` run is two flow
runs). Against a real server (``make serve``, ``PREFECT_API_URL`` set) they stay on.

Once per process, before the first direct run, the modules every run imports on first use are
imported (Prefect's task engine, MLflow's SQLAlchemy model-registry store, GitPython, which MLflow's
run context reads): a fixed cost per process, like the ephemeral
server's start, which would otherwise land inside the first flow run's stages. Then the objects
that exist (Prefect, MLflow, pydantic and our modules: about a million), which live as long as the
process, are moved out of the cyclic garbage collector's sight (``gc.freeze``). Otherwise every
full collection walks them all, and the growth of a flow (importing
transformers in the first job) triggers several. They are handed back at exit (``atexit``), so
the interpreter's final collection still frees them: extension modules that count their objects
(Triton's nanobind bindings) would otherwise report them as leaked.

The ephemeral server itself is a subprocess that takes seconds to import Prefect's server and
start; the first Prefect client call starts it and waits. ``compaction run`` and ``compaction
demo`` call :func:`start_ephemeral_server` as soon as the params are valid, so that it boots on the
other core while this process imports the flows, torch and MLflow; ``direct_run_settings``
waits for it before the first flow run (a client call during the start would find the server
marked running but not yet answering). The measured costs: docs/performance.md, "Fixed costs".
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import threading
from typing import Iterator

#: Imported on first use by every flow run (the first task call, the first registry call, the
#: first MLflow run's git context); GitPython is optional for MLflow, hence the ImportError guard.
FIRST_USE_MODULES = ("prefect.task_engine", "mlflow.store.model_registry.sqlalchemy_store", "git")

_frozen = False
_server_start: threading.Thread | None = None


def start_ephemeral_server() -> None:
    """Without ``PREFECT_API_URL``: start Prefect's ephemeral server now, in a background thread
    (once per process); :func:`direct_run_settings` waits for it."""
    global _server_start
    from prefect.settings import PREFECT_API_URL

    if _server_start is not None or PREFECT_API_URL.value():
        return
    # Imported here, in the calling thread: two threads importing Prefect's modules at once can
    # trip the import system's deadlock detection.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's client uses (one per port; None = any)

    def start() -> None:
        try:
            server.start()
        except Exception:  # noqa: BLE001 (the client's own start retries and reports the error)
            pass

    _server_start = threading.Thread(target=start, name="prefect-ephemeral-server-start", daemon=True)
    _server_start.start()


def wait_for_ephemeral_server() -> None:
    if _server_start is not None:
        _server_start.join()


def prepare_process() -> None:
    """Once per process: import :data:`FIRST_USE_MODULES`, collect, then exempt every object alive
    now from later collections."""
    global _frozen
    if not _frozen:
        for name in FIRST_USE_MODULES:
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)
        _frozen = True


@contextlib.contextmanager
def direct_run_settings() -> Iterator[None]:
    """Prefect settings for a flow run directly in this process: heartbeats off in ephemeral mode;
    the process prepared (once); an ephemeral server started early, waited for."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    prepare_process()
    wait_for_ephemeral_server()
    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
