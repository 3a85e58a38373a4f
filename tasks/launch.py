"""Launching a stage's job: in-process or under ``accelerate launch``, one slot of the job limit each.

``launcher.kind: inline`` calls the job's ``run`` in-process, inside the stage's MLflow run.
``accelerate`` runs ``accelerate launch -m jobs.X --params <resolved params file>`` in its own
process group, streams its output into the Prefect run logger (and each line to a callback: the
stage's progress), raises with the last lines of its output when it fails, and kills the whole
group when the task fails, is cancelled (Prefect turns SIGTERM into an exception) or its parent
dies (PR_SET_PDEATHSIG).

**Concurrency.** Every job holds a slot of the Prefect global concurrency limit
``compaction-jobs`` (``launcher.max_concurrent_jobs`` slots, created or resized by the flow), so
the condition branches a flow submits together, and the flows of one server, run at most that
many jobs at once. The branches of one process first queue locally, so a freed slot passes on at
once. In ephemeral mode (no ``PREFECT_API_URL``: ``compaction run``, ``make demo``) the server is
this process's own, and that local queue is the whole limit. Inline jobs, which share this
process, also take a process lock. With ``launcher.devices_per_job`` each accelerate job gets its
own GPUs (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefect import get_run_logger

from compaction.artifacts import atomic_path
from compaction.grading import Grader, shared_grader
from compaction.params import Params, dump_params

PARAMS_DIR = "params"
#: Output lines of a failed accelerate job quoted in the error.
TAIL_LINES = 40


def grader_for(params: Params) -> Grader:
    """The grading workers shared by the inline jobs of this process (a flow's rounds and evaluations)."""
    return shared_grader(params.grading.workers, params.grading.timeout_s)


def params_file(params: Params) -> Path:
    """The resolved params as YAML under ``<artifacts>/params/<hash>.yaml`` (for subprocesses)."""
    text = dump_params(params)
    path = params.artifacts_dir / PARAMS_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


# ----------------------------------------------------------------------------- job timing
#: (stage, seconds) of the stage work that ran in this process: each job call, and the report
#: (a stage that is never cached). bench/orchestration.py sums it; the flow tests read which ran.
JOB_SECONDS: list[tuple[str, float]] = []


_jobs_running = 0


def in_job() -> bool:
    """Whether a :func:`timed_job` is running in this process (bench/orchestration.py tells the
    bookkeeping calls outside jobs from the jobs' own)."""
    return _jobs_running > 0


def timed_job(stage: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``, its seconds recorded in :data:`JOB_SECONDS` under ``stage``; returns both."""
    global _jobs_running
    t0 = time.perf_counter()
    _jobs_running += 1
    try:
        out = fn()
    finally:
        _jobs_running -= 1
    seconds = time.perf_counter() - t0
    JOB_SECONDS.append((stage, seconds))
    return out, seconds


# ----------------------------------------------------------------------------- launcher
class JobFailed(RuntimeError):
    pass


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the launching process dies (Linux), so a killed flow
    leaves no accelerate job behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def accelerate_command(params: Params, module: str, args: Sequence[str], processes: int | None = None) -> list[str]:
    exe = Path(sys.executable).parent / "accelerate"
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "launch"] if exe.is_file() else launcher
    if params.launcher.accelerate_config:
        cfg = Path(params.launcher.accelerate_config)
        cfg = cfg if cfg.is_absolute() else Path(params.paths.root) / cfg
        if not cfg.is_file():
            raise FileNotFoundError(f"launcher.accelerate_config: {cfg}: no such file")
        cmd += ["--config_file", str(cfg)]
    cmd += ["--num_processes", str(processes or params.launcher.num_processes), "-m", module,
            "--params", str(params_file(params)), *args]
    return cmd


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_subprocess(cmd: Sequence[str], env: Mapping[str, str], cwd: str | Path, logger,
                   on_line: Callable[[str], None] | None = None) -> None:
    """Run ``cmd`` in its own process group, its output streamed line by line into ``logger`` (and
    ``on_line``); raise :class:`JobFailed` with the last lines on a non-zero exit; kill the group on
    any exit path that leaves it running (task failure, cancellation)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    logger.info("launch: %s", " ".join(cmd))
    proc = subprocess.Popen(list(cmd), env=dict(env), cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.info("%s", line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    finally:
        _kill_group(proc)
    if rc != 0:
        raise JobFailed(f"{cmd[cmd.index('-m') + 1] if '-m' in cmd else cmd[0]} exited with status {rc}; "
                        f"last lines of its output:\n" + "\n".join(tail))


# ----------------------------------------------------------------------------- progress
#: The round line every round stage logs ("rlvr round 3 of 80: ...", "opsd round 3 of 30 [correct]: ...").
ROUND_LINE = re.compile(r"\bround (\d+) of (\d+)\b")


class StageProgress:
    """A Prefect progress artifact of a running stage, advanced after every round: called as the
    job's ``on_round(done, total, metrics)`` (inline), or fed the job's output lines (accelerate)."""

    def __init__(self, key: str, description: str):
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = create_progress_artifact(0.0, key=key, description=description)
        self.percent = 0.0

    def __call__(self, done: int, total: int, metrics: Mapping[str, float] | None = None) -> None:
        from prefect.artifacts import update_progress_artifact

        percent = 100.0 * done / max(total, 1)
        if percent > self.percent:
            update_progress_artifact(self.artifact_id, percent)
            self.percent = percent

    def line(self, text: str) -> None:
        m = ROUND_LINE.search(text)
        if m:
            self(int(m.group(1)) + 1, int(m.group(2)))


# ----------------------------------------------------------------------------- job slots
#: The Prefect global concurrency limit every job holds a slot of.
JOB_LIMIT = "compaction-jobs"
#: Seconds a slot's lease lasts without renewal (renewed every 3/4 of it while the job runs): a
#: process killed with its slot frees it after this long. 60 s is the server's minimum; Prefect's
#: default, 300 s, would stall the rerun of a killed flow for five minutes.
JOB_LEASE_S = 60.0
#: Inline jobs share this process (its torch threads, its grading workers): one at a time.
_inline_lock = threading.Lock()


def _server_shared() -> bool:
    """Whether flows of other processes can share this process's Prefect server (``PREFECT_API_URL``
    set: ``make serve``, a worker). An ephemeral server lives and dies with this process, so there
    the process's own queue is the whole limit."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def ensure_job_limit(params: Params) -> None:
    """Create or resize the global limit to ``launcher.max_concurrent_jobs`` slots (the flow, once)."""
    from prefect import get_client

    if not _server_shared():
        return
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(JOB_LIMIT, params.launcher.max_concurrent_jobs)


#: This process's own queue for the same slots: a branch refused by the Prefect limit polls it again
#: only after the server's "retry after" (up to 30 s, about a job's length), so the branches of one
#: flow first queue here, where a freed slot is handed on at once, and then take the Prefect slot,
#: which is then free unless another flow process holds it.
_local_slots: dict[int, threading.BoundedSemaphore] = {}
_local_slots_lock = threading.Lock()


@contextlib.contextmanager
def job_slot(params: Params) -> Iterator[None]:
    """Hold one slot of :data:`JOB_LIMIT` (after this process's queue, and the inline lock for an
    inline job) while a job runs. In ephemeral mode the process's queue alone: taking a slot from
    a server on SQLite collides with its recorder's writes of the task run that just ended
    (``database is locked``, retried after 2 s), a stall before every other job for nothing."""
    from prefect.concurrency.sync import concurrency

    n = params.launcher.max_concurrent_jobs
    with _local_slots_lock:
        local = _local_slots.setdefault(n, threading.BoundedSemaphore(n))
    inline = _inline_lock if params.launcher.kind == "inline" else contextlib.nullcontext()
    shared = (concurrency(JOB_LIMIT, occupy=1, lease_duration=JOB_LEASE_S, strict=False) if _server_shared()
              else contextlib.nullcontext())
    with local, inline, shared:
        yield


class DevicePool:
    """Disjoint GPU sets for concurrent accelerate jobs of this process: ``devices_per_job`` of the
    visible devices each, handed out and taken back under a condition variable."""

    def __init__(self, devices: Sequence[str], per_job: int):
        if per_job > len(devices):
            raise ValueError(f"launcher.devices_per_job={per_job}: only {len(devices)} GPU(s) visible")
        self.free = [list(devices[i: i + per_job]) for i in range(0, len(devices) - per_job + 1, per_job)]
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def take(self) -> Iterator[list[str]]:
        with self.cond:
            while not self.free:
                self.cond.wait()
            group = self.free.pop(0)
        try:
            yield group
        finally:
            with self.cond:
                self.free.append(group)
                self.cond.notify()


_device_pools: dict[int, DevicePool] = {}


def visible_devices() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def job_devices(params: Params) -> Iterator[dict[str, str]]:
    """The environment that gives an accelerate job its own GPUs (none without devices_per_job)."""
    per_job = params.launcher.devices_per_job
    if per_job is None:
        yield {}
        return
    pool = _device_pools.setdefault(per_job, DevicePool(visible_devices(), per_job))
    with pool.take() as group:
        yield {"CUDA_VISIBLE_DEVICES": ",".join(group)}


# ----------------------------------------------------------------------------- launch
def launch(params: Params, module: str, args: Sequence[str], inline: Callable[[], Any], run_id: str | None,
           stage: str, distributed: bool = True, progress: StageProgress | None = None) -> float:
    """Run one job (inline or under accelerate) in a job slot; returns the seconds spent inside it.

    ``distributed=False``: a job that does not split its work over processes (evaluate) runs as
    one accelerate process, so N copies never write the same output. ``progress``: advanced from
    the job's round lines (an inline job calls it itself)."""
    logger = get_run_logger()
    if params.launcher.kind == "inline":
        with job_slot(params):
            return timed_job(stage, inline)[1]

    def accelerate() -> None:
        env = dict(os.environ)
        env["TQDM_DISABLE"] = "1"  # progress bars are carriage-return noise in a log
        env["PYTHONUNBUFFERED"] = "1"
        env["MLFLOW_TRACKING_URI"] = params.tracking.tracking_uri or ""
        if run_id:  # the job's log_metrics_if_active attaches to the stage run (compaction.tracking)
            env["MLFLOW_RUN_ID"] = run_id
        cmd = accelerate_command(params, module, args, processes=None if distributed else 1)
        with job_devices(params) as devices:
            run_subprocess(cmd, {**env, **devices}, params.paths.root, logger,
                           on_line=progress.line if progress else None)

    with job_slot(params):
        return timed_job(stage, accelerate)[1]
