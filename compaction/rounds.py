"""What the round-based stages (RLVR, OPSD) share: the stage loop with its checkpoints, round
records, each round's problems, and on-policy generation that does not depend on the process layout.

**A stage is one job** (:func:`run_stage`): the policy, optimizer, teacher or reference and the
grader are set up once, then every round runs in the same process(es). A stage folder holds

- ``round-XXXX/``: each round's record (its Parquet files and ``metrics.json``, written last),
  written atomically; kilobytes, never a model;
- ``checkpoints/step-XXXXXXXX/`` (step = rounds done): accelerate state (weights, optimizer, every
  RNG), the stage's extras (an EMA teacher) and ``trainer_state.json``; written every
  ``save_every`` rounds and after the last one, the newest ``keep_checkpoints`` kept; taken in
  memory and written to disk while the next rounds train (``launcher.checkpoint_snapshot``,
  ``launcher.checkpoint_staging_dir``);
- ``final/``: the stage's output, one HF ``save_pretrained`` folder, written at the end;
- ``heldout/after-XXXX.json``: the held-out curve's point after XXXX rounds (``eval_every`` > 0);
- ``timings.json``: seconds of setup, each checkpoint and the final save (bench/scaling.py);
- with ``rollout.backend: vllm``, ``vllm/server.log`` (the job's server) and, while it runs,
  ``vllm/weights/`` (the policy's weights for the server to reload, or a subfolder of
  ``rollout.vllm_weights_dir``; removed at the end).

Rollouts come from the policy in this process (the HF engine) or from a vLLM server
(``rollout.backend: vllm``): one server per stage job, started on the starting policy in setup
(or ``rollout.vllm_url``), which reloads the policy's weights after every round's update (and
after a resume), so that every round samples from the policy it trains.

A killed job, restarted with the same command, resumes from its newest complete checkpoint and
redoes the rounds after it (their records are rewritten): the same weights, bitwise, as a run
that was never killed, because every round's randomness comes from seeds and restored RNG state.

Generation: the round's prompts are cut into fixed chunks, each sampled with its own seed
(:func:`chunk_seed`), and chunks are dealt to processes round-robin. So 1 and N processes
draw exactly the same rollouts, and a global loss normalisation then gives the same step.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from compaction.data import ROLLOUT_COLUMNS, load_problems
from compaction.artifacts import atomic_path
from compaction.logs import get_logger
from compaction.rollout import HFEngine, Sampling, generate_rollouts
from compaction.training import TRAINER_STATE, CheckpointWriter, hf_state_dict, latest_checkpoint, replace_dir

#: The stage's output folder (HF ``save_pretrained``); its config.json marks a finished stage.
FINAL_DIR = "final"
TIMINGS_FILE = "timings.json"
#: The held-out curve's points: ``heldout/after-XXXX.json`` (XXXX = rounds done).
HELDOUT_DIR = "heldout"


def round_dir(out: Path, round_: int) -> Path:
    return Path(out) / f"round-{round_:04d}"


def final_dir(out: Path) -> Path:
    return Path(out) / FINAL_DIR


def stage_finished(out: Path) -> bool:
    return (final_dir(out) / "config.json").is_file()


def rounds_policy_ref(out: Path, rounds_done: int) -> str:
    """What the rollouts' ``policy_ref`` names: the stage's policy after ``rounds_done`` rounds
    (held in memory; a checkpoint of it exists only every ``save_every`` rounds)."""
    return f"{out}@{rounds_done}"


class RoundStage:
    """A round-based stage inside one job. Subclasses set ``self.acc``, ``self.wrapped`` (the
    prepared module whose weights are the policy) and ``self.tokenizer`` in :meth:`setup`, and
    implement :meth:`round` and :meth:`save_final`; :meth:`save_extra` / :meth:`load_extra` add
    what a checkpoint needs beyond the accelerate state (the EMA teacher)."""

    #: The vLLM rollout engine (``rollout.backend: vllm``), set by :meth:`start_rollout_server`; None: HF.
    engine = None
    #: The held-out curve's problems, section and metric prefix (:meth:`setup_heldout`); None: off.
    heldout: tuple | None = None

    #: Writes the checkpoints (:class:`compaction.training.CheckpointWriter`), made after setup
    #: (which removes what a killed job left in the staging folder).
    checkpoints: CheckpointWriter | None = None

    def __init__(self, out: Path, keep_checkpoints: int, grader=None, launcher=None):
        # launcher: the params' `launcher` section (how checkpoints are written); None: straight to disk.
        self.out, self.keep, self.launcher = Path(out), keep_checkpoints, launcher
        self.grader = grader  # running workers shared with the caller's other jobs; None: the job's own
        self.resources = ExitStack()  # what close() releases: the job's own grading workers
        self.timings: dict[str, Any] = {"setup": 0.0, "resume": 0.0, "checkpoints": [], "final": 0.0,
                                        "checkpoint_wait": 0.0, "weight_syncs": []}

    def setup(self) -> None:
        raise NotImplementedError

    def round(self, k: int) -> dict[str, float]:
        """Round ``k``: rollouts -> grade -> (select ->) update -> record; returns its metrics."""
        raise NotImplementedError

    def save_final(self, path: Path) -> None:
        raise NotImplementedError

    def save_extra(self, tmp: Path) -> None:
        pass

    def load_extra(self, checkpoint: Path) -> None:
        pass

    def close(self) -> None:
        try:
            self.stop_rollout_server()
        finally:
            try:
                if self.checkpoints is not None:
                    self.checkpoints.close()
            finally:
                self.resources.close()

    def start_grader(self, grading) -> None:
        """Grading workers of the job's own (``grading.workers``), unless the caller passed its own."""
        if self.grader is None:
            from compaction.grading import Grader

            self.grader = self.resources.enter_context(Grader(grading.workers, grading.timeout_s))

    # ---------------------------------------------------------- held-out curve
    def setup_heldout(self, params, problems_path: str, cfg, prefix: str) -> None:
        """With ``cfg.eval_every`` > 0 (compaction.params.HeldoutEvalFields): the first
        ``cfg.eval_problems`` problems of the eval split, evaluated by :meth:`evaluate_heldout`."""
        if cfg.eval_every <= 0:
            return
        problems = load_problems(problems_path, "eval").head(cfg.eval_problems)
        if problems.empty:
            raise ValueError(f"{problems_path}: no eval split for the held-out curve ({prefix}.eval_every = "
                             f"{cfg.eval_every})")
        self.heldout = (problems, cfg, params, prefix)

    def generation_model(self):
        """The causal LM that samples in this process (the policy)."""
        return self.policy

    def heldout_due(self, done: int, rounds: int) -> bool:
        """Whether the held-out curve has a point after ``done`` rounds: before the first, every
        ``eval_every`` and after the last."""
        return self.heldout is not None and (done % self.heldout[1].eval_every == 0 or done == rounds)

    def evaluate_heldout(self, done: int) -> dict[str, float]:
        """The policy after ``done`` rounds on the held-out subset (a collective): avg@n accuracy and
        mean response tokens, logged with step = ``done``. Sampled by the HF engine over the policy
        in this process (a vLLM server holds the weights of the round before until its next sync),
        with the same seeds at every point."""
        from compaction.grading import grade_rollouts
        from compaction.tracking import log_metrics_if_active

        problems, cfg, params, prefix = self.heldout
        e = params.eval
        rollouts = generate_round_rollouts(
            self.acc, self.generation_model(), self.tokenizer, problems, samples_per_prompt=cfg.eval_samples,
            temperature=e.temperature, max_new_tokens=e.max_new_tokens, seed=e.seed, round_=0,
            policy_ref=rounds_policy_ref(self.out, done), enable_thinking=params.model.enable_thinking,
            batch_size=params.rollout.batch_size, decoder=params.rollout.hf_decoder,
            desc=f"{prefix} held-out eval after {done} rounds")
        grades = (grade_rollouts(rollouts, answers=problems[["problem_id", "answer"]], grader=self.grader)
                  if len(rollouts) else pd.DataFrame({"rollout_id": [], "correct": []}))
        rollouts, grades = gather_frames(rollouts, grades)
        metrics = {f"{prefix}/heldout_accuracy": float(grades["correct"].astype(float).mean()),
                   f"{prefix}/heldout_mean_response_tokens": float(rollouts["response_tokens"].mean())}
        if self.acc.is_main_process:
            with atomic_path(self.out / HELDOUT_DIR / f"after-{done:04d}.json") as tmp:
                tmp.write_text(json.dumps(metrics, indent=1))
            get_logger().info("%s held-out after %d rounds: accuracy %.3f, %.1f mean tokens (%d problems x %d)",
                              prefix, done, metrics[f"{prefix}/heldout_accuracy"],
                              metrics[f"{prefix}/heldout_mean_response_tokens"], len(problems), cfg.eval_samples)
            log_metrics_if_active(metrics, step=done)
        return metrics

    # ---------------------------------------------------------- vLLM rollouts
    def start_rollout_server(self, params, policy_ref: str) -> None:
        """With ``rollout.backend: vllm``: the stage's server on ``policy_ref`` (started by the main
        process, or ``rollout.vllm_url``), and every process's engine on it. Call after ``self.acc``
        and ``self.tokenizer`` are set; :meth:`stop_rollout_server` in ``close``."""
        if params.rollout.backend != "vllm":
            return
        from accelerate.utils import broadcast_object_list

        from compaction.rollout import VLLMServer, VLLMServerEngine, eos_token_ids, vllm_server

        server, url, error = None, [None], None
        if self.acc.is_main_process:
            try:
                server = vllm_server(policy_ref, params.rollout, params.model, log_path=self.out / "vllm" / "server.log")
                url = [server.url]
            except Exception as exc:  # every process must leave the broadcast below
                error = exc
        broadcast_object_list(url)
        if error is not None:
            raise error
        if url[0] is None:
            raise RuntimeError(f"{self.out}: the main process could not start the stage's vLLM server")
        if server is None:
            server = VLLMServer(policy_ref, url=url[0]).start()
        eos = eos_token_ids(policy_ref, self.tokenizer)
        self.engine = VLLMServerEngine(server, self.tokenizer, eos, owns_server=self.acc.is_main_process)
        self.weights_dtype = server.dtype
        scratch = params.rollout.vllm_weights_dir
        self.weights_dir = (self.out / "vllm" / "weights" if scratch is None else
                            Path(scratch) / hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:16])
        if server.external and self.acc.is_main_process:
            self.engine.reload(policy_ref)  # a running server may hold any weights
        self.acc.wait_for_everyone()

    def stop_rollout_server(self) -> None:
        import shutil

        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.close()
            shutil.rmtree(self.weights_dir, ignore_errors=True)

    def policy_weights(self) -> dict:
        """The policy's weights under HF names (a collective; complete on the main process)."""
        return hf_state_dict(self.acc, self.wrapped)

    def sync_rollout_weights(self) -> None:
        """vLLM: the main process writes the policy's weights and the server reloads them."""
        if self.engine is None:
            return
        from compaction.model import resolve_dtype
        from compaction.rollout import write_weights

        t = time.perf_counter()
        weights = self.policy_weights()
        if self.acc.is_main_process:
            folder = self.weights_dir
            tied = bool(getattr(self.acc.unwrap_model(self.wrapped).model.config, "tie_word_embeddings", False))
            write_weights(weights, folder, dtype=resolve_dtype(self.weights_dtype), tied_embeddings=tied)
            self.engine.reload(folder)
        self.acc.wait_for_everyone()
        self.timings["weight_syncs"].append(time.perf_counter() - t)

    def resume(self) -> int:
        """Restore the newest complete checkpoint; returns the rounds it has done (0: none)."""
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return 0
        self.acc.load_state(str(ckpt / "state"))
        self.load_extra(ckpt)
        return int(json.loads((ckpt / TRAINER_STATE).read_text())["step"])

    def checkpoint(self, rounds_done: int) -> Path:
        """Stage the checkpoint after ``rounds_done`` rounds; its copy to disk runs while training goes on."""
        return self.checkpoints.save(self.wrapped, self.tokenizer, {"step": rounds_done}, extra=self.save_extra)

    def finish_checkpoints(self) -> None:
        """Wait until the last checkpoint is on disk, in place."""
        if self.checkpoints is not None:
            self.checkpoints.wait()


def run_stage(stage: RoundStage, rounds: int, save_every: int,
              on_round: Callable[[int, int, dict], None] | None = None) -> Path:
    """The stage loop: setup once, resume, ``rounds`` rounds with a checkpoint every ``save_every``
    rounds and after the last, then the final folder. ``on_round(done, rounds, metrics)`` after
    each round (the task's progress artifact). A finished stage returns at once."""
    if stage_finished(stage.out):
        return final_dir(stage.out)
    t0 = time.perf_counter()
    try:
        stage.setup()
        launcher = stage.launcher
        stage.checkpoints = CheckpointWriter(stage.acc, stage.out, stage.keep,
                                             launcher.checkpoint_staging_dir if launcher else None,
                                             launcher.checkpoint_snapshot if launcher else True)
        t1 = time.perf_counter()
        start = stage.resume()
        stage.timings.update(setup=t1 - t0, resume=time.perf_counter() - t1, resumed_at=start)
        if start:
            get_logger().info("%s: resumed from its checkpoint after %d of %d rounds", stage.out, start, rounds)
            stage.sync_rollout_weights()
        elif stage.heldout_due(0, rounds):
            stage.evaluate_heldout(0)
        for k in range(start, rounds):
            metrics = stage.round(k)
            done = k + 1
            if stage.heldout_due(done, rounds):
                metrics.update(stage.evaluate_heldout(done))
            if done < rounds:
                stage.sync_rollout_weights()
            if done % save_every == 0 or done == rounds:
                t = time.perf_counter()
                stage.checkpoint(done)
                stage.timings["checkpoints"].append(time.perf_counter() - t)
            if on_round is not None:
                on_round(done, rounds, metrics)
        # The final folder is written while the last checkpoint is copied, and put in place after it:
        # a finished stage (its final folder) always has its last checkpoint.
        t = time.perf_counter()
        unpublished = stage.out / f".{FINAL_DIR}.unpublished"
        stage.save_final(unpublished)
        t1 = time.perf_counter()
        stage.finish_checkpoints()
        if stage.acc.is_main_process:
            replace_dir(unpublished, final_dir(stage.out))
        stage.acc.wait_for_everyone()
        stage.timings.update(final=t1 - t, checkpoint_wait=time.perf_counter() - t1)
        if stage.acc.is_main_process:
            with atomic_path(stage.out / TIMINGS_FILE) as tmp:
                tmp.write_text(json.dumps(stage.timings, indent=1))
    finally:
        stage.close()
    return final_dir(stage.out)


def round_problems(train: pd.DataFrame, round_: int, per_round: int, seed: int) -> pd.DataFrame:
    """The round's prompts: walk a seeded permutation of the train split, epoch after epoch.

    A round never holds a problem twice (a rollout's id would repeat): where the walk crosses an
    epoch onto a problem the round already has, that one is skipped; a round of a split smaller
    than ``per_round`` holds the whole split."""
    n = len(train)
    per_round = min(per_round, n)
    perms: dict[int, np.ndarray] = {}
    idx: list[int] = []
    pos = round_ * per_round
    while len(idx) < per_round:
        epoch, off = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        i = int(perms[epoch][off])
        pos += 1
        if i not in idx:
            idx.append(i)
    return train.iloc[idx].reset_index(drop=True)


def chunk_seed(seed: int, round_: int, chunk: int) -> int:
    return int(hashlib.sha256(f"{seed}:{round_}:{chunk}".encode()).hexdigest()[:8], 16)


def generate_round_rollouts(acc, model, tokenizer, problems: pd.DataFrame, *, samples_per_prompt: int,
                            temperature: float, max_new_tokens: int, seed: int, round_: int, policy_ref: str,
                            enable_thinking: bool, batch_size: int, desc: str, decoder: str = "auto",
                            engine=None) -> pd.DataFrame:
    """This process's share of the round's rollouts (with ``response_token_ids``).

    ``group`` = the prompt's position in the round: the unit of group statistics. ``batch_size``
    sequences per generate call; ``decoder`` as ``rollout.hf_decoder``; ``engine``: a vLLM engine
    holding the policy's weights (default: the HF engine over ``model``).
    """
    n = samples_per_prompt
    per_chunk = max(1, batch_size // n)
    chunks = [list(range(i, min(i + per_chunk, len(problems)))) for i in range(0, len(problems), per_chunk)]
    mine = [c for c in range(len(chunks)) if c % acc.num_processes == acc.process_index]
    was_training = model.training
    if engine is None:
        engine = HFEngine(model.eval(), tokenizer, batch_size=per_chunk * n, decoder=decoder)
    frames = []
    for c in tqdm(mine, desc=desc, disable=not acc.is_main_process):
        sampling = Sampling(n=n, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                            seed=chunk_seed(seed, round_, c))
        df = generate_rollouts(engine, tokenizer, problems.iloc[chunks[c]], sampling, policy_ref, round_,
                               enable_thinking, token_ids=True)
        frames.append(df.assign(group=np.repeat(chunks[c], n)))
    model.train(was_training)
    if not frames:  # more processes than generation chunks: this one samples nothing
        return pd.DataFrame(columns=[*ROLLOUT_COLUMNS, "response_token_ids", "group"])
    return pd.concat(frames, ignore_index=True)


def gather_frames(*frames: pd.DataFrame) -> list[pd.DataFrame]:
    """Every process's rows of each frame, concatenated (on every process: a collective)."""
    from accelerate.utils import gather_object

    return [pd.concat(gather_object([f]), ignore_index=True) for f in frames]
