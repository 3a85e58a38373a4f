"""Pieces the training jobs (SFT, RLVR, OPSD) share: accelerator, schedule, batches, checkpoints.

Checkpoints are folders ``<out>/checkpoints/step-XXXXXXXX/`` holding ``state/`` (accelerate
``save_state``: weights, optimizer, scheduler, RNG of every process), ``trainer_state.json``
(step, data position; for the round stages, step = rounds done) and, for SFT, ``model/`` (HF
``save_pretrained``: loadable as a checkpoint on its own). Each is written under a temporary name and renamed into place by the
main process, so a killed job leaves only complete checkpoints; resume takes the latest.

The round stages write theirs through :class:`CheckpointWriter`, off the training path: where every
process holds whole tensors, the state is copied into host buffers kept for the job
(:class:`HostSnapshot`) and written to the stage folder by a background thread; under FSDP, accelerate
writes it into a staging folder in memory (``launcher.checkpoint_staging_dir``, a tmpfs), copied to
the stage folder by that thread. Either way the next rounds train while the disk is written, so
that a checkpoint costs the loop a memory copy, not a disk write (at Qwen3-8B: ~98 GB per checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

CKPT_PATTERN = re.compile(r"^step-(\d{8})$")
#: Written last into a checkpoint folder: a folder without it is not a checkpoint.
TRAINER_STATE = "trainer_state.json"


def make_accelerator(**kwargs):
    """fp32 on CPU, bf16 autocast on GPU; one process inline, many under `accelerate launch`."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no", **kwargs)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier: linear warmup, then cosine down to ``min_lr_ratio``."""
    warmup = max(1, int(round(warmup_ratio * total_steps))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def pad_batch(sequences: Sequence[Sequence[int]], score_from: Sequence[int], pad_id: int,
              score_to: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token sequences; ``score_mask`` marks tokens [score_from[i], score_to[i]) of row i."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    score = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        end = len(s) if score_to is None else score_to[i]
        score[i, score_from[i]: end] = True
    return {"input_ids": ids, "attention_mask": attn, "score_mask": score}


def placeholder_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A two-token batch scoring one token: the forward a process with no data left runs (its loss
    times 0), because DDP joins the gradient all-reduce only after a forward through the wrapper."""
    return pad_batch([[pad_id, pad_id]], [1], pad_id)


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """This process's share of a global batch (strided, so shares differ by at most one item)."""
    return list(items[rank::world])


def micro_batches(items: Sequence[Any], size: int, length: Callable[[Any], int] | None = None) -> list[list[Any]]:
    """``items`` in runs of ``size``. With ``length``, ordered by it first (a stable sort), so that
    each micro-batch pads to nearly its own rows' length: a loss summed over every micro-batch of
    a step is the same, and fewer padded positions are computed."""
    if length is not None:
        items = sorted(items, key=length)
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------- checkpoints
def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CKPT_PATTERN.match(p.name) and (p / TRAINER_STATE).is_file())


def latest_checkpoint(out_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


@contextlib.contextmanager
def collective_atomic_dir(accelerator, final: Path) -> Iterator[Path]:
    """Every process writes into one temporary folder; the main process renames it onto ``final``.

    The distributed twin of ``compaction.artifacts.atomic_dir``: all processes must enter
    (saving accelerate state and gathering FSDP weights are collective operations).
    """
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished folder in place of ``final`` (removed first: a rename cannot replace a folder)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, wrapped, tokenizer, out_dir: Path, state: dict, keep: int = 2,
                    hf_model: bool = True, extra: Callable[[Path], None] | None = None) -> Path:
    """Save accelerate state (weights, optimizer, scheduler, every process's RNG), the trainer
    state and, with ``hf_model``, an HF ``model/`` folder, atomically; keep the newest ``keep``.

    ``extra(tmp)`` writes what else a resume needs (an EMA teacher), inside the same atomic folder.
    ``trainer_state.json`` is written last: a folder without it is not a checkpoint.
    """
    final = out_dir / "checkpoints" / f"step-{state['step']:08d}"
    with collective_atomic_dir(accelerator, final) as tmp:
        accelerator.save_state(str(tmp / "state"))
        if hf_model:
            save_hf_model(accelerator, wrapped, tokenizer, tmp / "model")
        if extra is not None:
            extra(tmp)
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
    if accelerator.is_main_process:
        prune_checkpoints(out_dir, keep)
    return final


def copy_staged(src: Path, dst: Path) -> None:
    """Copy a staged checkpoint folder into ``dst`` (created), ``trainer_state.json`` last: a folder
    without it is not a checkpoint."""
    shutil.copytree(src, dst, ignore=lambda d, names: [TRAINER_STATE] if Path(d) == src else [],
                    dirs_exist_ok=True)
    if (src / TRAINER_STATE).is_file():
        shutil.copy2(src / TRAINER_STATE, dst / TRAINER_STATE)


STAGING_PREFIX = "compaction-checkpoint-"
#: The process that owns a staging folder (its pid), so that any later job can free an orphan's memory.
STAGING_OWNER = "owner.pid"


def staging_folder(staging_root: str | Path, out_dir: Path) -> Path:
    """Where a stage's checkpoints are staged: one folder per stage folder (and user)."""
    digest = hashlib.sha256(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]
    return Path(staging_root) / f"{STAGING_PREFIX}{os.getuid()}-{digest}"


def remove_orphan_staging(staging_root: str | Path) -> list[Path]:
    """Remove this user's staging folders whose owner process is gone (killed jobs'); returns them.
    tmpfs is memory: an orphan holds up to a checkpoint's size until removed."""
    removed = []
    for folder in Path(staging_root).glob(f"{STAGING_PREFIX}{os.getuid()}-*"):
        try:
            os.kill(int((folder / STAGING_OWNER).read_text()), 0)
            continue  # its owner is alive
        except (FileNotFoundError, ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class HostSnapshot:
    """A job's accelerate state (weights, optimizer and scheduler state) copied into host buffers that
    the first snapshot allocates and later ones reuse, for jobs whose processes hold whole tensors
    (one process, DDP: :meth:`supported`). Taking one is a copy into memory already touched, not a
    write of fresh tmpfs pages (bench/checkpoint_memory.py: 400 MB in ~0.03 s against 0.3-1.9 s);
    :meth:`write` then saves it, in a background thread, under accelerate's file names with its own
    ``save``, so ``Accelerator.load_state`` reads it. Tied weights stay one buffer (accelerate's
    safetensors save drops the duplicate name, as ``save_state`` does). The RNG states are not here:
    they are written at snapshot time by accelerate itself (:meth:`CheckpointWriter.save`)."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.weights: list[dict] = []
        self.optimizers: list[dict] = []
        self.schedulers: list[dict] = []

    @staticmethod
    def supported(accelerator) -> bool:
        """Whole tensors in every process, and nothing in the state but models, optimizers, schedulers."""
        from accelerate.utils import DistributedType

        whole = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                 DistributedType.MULTI_GPU)
        return whole and not (accelerator._custom_objects or accelerator._dataloaders or accelerator.scaler
                              or accelerator._save_model_state_pre_hook)

    def take(self, accelerator) -> None:
        """Copy the state now (main process: the one that writes)."""
        self.weights = [self._weights(i, accelerator.get_state_dict(m, unwrap=False))
                        for i, m in enumerate(accelerator._models)]
        self.optimizers = [self._copy(("optimizer", i), opt.state_dict())
                           for i, opt in enumerate(accelerator._optimizers)]
        self.schedulers = [copy.deepcopy(s.state_dict()) for s in accelerator._schedulers]

    def write(self, folder: Path) -> None:
        """What ``Accelerator.save_state`` writes but the RNG states, from the snapshot."""
        from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME, save

        folder.mkdir(parents=True, exist_ok=True)
        for i, state in enumerate(self.weights):
            save(state, folder / (SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")),
                 safe_serialization=True)
        for name, states in ((OPTIMIZER_NAME, self.optimizers), (SCHEDULER_NAME, self.schedulers)):
            for i, state in enumerate(states):
                save(state, folder / (f"{name}.bin" if i == 0 else f"{name}_{i}.bin"))

    def _buffer(self, key: tuple, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        return buf.copy_(t.detach())

    def _weights(self, i: int, state: dict) -> dict:
        out, seen = OrderedDict(), {}
        for name, t in state.items():
            same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if same not in seen:
                seen[same] = self._buffer(("model", i, name), t)
            out[name] = seen[same]
        return out

    def _copy(self, key: tuple, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._buffer(key, obj)
        if isinstance(obj, dict):
            return {k: self._copy((*key, k), v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy((*key, j), v) for j, v in enumerate(obj))
        return copy.deepcopy(obj)


class CheckpointWriter:
    """The round stages' checkpoints, written off the training path.

    :meth:`save` takes the checkpoint (accelerate state, the extras, the trainer state) and returns;
    a thread of the main process writes it into ``<out>/checkpoints/.step-XXXXXXXX.tmp``, renames that
    into place and keeps the newest ``keep``, while training goes on. :meth:`wait` (the next save, the
    end of the stage) joins it. How it is taken:

    - ``snapshot`` (where :meth:`HostSnapshot.supported`, with ``snapshot``): every process's RNG
      states and the extras are written into the temporary folder at once (kilobytes; an EMA
      teacher), the weights and optimizer state copied into host buffers, which the thread writes;
    - ``staged`` (FSDP, or ``snapshot`` off): ``accelerate.save_state`` into ``<staging>/<step>/``,
      a folder in memory, which the thread copies;
    - ``direct``: :func:`save_checkpoint`, the loop waiting for the disk, when ``staging_root`` is
      None or missing, when it has less free space than the checkpoint needs (staged), and when the
      job spans more than one node (each node's staging folder holds only its own processes' files).

    A checkpoint counts once it is in place: a job killed while one is written leaves the temporary
    folder, which is not a checkpoint (resume takes the one before), and, staged, its staging folder
    (with its owner's pid), which the next job of the same stage folder removes, as does any later
    job once that pid is gone (:func:`remove_orphan_staging`). Every process must call :meth:`save`
    and :meth:`wait` (they are collective)."""

    def __init__(self, accelerator, out_dir: Path, keep: int, staging_root: str | None, snapshot: bool = True):
        self.acc, self.out, self.keep = accelerator, Path(out_dir), keep
        one_node = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)) == accelerator.num_processes
        background = bool(staging_root) and Path(staging_root).is_dir() and one_node
        self.mode = "direct" if not background else (
            "snapshot" if snapshot and HostSnapshot.supported(accelerator) else "staged")
        self.staging: Path | None = None
        if background and accelerator.is_main_process:
            remove_orphan_staging(staging_root)  # killed jobs' staged checkpoints (this stage's too)
        if self.mode == "staged":
            self.staging = staging_folder(staging_root, self.out)
            if accelerator.is_main_process:
                shutil.rmtree(self.staging, ignore_errors=True)  # left by a killed job of this stage
        accelerator.wait_for_everyone()
        self.snapshot = HostSnapshot() if self.mode == "snapshot" and accelerator.is_main_process else None
        self.pending: Future | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-write") \
            if accelerator.is_main_process and self.mode != "direct" else None

    def staging_has_room(self, wrapped) -> bool:
        """Whether the staging folder can hold this checkpoint: weights, two Adam moments and an extra
        copy of the weights (an EMA teacher), with a quarter to spare; decided by the main process."""
        from accelerate.utils import broadcast_object_list

        weights = sum(p.numel() * p.element_size() for p in wrapped.parameters())
        need = 1.25 * 4 * weights * self.acc.num_processes
        decision = [self.acc.is_main_process and shutil.disk_usage(self.staging).free >= need]
        broadcast_object_list(decision)
        return bool(decision[0])

    def save(self, wrapped, tokenizer, state: dict, extra: Callable[[Path], None] | None = None) -> Path:
        """Checkpoint ``state['step']``; returns its final path (in place after :meth:`wait`)."""
        self.wait()
        final = self.out / "checkpoints" / f"step-{state['step']:08d}"
        if self.mode == "snapshot":
            return self._save_snapshot(final, state, extra)
        if self.staging is not None and self.acc.is_main_process and not self.staging.is_dir():
            self.staging.mkdir(parents=True)
            (self.staging / STAGING_OWNER).write_text(str(os.getpid()))
        if self.staging is None or not self.staging_has_room(wrapped):
            if self.staging is not None:
                from compaction.logs import get_logger

                get_logger().warning("checkpoint staging %s: not enough free space; writing %s directly",
                                     self.staging, final)
            return save_checkpoint(self.acc, wrapped, tokenizer, self.out, state, keep=self.keep, hf_model=False,
                                   extra=extra)
        staged = self.staging / final.name
        if self.acc.is_main_process:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(staged / "state"))
        if extra is not None:
            extra(staged)
        if self.acc.is_main_process:
            (staged / TRAINER_STATE).write_text(json.dumps(state))
        self.acc.wait_for_everyone()
        if self.pool is not None:
            self.pending = self.pool.submit(self.publish, staged, final)
        return final

    def _save_snapshot(self, final: Path, state: dict, extra: Callable[[Path], None] | None) -> Path:
        from accelerate.checkpointing import save_accelerator_state

        tmp = final.with_name(f".{final.name}.tmp")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "state").mkdir(parents=True)
        self.acc.wait_for_everyone()
        # Every process's RNG states, now, by accelerate (nothing else: no models or optimizers given).
        save_accelerator_state(str(tmp / "state"), [], [], [], [], self.acc.process_index, self.acc.step)
        if extra is not None:
            extra(tmp)
        if self.snapshot is not None:
            self.snapshot.take(self.acc)
        self.acc.wait_for_everyone()
        if self.pool is not None:
            self.pending = self.pool.submit(self.publish_snapshot, tmp, final, state)
        return final

    def publish_snapshot(self, tmp: Path, final: Path, state: dict) -> None:
        """Write the snapshot into the temporary folder, the trainer state last, rename it into place, prune."""
        self.snapshot.write(tmp / "state")
        (tmp / TRAINER_STATE).write_text(json.dumps(state))
        replace_dir(tmp, final)
        prune_checkpoints(self.out, self.keep)

    def publish(self, staged: Path, final: Path) -> None:
        """Copy a staged checkpoint to its temporary folder, rename it into place, prune, free the memory."""
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        copy_staged(staged, tmp)
        replace_dir(tmp, final)
        prune_checkpoints(self.out, self.keep)
        shutil.rmtree(staged, ignore_errors=True)

    def wait(self) -> None:
        """Until the checkpoint being copied is in place (a copy that failed raises here)."""
        if self.pending is not None:
            future, self.pending = self.pending, None
            future.result()
        self.acc.wait_for_everyone()

    def close(self) -> None:
        """At the end, also after a failure (not collective: other processes may be gone): let a write
        in flight end, and free the staging memory or the snapshot's buffers."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.snapshot = None
        if self.staging is not None and self.acc.is_main_process:
            shutil.rmtree(self.staging, ignore_errors=True)


def hf_state_dict(accelerator, wrapped) -> dict[str, torch.Tensor]:
    """The causal LM's weights under their HF names, from a prepared wrapper whose ``.model`` it is
    (a collective: the full state dict under FSDP, complete on the main process)."""
    state_dict = accelerator.get_state_dict(wrapped)
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state_dict.items()}


def save_hf_model(accelerator, wrapped, tokenizer, path: Path) -> None:
    """``save_pretrained`` of the causal LM inside a prepared wrapper (full state dict under FSDP)."""
    state_dict = hf_state_dict(accelerator, wrapped)
    inner = accelerator.unwrap_model(wrapped).model
    if accelerator.is_main_process:
        inner.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def publish_final(accelerator, wrapped, tokenizer, out_dir: Path, name: str = "final") -> Path:
    """Write the finished model to ``<out>/<name>`` atomically (temp folder, then rename)."""
    final = out_dir / name
    with collective_atomic_dir(accelerator, final) as tmp:
        save_hf_model(accelerator, wrapped, tokenizer, tmp)
    return final


class MetricsLog:
    """Per-step metrics: a JSON-lines file in the stage folder, MLflow when a run is active.

    On resume, lines past the resumed step are dropped (they were written after the last checkpoint).
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int = 0):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = [m for m in read_metrics(path) if m["step"] <= resume_step] if path.exists() and resume_step else []
            path.write_text("".join(json.dumps(m) + "\n" for m in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        from compaction.tracking import log_metrics_if_active

        log_metrics_if_active(metrics, step=step)


def read_metrics(path: str | Path) -> list[dict]:
    """The steps of a metrics.jsonl (:class:`MetricsLog`), in order."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln]
