"""What every stage task shares: the cache policy, result storage, the launcher, MLflow runs.

**Cache keys.** A stage's result depends on its input references (paths, ``models:/`` URIs made
local), the params sections it reads, and its code. :class:`StagePolicy` hashes exactly those:
the task's inputs except ``params`` (only the declared sections of it count) and the inputs
that do not change the result (the MLflow parent run), plus the source of the task function
and of its job module. The output folder is named by a hash of the same sections and references
(:func:`stage_key`). A record is only used while its output is still on disk: when the output
is missing, :func:`call` runs the task with ``refresh_cache`` and the record is rewritten.

**Results** are persisted as files under ``<artifacts>/prefect-results`` (an absolute path:
workers change directory; an unsaved LocalFileSystem block raises). Cache records are files,
so they survive a new Prefect database.

**Launcher.** ``launcher.kind: inline`` calls the job's ``run`` in-process, inside the stage's
MLflow run. ``accelerate`` runs ``accelerate launch -m jobs.X --params <resolved params file>``
in its own process group, streams its output into the Prefect run logger, raises with the last
lines of its output when it fails, and kills the whole group when the task fails, is cancelled
(Prefect turns SIGTERM into an exception) or its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.utilities.annotations import quote
from prefect.utilities.hashing import hash_objects

from compaction.artifacts import atomic_path
from compaction.grading import Grader, shared_grader
from compaction.params import Params, dump_params, load_params
from compaction.rounds import round_dir

RESULTS_DIR = "prefect-results"
PARAMS_DIR = "params"
#: Output lines of a failed accelerate job quoted in the error.
TAIL_LINES = 40


def grader_for(params: Params) -> Grader:
    """The grading workers shared by the inline jobs of this process (a flow's rounds and evaluations)."""
    return shared_grader(params.grading.workers, params.grading.timeout_s)


# ----------------------------------------------------------------------------- params
def load_flow_params(params: str, overrides: Sequence[str] = ()) -> Params:
    """The flow's params: a relative file resolves against ``$COMPACTION_HOME`` or the working
    directory (prefect.yaml's pull step sets it to the project); errors name the file and key."""
    path = Path(params)
    if not path.is_absolute():
        path = Path(os.environ.get("COMPACTION_HOME", os.getcwd())) / path
    return load_params(path, list(overrides or []))


def section_payload(params: Params, sections: Sequence[str], exclude: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The named sections as plain dicts, minus fields that do not change a stage's result.

    ``"rollout.batch_size"`` names one field of a section (a stage that reads only that field).
    """
    dumped = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name in sections:
        if "." in name:
            sec_name, field_name = name.split(".", 1)
            out[name] = dumped[sec_name][field_name]
            continue
        sec = dict(dumped[name])
        for f in (exclude or {}).get(name, ()):
            sec.pop(f, None)
        out[name] = sec
    return out


def stage_key(params: Params, sections: Sequence[str], refs: Mapping[str, Any],
              exclude: Mapping[str, Sequence[str]] | None = None) -> str:
    """Output folder key of a stage: its params sections and its input references (16 hex)."""
    payload = {"sections": section_payload(params, sections, exclude), "refs": dict(refs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def params_file(params: Params) -> Path:
    """The resolved params as YAML under ``<artifacts>/params/<hash>.yaml`` (for subprocesses)."""
    text = dump_params(params)
    path = Path(params.paths.artifacts) / PARAMS_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def results_dir(params: Params) -> Path:
    return Path(params.paths.artifacts) / RESULTS_DIR


# ----------------------------------------------------------------------------- cache
@functools.lru_cache(maxsize=None)
def _module_source_hash(module: str) -> str:
    """sha256 of a module's source, as ``inspect.getsource(module)`` reads it, without importing
    the module: keying a cached stage must not import its job (torch, transformers, accelerate)."""
    import importlib.util
    import linecache

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"no source for job module {module!r}")
    return hashlib.sha256("".join(linecache.getlines(spec.origin)).encode()).hexdigest()


@dataclass
class StagePolicy(CachePolicy):
    """Key = the task's reference inputs + the declared params sections + task and job source.

    ``ignore``: inputs that do not change the result (e.g. the MLflow parent run id).
    ``exclude``: section fields that do not change the result (e.g. ``rlvr.rounds`` for one round).
    ``valid``: ``valid(inputs) -> bool``; False (the output is gone) makes :func:`call` run the task
    with ``refresh_cache`` (its record is rewritten under the same key). Returning no key instead
    would not persist the new result, so the run after would execute the stage once more.
    """

    sections: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ("parent_run_id",)
    exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)
    job: str | None = None
    valid: Callable[[dict[str, Any]], bool] | None = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        return self.key_of(task_ctx.task.fn, inputs)

    def key_of(self, fn: Callable[..., Any], inputs: dict[str, Any]) -> str:
        """The cache key of task function ``fn`` called with ``inputs`` (the one Prefect computes)."""
        params: Params = inputs["params"]
        refs = {k: v for k, v in inputs.items() if k != "params" and k not in self.ignore}
        source = [_function_source(fn)]
        if self.job:
            source.append(_module_source_hash(self.job))
        return hash_objects(refs, section_payload(params, self.sections, self.exclude), source, raise_on_failure=True)


@functools.lru_cache(maxsize=None)
def _function_source(fn: Callable[..., Any]) -> str:
    """A task function's source, read once per process (``inspect.getsource`` re-reads its file)."""
    return inspect.getsource(fn)


def stage_task(name: str, policy: StagePolicy, **options: Any):
    """``@task`` with the stage's cache policy and persisted results (storage set per call)."""
    return task(name=name, cache_policy=policy, persist_result=True, **options)


def call(task_obj, params: Params, **inputs: Any):
    """Run a stage task with its results stored under the params' absolute artifacts folder; a
    cache record whose output is no longer on disk is not used (the task runs and rewrites it)."""
    valid = _output_valid(task_obj.cache_policy, {"params": params, **inputs})
    # quote: Prefect would otherwise walk the whole Params model looking for futures, at every call.
    return _with_storage(task_obj, results_dir(params), not valid)(params=quote(params), **inputs)


def _output_valid(policy, inputs: dict[str, Any]) -> bool:
    """Whether the stage's output for ``inputs`` is on disk (a policy without a check: yes)."""
    return policy.valid(inputs) if getattr(policy, "valid", None) else True


@functools.lru_cache(maxsize=256)
def _with_storage(task_obj, result_storage: Path, refresh_cache: bool):
    """``task_obj`` storing its results in ``result_storage``: one copy per (task, folder, refresh),
    since ``Task.with_options`` builds a new task (and reads its source) at every call."""
    return task_obj.with_options(result_storage=result_storage, refresh_cache=refresh_cache)


def is_cached(task_obj, params: Params, **inputs: Any) -> bool:
    """Whether :func:`call` with these inputs would be a cache hit: the task's cache record is in
    the result storage and its output is still on disk."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    policy: StagePolicy = task_obj.cache_policy
    inputs = {"params": params, **inputs}
    if not _output_valid(policy, inputs):
        return False
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(results_dir(params))))
    return store.exists(policy.key_of(task_obj.fn, inputs))


def call_rounds(task_obj, params: Params, rounds: int, out: Path, first_prev: str, **inputs: Any) -> dict | None:
    """Rounds ``0 .. rounds-1`` of a round stage (``round_`` k starts from ``prev``: ``first_prev``
    for round 0, else round k-1's folder in ``out``); returns the last round's result (None: no rounds).

    The loop starts at the last round that is a cache hit, so a rerun does not walk every completed
    round as a cached task run (~0.1 s each): a finished stage shows one cached round, a resumed one
    its last completed round (from the cache), then the rounds that run. A round's key chains on
    the previous round's folder, so a record of round k means rounds 0..k were done with this code
    and these params.
    """
    def round_inputs(k: int) -> dict[str, Any]:
        return {**inputs, "prev": first_prev if k == 0 else str(round_dir(out, k - 1)), "round_": k}

    start = next((k for k in range(rounds - 1, 0, -1) if is_cached(task_obj, params, **round_inputs(k))), 0)
    if start:
        get_run_logger().info("%s: rounds 0-%d of %d already done; round %d from the cache, not the rounds before it",
                              task_obj.name, start, rounds, start)
    last = None
    for k in range(start, rounds):
        last = call(task_obj, params, **round_inputs(k))
    return last


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


def run_subprocess(cmd: Sequence[str], env: Mapping[str, str], cwd: str | Path, logger) -> None:
    """Run ``cmd`` in its own process group, its output streamed line by line into ``logger``;
    raise :class:`JobFailed` with the last lines on a non-zero exit; kill the group on any exit
    path that leaves it running (task failure, cancellation)."""
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
        rc = proc.wait()
    finally:
        _kill_group(proc)
    if rc != 0:
        raise JobFailed(f"{cmd[cmd.index('-m') + 1] if '-m' in cmd else cmd[0]} exited with status {rc}; "
                        f"last lines of its output:\n" + "\n".join(tail))


def launch(params: Params, module: str, args: Sequence[str], inline: Callable[[], Any], run_id: str | None,
           stage: str, distributed: bool = True) -> float:
    """Run one job (inline or under accelerate); returns the seconds spent inside it.

    ``distributed=False``: a job that does not split its work over processes (evaluate) runs as
    one accelerate process, so N copies never write the same output."""
    logger = get_run_logger()
    if params.launcher.kind == "inline":
        return timed_job(stage, inline)[1]

    def accelerate() -> None:
        env = dict(os.environ)
        env["TQDM_DISABLE"] = "1"  # progress bars are carriage-return noise in a log
        env["PYTHONUNBUFFERED"] = "1"
        env["MLFLOW_TRACKING_URI"] = params.tracking.tracking_uri or ""
        if run_id:  # the job's log_metrics_if_active attaches to the stage run (compaction.tracking)
            env["MLFLOW_RUN_ID"] = run_id
        cmd = accelerate_command(params, module, args, processes=None if distributed else 1)
        run_subprocess(cmd, env, params.paths.root, logger)

    return timed_job(stage, accelerate)[1]


# ----------------------------------------------------------------------------- MLflow
@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def flow_run(params: Params, flow_name: str) -> Iterator[str]:
    """The flow run's parent MLflow run (nested under the calling flow's run for a subflow);
    yields its id."""
    from prefect.context import FlowRunContext

    from compaction import tracking

    ctx = FlowRunContext.get()
    fr = ctx.flow_run if ctx else None
    tags = {"study": params.study, "flow": flow_name, "prefect_flow_run_id": str(fr.id) if fr else "",
            "git_commit": git_commit()}
    name = f"{flow_name}-{fr.name}" if fr else flow_name
    with tracking.start_run(params.tracking, name, nested=True, tags=tags) as run:
        tracking.log_params(params.model_dump(mode="json"))
        try:
            yield run.info.run_id
        except BaseException:
            tracking.close_left_running(run.info.run_id, "FAILED")  # a stage that failed between rounds
            raise


#: Stage runs by (tracking URI, parent run, run name), as this process created or found them:
#: the rounds of a stage after the first skip the search.
_stage_runs: dict[tuple[str, str, str], str] = {}


def _stage_run_key(params: Params, parent_run_id: str, run_name: str) -> tuple[str, str, str]:
    return params.tracking.tracking_uri or "", parent_run_id, run_name


def _find_child(params: Params, parent_run_id: str, run_name: str) -> str | None:
    import mlflow

    from compaction import tracking

    key = _stage_run_key(params, parent_run_id, run_name)
    if key not in _stage_runs and not tracking.created_here(parent_run_id):
        # A parent made by this process has only the children this process made: no search.
        exp = tracking.ensure_experiment(params.tracking)
        runs = mlflow.MlflowClient().search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.mlflow.runName = '{run_name}'",
            max_results=1)
        if not runs:
            return None
        _stage_runs[key] = runs[0].info.run_id
    return _stage_runs.get(key)


@contextlib.contextmanager
def stage_run(params: Params, parent_run_id: str | None, run_name: str, tags: Mapping[str, str],
              log_sections: Sequence[str] = (), last_round: bool = True) -> Iterator[str]:
    """The stage's nested MLflow run under the flow's run: one per stage and flow run, so the
    rounds of RLVR / OPSD (one task each) log into the same run, step = round. Yields its id.
    A later round attaches to the run (:func:`compaction.tracking.attach_run`) instead of
    reopening it. The run stays RUNNING from round to round (``last_round=False``): the stage is
    running, and each round saves two status writes; the last round finishes it."""
    from compaction import tracking

    all_tags = {**tags, "git_commit": git_commit()}
    existing = _find_child(params, parent_run_id, run_name) if parent_run_id else None
    if existing:
        with tracking.attach_run(params.tracking, existing, finish=last_round, parent_run_id=parent_run_id) as run_id:
            yield run_id
        return
    with tracking.start_run(params.tracking, run_name, nested=True, tags=all_tags, parent_run_id=parent_run_id,
                            finish=last_round) as run:
        if parent_run_id:
            _stage_runs[_stage_run_key(params, parent_run_id, run_name)] = run.info.run_id
        if log_sections:
            tracking.log_params(section_payload(params, log_sections))
        yield run.info.run_id
