"""Stage opsd: on-policy self-distillation, in rounds of rollouts -> grade -> select -> update.

    python -m jobs.opsd --params params/demo.yaml --policy RLVR_CKPT --problems PROBLEMS \\
                        --out OUT --condition correct
    accelerate launch --config_file params/accelerate/cpu-2proc.yaml -m jobs.opsd ...   # same code

The method (DESIGN.md, "The method, precisely"): the student samples its own responses y to
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

A round is a pure function of (previous round's folder, round index, params): ``<out>/round-XXXX/``
holds rollouts.parquet, grades.parquet, selected.parquet, redundancy_map.parquet, metrics.json,
``model/`` (HF checkpoint; LoRA merged in), ``state/`` (optimizer, RNG), and ``teacher/`` (ema) or
``adapter/`` (LoRA). Each folder is written under a temporary name and renamed into place, so a
killed job restarts at the first missing round. Generation is layout-independent as in RLVR
(compaction/rounds.py), and the loss is normalised by the global token count, so 1 and N
processes take the same step.
"""

from __future__ import annotations

from contextlib import nullcontext
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from compaction.artifacts import read_parquet, write_parquet
from compaction.data import load_problems
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
    gather_frames, generate_round_rollouts, model_ref_of, round_completed, round_dir, round_problems,
)
from compaction.scoring import causal_lm, lm_head_weight
from compaction.selection import CONDITIONS, select_rollouts
from compaction.tracking import log_metrics_if_active
from compaction.training import collective_atomic_dir, make_accelerator, micro_batches, save_hf_model
from jobs.common import params_from, parse, parser


class OPSDRound:
    """One round: setup -> rollouts -> grade -> select -> update -> save."""

    def __init__(self, params: Params, prev_ref: str, policy_ref: str, problems_path: str, out: Path, round_: int,
                 condition: str):
        self.p, self.cfg = params, params.opsd
        self.prev_ref, self.policy_ref, self.problems_path = prev_ref, policy_ref, problems_path
        self.out, self.round, self.condition = out, round_, condition
        self.log = get_logger()
        self.grader: Grader | None = None  # running workers shared by the job's rounds

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.acc = acc = make_accelerator()
        self.tokenizer = load_tokenizer(model_ref_of(self.prev_ref))
        if cfg.lora:
            # The base is the starting policy in every round; the adapter's weights (and the
            # optimizer) come back with the previous round's state below.
            model = add_lora(self._load(self.policy_ref), cfg.lora_rank)
        else:
            model = self._load(model_ref_of(self.prev_ref))
        student = DistillationStudent(model, cfg.divergence, cfg.beta, cfg.temperature, cfg.clip,
                                      backend=self.p.model.kernel_backend)
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.student, self.optimizer = acc.prepare(student, optimizer)
        state = Path(self.prev_ref) / "state"
        if state.is_dir():  # continue the optimizer (and RNG) of the previous round
            acc.load_state(str(state))
        self.teacher = self._load_teacher()
        train = load_problems(self.problems_path, "train")
        self.train = train.drop_duplicates("problem_id").set_index("problem_id", drop=False)
        self.problems = round_problems(train, self.round, cfg.prompts_per_round, cfg.seed)
        self._teacher_prompts: dict[str, str] = {}

    def _load(self, ref: str):
        return load_model(ref, dtype="float32", device=self.acc.device,
                          attn_implementation=self.p.model.attn_implementation)

    def _load_teacher(self):
        """A teacher model of its own (frozen, ema), or None when the teacher is the student's
        own weights (live; frozen with LoRA: the adapter disabled)."""
        cfg = self.cfg
        if cfg.teacher == "live" or (cfg.teacher == "frozen" and cfg.lora):
            return None
        ref = self.policy_ref
        if cfg.teacher == "ema" and self.round > 0:
            ref = str(Path(self.prev_ref) / "teacher")
            if not Path(ref).is_dir():
                raise FileNotFoundError(f"{ref}: the previous round's EMA teacher is missing (opsd.teacher=ema)")
        return self._load(ref).eval().requires_grad_(False)

    @property
    def policy(self):
        """The student LM (a peft model with LoRA), unwrapped from DDP/FSDP."""
        return self.acc.unwrap_model(self.student).model

    def teacher_prompts(self, problem_ids) -> dict[str, str]:
        for pid in problem_ids:
            if pid not in self._teacher_prompts:
                self._teacher_prompts[pid] = teacher_prompt(self.tokenizer, self.cfg, self.train.loc[pid],
                                                            self.p.model.enable_thinking)
        return self._teacher_prompts

    # ------------------------------------------------------------- rollouts
    def rollouts(self) -> pd.DataFrame:
        cfg = self.cfg
        return generate_round_rollouts(
            self.acc, causal_lm(self.policy), self.tokenizer, self.problems,
            samples_per_prompt=cfg.samples_per_prompt, temperature=cfg.sample_temperature,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, round_=self.round, policy_ref=self.prev_ref,
            enable_thinking=self.p.model.enable_thinking, batch_size=self.p.rollout.batch_size,
            decoder=self.p.rollout.hf_decoder, desc=f"opsd round {self.round} rollouts")

    # ---------------------------------------------------------------- grade
    def grade(self, rollouts: pd.DataFrame) -> pd.DataFrame:
        return grade_rollouts(rollouts, answers=self.problems[["problem_id", "answer"]], grader=self.grader,
                              workers=self.p.grading.workers, timeout_s=self.p.grading.timeout_s)

    # --------------------------------------------------------------- select
    def select(self, rollouts: pd.DataFrame, grades: pd.DataFrame) -> pd.DataFrame:
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

    def update(self, rollouts: pd.DataFrame, selected: pd.DataFrame) -> tuple[dict[str, float], np.ndarray]:
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
                          self.round, self.condition)
            return {**stats, "opsd/empty_round": 1.0, "opsd/loss": 0.0, "opsd/grad_norm": 0.0}, np.empty(0)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        batches = micro_batches(pairs, cfg.micro_batch_size)
        loss_sum, first_values = 0.0, []
        for step in range(cfg.steps_per_round):
            # Every process must join each collective: pad the shorter lists with empty batches.
            n_micro = int(acc.reduce(torch.tensor(len(batches), device=acc.device), "max").item())
            for k in range(n_micro):
                ctx = acc.no_sync(self.student) if k < n_micro - 1 else nullcontext()
                with ctx:
                    if k < len(batches):
                        values = self.divergences(batches[k])
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

    # ----------------------------------------------------------------- save
    def save(self, rollouts: pd.DataFrame, grades: pd.DataFrame, selected: pd.DataFrame, metrics: dict,
             divergences: np.ndarray) -> Path:
        acc, cfg = self.acc, self.cfg
        all_rollouts, all_grades, all_selected = gather_frames(rollouts, grades, selected)
        order = all_rollouts.sort_values(["group", "sample_index"]).index
        all_rollouts, all_grades = all_rollouts.loc[order], all_grades.loc[order]
        position = {rid: i for i, rid in enumerate(all_rollouts["rollout_id"])}
        all_selected = all_selected.sort_values("rollout_id", key=lambda s: s.map(position))
        redundancy = self.redundancy_map(all_rollouts, all_grades)  # every process: forward passes
        final = round_dir(self.out, self.round)
        with collective_atomic_dir(acc, final) as tmp:
            acc.save_state(str(tmp / "state"))
            self._save_models(tmp)
            if acc.is_main_process:
                write_parquet(all_rollouts, tmp / "rollouts.parquet")
                write_parquet(all_grades, tmp / "grades.parquet")
                write_parquet(all_selected, tmp / "selected.parquet")
                if redundancy is not None:
                    write_parquet(redundancy, tmp / MAP_FILE)
                metrics.update(self._round_metrics(all_rollouts, all_grades, all_selected, divergences))
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))  # last: marks the round done
        return final

    def _save_models(self, tmp: Path) -> None:
        acc, cfg = self.acc, self.cfg
        if not cfg.lora:
            save_hf_model(acc, self.student, self.tokenizer, tmp / "model")
        else:
            # model/ = the merged weights, so every later stage loads a plain HF checkpoint;
            # adapter/ = the peft adapter alone (for peft / vLLM LoRA users).
            state = acc.get_state_dict(self.student)
            if acc.is_main_process:
                merged = merged_lora_weights(state.items(), lora_scalings(self.policy))
                causal_lm(self.policy).save_pretrained(tmp / "model", state_dict=merged, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp / "model")
                self.policy.save_pretrained(tmp / "adapter")
        if cfg.teacher == "ema" and acc.is_main_process:
            self.teacher.save_pretrained(tmp / "teacher", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "teacher")

    def redundancy_map(self, rollouts: pd.DataFrame, grades: pd.DataFrame) -> pd.DataFrame | None:
        """Per-token divergences (no clip) of a fixed, seeded choice of round 0's rollouts, scored by
        this round's updated student and its teacher: the same texts in every round."""
        from kernels import linear_divergence

        cfg = self.cfg
        if cfg.redundancy_map_samples == 0:
            return None
        if self.round > 0:
            first = round_dir(self.out, 0)
            rollouts, grades = read_parquet(first / "rollouts.parquet"), read_parquet(first / "grades.parquet")
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
            "opsd/kept_fraction": fraction,  # DESIGN.md's name for the same number
            **{f"opsd/{k}": v for k, v in lengths.items()},
            "opsd/epistemic_rate": epistemic_rate(rollouts["response"], rollouts["response_tokens"].sum(),
                                                  self.p.eval.epistemic_markers),
            "opsd/divergence_mean": float(d.mean()) if d.size else float("nan"),
            "opsd/divergence_p50": float(np.percentile(d, 50)) if d.size else float("nan"),
            "opsd/divergence_p90": float(np.percentile(d, 90)) if d.size else float("nan"),
            "opsd/divergence_max": float(d.max()) if d.size else float("nan"),
        }


def check_job(params: Params, problems_path: str, condition: str) -> None:
    """Everything that can be wrong before any work: the condition, the context template, missing
    reference solutions (missing_solution: error), peft for LoRA, an empty train split."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition: expected one of {CONDITIONS}, got {condition!r}")
    cfg = params.opsd
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


def run_round(params: Params, prev_ref: str, policy_ref: str, problems_path: str, out: str | Path, round_: int,
              condition: str, grader: Grader | None = None) -> str:
    """Run round ``round_`` from ``prev_ref`` (the starting policy, or the previous round's folder)."""
    out = Path(out)
    if round_completed(out, round_):
        return str(round_dir(out, round_))
    t0 = time.perf_counter()
    r = OPSDRound(params, prev_ref, policy_ref, problems_path, out, round_, condition)
    r.grader = grader
    r.setup()
    rollouts = r.rollouts()
    grades = r.grade(rollouts)
    selected = r.select(rollouts, grades)
    t_gen = time.perf_counter() - t0
    stats, divergences = r.update(rollouts, selected)
    stats["opsd/seconds"] = time.perf_counter() - t0
    stats["opsd/rollout_seconds"] = t_gen
    path = r.save(rollouts, grades, selected, stats, divergences)
    if r.acc.is_main_process:
        _log_round(round_, condition, json.loads((path / "metrics.json").read_text()))
    return str(path)


def _log_round(round_: int, condition: str, m: dict) -> None:
    get_logger().info(
        "opsd round %d [%s]: acc %.3f selected %.2f%s loss %.4f div p50 %.3g p90 %.3g len %.1f trunc %.2f "
        "epistemic %.2f/1k (%.1fs)", round_, condition, m["opsd/accuracy"], m["opsd/selected_fraction"],
        " (empty round)" if m["opsd/empty_round"] else "", m["opsd/loss"], m["opsd/divergence_p50"],
        m["opsd/divergence_p90"], m["opsd/mean_response_tokens"], m["opsd/truncation_rate"],
        m["opsd/epistemic_rate"], m["opsd/seconds"])
    log_metrics_if_active(m, step=round_)


def run(params: Params, policy_ref: str, problems_path: str, out: str | Path, condition: str) -> str:
    """All rounds of one condition; returns the last round's model folder (``policy_ref`` for baseline)."""
    if condition == "baseline":
        return policy_ref  # the comparison point: the policy as OPSD found it
    check_job(params, problems_path, condition)
    out = Path(out)
    prev = policy_ref
    # One pool of grading workers for all rounds (starting one costs ~1.8 s).
    with Grader(params.grading.workers, params.grading.timeout_s) as grader:
        for k in range(params.opsd.rounds):
            prev = run_round(params, prev, policy_ref, problems_path, out, k, condition, grader)
    return str(Path(prev) / "model") if params.opsd.rounds else policy_ref


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="starting policy (the RLVR checkpoint); the frozen teacher")
    p.add_argument("--problems", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--condition", required=True, choices=CONDITIONS, help="which rollouts enter the loss")
    p.add_argument("--round", type=int, default=None, help="run only this round (needs the previous one)")
    args = parse(argv, p)
    params = params_from(args)
    if args.round is None or args.condition == "baseline":
        return run(params, args.policy, args.problems, args.out, args.condition)
    check_job(params, args.problems, args.condition)
    prev = args.policy if args.round == 0 else str(round_dir(Path(args.out), args.round - 1))
    return run_round(params, prev, args.policy, args.problems, args.out, args.round, args.condition)


if __name__ == "__main__":
    main()
