"""The cache policy of every stage task: what a stage's result depends on, where records live.

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
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.utilities.annotations import quote
from prefect.utilities.hashing import hash_objects

from compaction.params import Params

RESULTS_DIR = "prefect-results"


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


def results_dir(params: Params) -> Path:
    return params.artifacts_dir / RESULTS_DIR


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
