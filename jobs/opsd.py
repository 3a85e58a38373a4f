"""Stage opsd: on-policy self-distillation, in rounds of rollouts -> grade -> select -> update.

    python -m jobs.opsd --params params/demo.yaml --policy RLVR_CKPT --problems PROBLEMS \\
                        --out OUT --condition correct
    accelerate launch --config_file params/accelerate/cpu-2proc.yaml -m jobs.opsd ...   # same code

The method (docs/design.md, "The method, precisely"): the student samples its own responses y to
training problems; the verifier grades them; the condition (`all`, `correct`, `incorrect`, by
rollout or by group) picks the rollouts that enter the loss; the teacher, the same architecture
prompted with the problem *plus a privileged context* (reference solution, final answer, or a
template), scores the same y; the loss is a per-token divergence between the two next-token
distributions over the full vocabulary (`opsd.divergence`), averaged over every selected
response token, with the gradient through the student only. `baseline` trains nothing: the job
returns the policy it was given.

Teacher weights (`opsd.teacher`): `frozen` = the policy OPSD started from, `live` = the current
student under no_grad, `ema` = an exponential average of the student, updated after every
optimizer step. With `opsd.lora` only a LoRA adapter trains, and the frozen teacher is the same
model with the adapter disabled.

The stage is one job (compaction/rounds.py): the student, optimizer, teacher and grading workers
are set up once, then every round runs in this process. ``<out>/round-XXXX/`` gets the round's
record (rollouts, grades, selected and redundancy_map Parquet, metrics.json), ``<out>/checkpoints/``
a resumable checkpoint (accelerate state, the EMA teacher) every ``opsd.save_every`` rounds, and
``<out>/final/`` the trained model at the end (LoRA merged in; the adapter alone in
``final/adapter/``). A killed job, restarted with the same command, resumes from its newest
checkpoint. With ``--pool`` (unit `pool`: group filtering's Parquet of prompts) the rounds draw
their prompts from that pool only. Generation is layout-independent as in RLVR, and the loss is
normalised by the global token count, so 1 and N processes take the same step.
"""

from __future__ import annotations

from contextlib import nullcontext
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import safetensors.torch

from compaction.artifacts import read_parquet, write_parquet
from compaction.data import GRADE_COLUMNS, load_problems
from compaction.distillation import (
    DistillationStudent, Pair, add_lora, build_pairs, check_context, check_solutions, ema_update, lora_scalings,
    merged_lora_weights, pack_pairs, response_hidden, teacher_prompt,
)
from compaction.grading import Grader, grade_rollouts
from compaction.logs import get_logger
from compaction.metrics import epistemic_rate, response_length_stats
from compaction.model import load_model, load_tokenizer
from compaction.params import Params
from compaction.redundancy_map import MAP_FILE, choose_rollouts, map_frame
from compaction.rounds import (
    RoundStage, gather_frames, generate_round_rollouts, round_dir, round_problems, rounds_policy_ref, run_stage,
)
from compaction.scoring import causal_lm, lm_head_weight
from compaction.selection import CONDITIONS, SELECTED_COLUMNS, select_rollouts
from compaction.tracking import log_metrics_if_active
from compaction.training import collective_atomic_dir, make_accelerator, micro_batches, save_hf_model
from jobs.common import params_from, parse, parser

#: The EMA teacher's weights in a checkpoint (the frozen teacher is the starting policy).
TEACHER_FILE = "ema_teacher.safetensors"


class OPSDStage(RoundStage):
    """setup (once) -> per round: rollouts -> grade -> select -> update -> record -> (checkpoint) -> final."""

    def __init__(self, params: Params, policy_ref: str, problems_path: str, out: Path, condition: str,
                 pool_path: str | None = None, grader: Grader | None = None):
        super().__init__(out, params.opsd.keep_checkpoints, grader, launcher=params.launcher)
        self.p, self.cfg = params, params.opsd
        self.policy_ref, self.problems_path, self.pool_path = policy_ref, problems_path, pool_path
        self.condition = condition
        self.log = get_logger()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.acc = acc = make_accelerator()
        self.tokenizer = load_tokenizer(self.policy_ref)
        model = self._load(self.policy_ref)
        if cfg.lora:  # the base is the starting policy; only the adapter trains
            model = add_lora(model, cfg.lora_rank)
        student = DistillationStudent(model, cfg.divergence, cfg.beta, cfg.temperature, cfg.clip,
                                      backend=self.p.model.kernel_backend)
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.student, self.optimizer = acc.prepare(student, optimizer)
        self.wrapped = self.student
        self.teacher = self._load_teacher()
        train = load_problems(self.problems_path, "train")
        self.train = train.drop_duplicates("problem_id").set_index("problem_id", drop=False)
        self.prompts = train if self.pool_path is None else pool_prompts(train, self.pool_path)
        if self.prompts.empty:
            self.log.warning("opsd [%s]: the prompt pool %s is empty: every round is empty, the model unchanged",
                             self.condition, self.pool_path)
        self._teacher_prompts: dict[str, str] = {}
        self.start_grader(self.p.grading)
        self.setup_heldout(self.p, self.problems_path, cfg, "opsd")
        if not self.prompts.empty:  # an empty pool samples nothing: no server to start
            self.start_rollout_server(self.p, self.policy_ref)

    def policy_weights(self) -> dict:
        """The student's weights under HF names, LoRA merged in (a collective)."""
        if not self.cfg.lora:
            return super().policy_weights()
        state = self.acc.get_state_dict(self.student)
        return merged_lora_weights(state.items(), lora_scalings(self.policy)) if self.acc.is_main_process else {}

    def _load(self, ref: str):
        return load_model(ref, dtype="float32", device=self.acc.device,
                          attn_implementation=self.p.model.attn_implementation)

    def _load_teacher(self):
        """A teacher model of its own (frozen; ema, starting from the policy), or None when the
        teacher is the student's own weights (live; frozen with LoRA: the adapter disabled)."""
        cfg = self.cfg
        if cfg.teacher == "live" or (cfg.teacher == "frozen" and cfg.lora):
            return None
        return self._load(self.policy_ref).eval().requires_grad_(False)

    # ----------------------------------------------------------- checkpoint
    def save_extra(self, tmp: Path) -> None:
        """The EMA teacher, which no accelerate state holds."""
        if self.cfg.teacher == "ema" and self.acc.is_main_process:
            safetensors.torch.save_model(self.teacher, str(tmp / TEACHER_FILE))  # tied weights: save_model

    def load_extra(self, checkpoint: Path) -> None:
        if self.cfg.teacher == "ema":
            path = checkpoint / TEACHER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the checkpoint's EMA teacher is missing (opsd.teacher=ema)")
            safetensors.torch.load_model(self.teacher, str(path), device=str(self.acc.device))

    @property
    def policy(self):
        """The student LM (a peft model with LoRA), unwrapped from DDP/FSDP."""
        return self.acc.unwrap_model(self.student).model

    def generation_model(self):
        return causal_lm(self.policy)

    def teacher_prompts(self, problem_ids) -> dict[str, str]:
        for pid in problem_ids:
            if pid not in self._teacher_prompts:
                self._teacher_prompts[pid] = teacher_prompt(self.tokenizer, self.cfg, self.train.loc[pid],
                                                            self.p.model.enable_thinking)
        return self._teacher_prompts

    # ---------------------------------------------------------------- round
    def round(self, k: int) -> dict[str, float]:
        t0 = time.perf_counter()
        problems = (round_problems(self.prompts, k, self.cfg.prompts_per_round, self.cfg.seed) if len(self.prompts)
                    else self.prompts)
        rollouts = self.rollouts(problems, k)
        t1 = time.perf_counter()
        grades = self.grade(rollouts, problems)
        selected = self.select(rollouts, grades)
        t2 = time.perf_counter()
        stats, divergences = self.update(rollouts, selected, k)
        t3 = time.perf_counter()
        stats.update({"opsd/generate_seconds": t1 - t0, "opsd/grade_seconds": t2 - t1,
                      "opsd/update_seconds": t3 - t2, "opsd/rollout_seconds": t2 - t0, "opsd/seconds": t3 - t0})
        return self.record(k, rollouts, grades, selected, stats, divergences)

    # ------------------------------------------------------------- rollouts
    def rollouts(self, problems: pd.DataFrame, k: int) -> pd.DataFrame:
        cfg = self.cfg
        return generate_round_rollouts(
            self.acc, causal_lm(self.policy), self.tokenizer, problems,
            samples_per_prompt=cfg.samples_per_prompt, temperature=cfg.sample_temperature,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, round_=k, policy_ref=rounds_policy_ref(self.out, k),
            enable_thinking=self.p.model.enable_thinking, batch_size=self.p.rollout.batch_size,
            decoder=self.p.rollout.hf_decoder, desc=f"opsd round {k} rollouts", engine=self.engine)

    # ---------------------------------------------------------------- grade
    def grade(self, rollouts: pd.DataFrame, problems: pd.DataFrame) -> pd.DataFrame:
        if rollouts.empty:  # an empty pool: nothing to grade
            return pd.DataFrame(columns=list(GRADE_COLUMNS))
        return grade_rollouts(rollouts, answers=problems[["problem_id", "answer"]], grader=self.grader,
                              workers=self.p.grading.workers, timeout_s=self.p.grading.timeout_s)

    # --------------------------------------------------------------- select
    def select(self, rollouts: pd.DataFrame, grades: pd.DataFrame) -> pd.DataFrame:
        if rollouts.empty:
            return pd.DataFrame(columns=list(SELECTED_COLUMNS))
        # A group's samples come from one generation chunk, so each process holds whole groups.
        return select_rollouts(rollouts, grades, self.condition, self.cfg.unit, self.cfg.group_threshold)

    # --------------------------------------------------------------- update
    def teacher_rows(self, batch: dict):
        """The teacher's hidden rows at y's positions and its LM head weight, without gradient."""
        cfg, model = self.cfg, self.teacher
        adapter_off = nullcontext()
        if model is None:  # the student's own weights: live, or the LoRA base for a frozen teacher
            model = self.policy
            if cfg.lora and cfg.teacher == "frozen":
                adapter_off = model.disable_adapter()
        with torch.no_grad(), self.acc.autocast(), adapter_off:
            rows, targets = response_hidden(model, batch)
        return rows, lm_head_weight(model).detach(), targets

    def update(self, rollouts: pd.DataFrame, selected: pd.DataFrame, k: int) -> tuple[dict[str, float], np.ndarray]:
        """`steps_per_round` optimizer steps on the selected rollouts; returns the stats and the
        first step's per-token divergences of every process (for the metrics)."""
        cfg, acc = self.cfg, self.acc
        chosen = rollouts[rollouts["rollout_id"].isin(set(selected["rollout_id"]))]
        pairs = build_pairs(self.tokenizer, chosen, self.teacher_prompts(chosen["problem_id"].unique()))
        local = torch.tensor([len(pairs), sum(p.n_tokens for p in pairs)], dtype=torch.float64, device=acc.device)
        n_seqs, n_tokens = acc.reduce(local, "sum").tolist()
        stats = {"opsd/selected_rollouts": n_seqs, "opsd/selected_tokens": n_tokens, "opsd/empty_round": 0.0}
        if n_tokens == 0:
            self.log.info("opsd round %d: condition %r selected no rollout; the model is unchanged",
                          k, self.condition)
            return {**stats, "opsd/empty_round": 1.0, "opsd/loss": 0.0, "opsd/grad_norm": 0.0}, np.empty(0)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        batches = micro_batches(pairs, cfg.micro_batch_size,
                                length=lambda p: len(p.student_ids) + len(p.teacher_ids))
        loss_sum, first_values = 0.0, []
        for step in range(cfg.steps_per_round):
            # Every process must join each collective: pad the shorter lists with empty batches.
            n_micro = int(acc.reduce(torch.tensor(len(batches), device=acc.device), "max").item())
            for m in range(n_micro):
                ctx = acc.no_sync(self.student) if m < n_micro - 1 else nullcontext()
                with ctx:
                    if m < len(batches):
                        values = self.divergences(batches[m])
                        loss = values.sum() / n_tokens  # mean over every selected token of every process
                        if step == 0:
                            first_values.append(values.detach().float().cpu().numpy())
                    else:
                        # Nothing left on this process: a zero loss, but through the wrapped forward,
                        # so that DDP still joins the gradient all-reduce of the other processes.
                        loss = self.divergences([self._placeholder_pair()]).sum() * 0.0
                    acc.backward(loss * acc.num_processes)  # DDP averages gradients over processes
                loss_sum += float(loss.detach())
            grad_norm = acc.clip_grad_norm_(trainable, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.teacher == "ema":
                ema_update(self.teacher, self._student_weights(), cfg.ema_decay)
        total = acc.reduce(torch.tensor(loss_sum, dtype=torch.float64, device=acc.device), "sum").item()
        from accelerate.utils import gather_object

        values = np.concatenate(gather_object([np.concatenate(first_values) if first_values else np.empty(0)]))
        stats.update({"opsd/loss": total / cfg.steps_per_round, "opsd/grad_norm": float(grad_norm)})
        return stats, values

    def divergences(self, pairs: list[Pair]) -> torch.Tensor:
        """Per-token divergences [N] of a micro-batch: teacher rows without gradient, student with."""
        student_batch, teacher_batch = pack_pairs(pairs, self.tokenizer.pad_token_id, self.acc.device)
        t_rows, t_weight, t_targets = self.teacher_rows(teacher_batch)
        return self.student(**student_batch, teacher_hidden=t_rows, teacher_weight=t_weight, teacher_targets=t_targets)

    def _placeholder_pair(self) -> Pair:
        pad = self.tokenizer.pad_token_id
        return Pair("", [pad, pad], 1, [pad, pad], 1)

    def _student_weights(self) -> dict[str, torch.Tensor]:
        """The student's effective weights by HF name (LoRA deltas merged in)."""
        if self.cfg.lora:
            return merged_lora_weights(causal_lm(self.policy).named_parameters(), lora_scalings(self.policy))
        return dict(self.policy.named_parameters())

    # --------------------------------------------------------------- record
    def record(self, k: int, rollouts: pd.DataFrame, grades: pd.DataFrame, selected: pd.DataFrame, metrics: dict,
               divergences: np.ndarray) -> dict[str, float]:
        """``round-XXXX/``: the round's Parquet files and metrics (no model), its log line and its
        MLflow metrics (step = round)."""
        acc = self.acc
        all_rollouts, all_grades, all_selected = gather_frames(rollouts, grades, selected)
        order = all_rollouts.sort_values(["group", "sample_index"]).index
        all_rollouts, all_grades = all_rollouts.loc[order], all_grades.loc[order]
        position = {rid: i for i, rid in enumerate(all_rollouts["rollout_id"])}
        all_selected = all_selected.sort_values("rollout_id", key=lambda s: s.map(position))
        redundancy = self.redundancy_map(all_rollouts, all_grades, k)  # every process: forward passes
        with collective_atomic_dir(acc, round_dir(self.out, k)) as tmp:
            if acc.is_main_process:
                write_parquet(all_rollouts, tmp / "rollouts.parquet")
                write_parquet(all_grades, tmp / "grades.parquet")
                write_parquet(all_selected, tmp / "selected.parquet")
                if redundancy is not None:
                    write_parquet(redundancy, tmp / MAP_FILE)
                metrics.update(self._round_metrics(all_rollouts, all_grades, all_selected, divergences))
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))  # last: marks the round done
        if acc.is_main_process:
            _log_round(k, self.cfg.rounds, self.condition, metrics)
        return metrics

    # ----------------------------------------------------------------- save
    def save_final(self, path: Path) -> None:
        """``final/``: the trained model (LoRA merged in, so every later stage loads a plain HF
        checkpoint) and, with LoRA, ``final/adapter/`` (the peft adapter alone, for peft / vLLM)."""
        acc = self.acc
        with collective_atomic_dir(acc, path) as tmp:
            if not self.cfg.lora:
                save_hf_model(acc, self.student, self.tokenizer, tmp)
                return
            merged = self.policy_weights()
            if acc.is_main_process:
                causal_lm(self.policy).save_pretrained(tmp, state_dict=merged, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                self.policy.save_pretrained(tmp / "adapter")

    def redundancy_map(self, rollouts: pd.DataFrame, grades: pd.DataFrame, k: int) -> pd.DataFrame | None:
        """Per-token divergences (no clip) of a fixed, seeded choice of round 0's rollouts, scored by
        this round's updated student and its teacher: the same texts in every round."""
        from kernels import linear_divergence

        cfg = self.cfg
        if cfg.redundancy_map_samples == 0:
            return None
        if k > 0:
            first = round_dir(self.out, 0)
            rollouts, grades = read_parquet(first / "rollouts.parquet"), read_parquet(first / "grades.parquet")
        if rollouts.empty:
            return None
        sample = choose_rollouts(rollouts, grades, cfg.redundancy_map_samples, cfg.seed)
        pairs = build_pairs(self.tokenizer, sample, self.teacher_prompts(sample["problem_id"].unique()))
        values = []
        for mb in micro_batches(pairs, cfg.micro_batch_size):
            student_batch, teacher_batch = pack_pairs(mb, self.tokenizer.pad_token_id, self.acc.device)
            t_rows, t_weight, _ = self.teacher_rows(teacher_batch)
            with torch.no_grad(), self.acc.autocast():
                s_rows, targets = response_hidden(self.policy, student_batch)
                # The torch backend: the reference per-token values (a few rollouts, any device).
                v = linear_divergence(s_rows, lm_head_weight(self.policy), t_rows, t_weight, kind=cfg.divergence,
                                      beta=cfg.beta, temperature=cfg.temperature, targets=targets, backend="torch")
            values.append(v.float().cpu().numpy())
        flat = np.concatenate(values) if values else np.empty(0)
        per_rollout = np.split(flat, np.cumsum([p.n_tokens for p in pairs])[:-1]) if pairs else []
        return map_frame(sample, per_rollout, self.tokenizer)

    def _round_metrics(self, rollouts: pd.DataFrame, grades: pd.DataFrame, selected: pd.DataFrame,
                       divergences: np.ndarray) -> dict[str, float]:
        total = len(rollouts)
        lengths = response_length_stats(rollouts)
        fraction = len(selected) / total if total else float("nan")
        d = divergences
        return {
            "opsd/accuracy": float(grades["correct"].astype(float).mean()) if total else float("nan"),
            "opsd/selected_fraction": fraction,
            "opsd/kept_fraction": fraction,  # the same number (docs/design.md, "Tracking and the report")
            **{f"opsd/{k}": v for k, v in lengths.items()},
            "opsd/epistemic_rate": epistemic_rate(rollouts["response"], rollouts["response_tokens"].sum(),
                                                  self.p.eval.epistemic_markers),
            "opsd/divergence_mean": float(d.mean()) if d.size else float("nan"),
            "opsd/divergence_p50": float(np.percentile(d, 50)) if d.size else float("nan"),
            "opsd/divergence_p90": float(np.percentile(d, 90)) if d.size else float("nan"),
            "opsd/divergence_max": float(d.max()) if d.size else float("nan"),
        }


def check_job(params: Params, problems_path: str, condition: str, pool_path: str | None = None) -> None:
    """Everything that can be wrong before any work: the condition, a pool missing for unit `pool`
    (or its problems outside the train split), the context template, missing reference
    solutions (missing_solution: error), peft for LoRA, an empty train split."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
    cfg = params.opsd
    if cfg.unit == "pool" and pool_path is None and condition != "all":
        raise ValueError(f"opsd.unit=pool: condition {condition!r} needs its prompt pool (--pool, group filtering's "
                         "Parquet: the compaction flow writes it); or set opsd.unit=rollout to select per round")
    check_context(cfg)
    if cfg.lora:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("opsd.lora needs peft: pip install -e '.[lora]'") from None
    train = load_problems(problems_path, "train")
    if train.empty:
        raise ValueError(f"{problems_path}: no train split")
    check_solutions(cfg, train, problems_path)
    if pool_path is not None:
        pool_prompts(train, pool_path)


def _log_round(k: int, rounds: int, condition: str, m: dict) -> None:
    get_logger().info(
        "opsd round %d of %d [%s]: acc %.3f selected %.2f%s loss %.4f div p50 %.3g p90 %.3g len %.1f trunc %.2f "
        "epistemic %.2f/1k (%.1fs)", k, rounds, condition, m["opsd/accuracy"], m["opsd/selected_fraction"],
        " (empty round)" if m["opsd/empty_round"] else "", m["opsd/loss"], m["opsd/divergence_p50"],
        m["opsd/divergence_p90"], m["opsd/mean_response_tokens"], m["opsd/truncation_rate"],
        m["opsd/epistemic_rate"], m["opsd/seconds"])
    log_metrics_if_active(m, step=k)


def pool_prompts(train: pd.DataFrame, pool_path: str) -> pd.DataFrame:
    """The train split's rows whose problem is in the pool (group filtering's Parquet)."""
    pool = read_parquet(pool_path, required=["problem_id"])
    unknown = sorted(set(pool["problem_id"]) - set(train["problem_id"]))
    if unknown:
        raise ValueError(f"{pool_path}: {len(unknown)} problem_id(s) not in the train split, e.g. {unknown[:3]}")
    return train[train["problem_id"].isin(set(pool["problem_id"]))].drop_duplicates("problem_id") \
        .reset_index(drop=True)


def run(params: Params, policy_ref: str, problems_path: str, out: str | Path, condition: str,
        pool_path: str | None = None, grader: Grader | None = None,
        on_round: Callable[[int, int, dict], None] | None = None) -> str:
    """Every round of one condition, resumed from the newest checkpoint in ``out``; returns
    ``<out>/final`` (``policy_ref`` for baseline or 0 rounds)."""
    if condition == "baseline" or params.opsd.rounds == 0:
        return policy_ref  # the comparison point: the policy as OPSD found it
    check_job(params, problems_path, condition, pool_path)
    stage = OPSDStage(params, policy_ref, problems_path, Path(out), condition, pool_path, grader)
    return str(run_stage(stage, params.opsd.rounds, params.opsd.save_every, on_round))


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="starting policy (the RLVR checkpoint); the frozen teacher")
    p.add_argument("--problems", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--condition", required=True, choices=CONDITIONS, help="which rollouts enter the loss")
    p.add_argument("--pool", default=None, help="the condition's prompt pool (group filtering's Parquet)")
    args = parse(argv, p)
    return run(params_from(args), args.policy, args.problems, args.out, args.condition, args.pool)


if __name__ == "__main__":
    main()
