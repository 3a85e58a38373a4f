"""Stage rlvr: GRPO-family RL with verifiable rewards, rounds of rollouts -> grade -> update, in one job.

    python -m jobs.rlvr --params params/demo.yaml --policy SFT_CKPT --problems PROBLEMS --out OUT
    accelerate launch --config_file params/accelerate/cpu-2proc.yaml -m jobs.rlvr ...   # same code

Setup once (policy, optimizer, the frozen reference for the k3 KL, the train split, the grading
workers), then every round in this process: ``<out>/round-XXXX/`` gets the round's record
(rollouts.parquet, grades.parquet, metrics.json), ``<out>/checkpoints/`` a resumable checkpoint
every ``rlvr.save_every`` rounds, and ``<out>/final/`` the trained policy at the end
(compaction/rounds.py). A killed job, restarted with the same command, resumes from its newest
checkpoint.

Per round: `prompts_per_round` training problems (a seeded, round-dependent order) x
`samples_per_prompt` samples; rewards from math-verify (1 correct / 0 not, plus the soft
overlong penalty if chosen); group-normalised advantages; dynamic sampling drops groups whose
rewards all agree; `steps_per_round` passes of `mini_batches` optimizer steps each on the clipped
surrogate (eps_low / eps_high), aggregated as token_mean / seq_mean / const_norm, optional k3 KL to the
frozen starting policy. Log-probs come from `kernels.linear_logprobs` (hidden states + LM head).

Generation is layout-independent: prompts are cut into fixed generation chunks, each sampled
with its own seed, and chunks are dealt to processes; so 1 and N processes draw the same
rollouts and (with global loss normalisation) take the same step.
"""

from __future__ import annotations

from contextlib import nullcontext
import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch

from compaction.artifacts import write_parquet
from compaction.data import load_problems
from compaction.grading import Grader, grade_rollouts
from compaction.logs import get_logger
from compaction.metrics import response_length_stats
from compaction.model import load_model, load_tokenizer
from compaction.params import Params
from compaction.rl import (
    clipped_policy_loss, group_advantages, length_penalty, overlong_penalty, token_weights, weight_negative,
    zero_variance_groups,
)
from compaction.rounds import (
    RoundStage, gather_frames, generate_round_rollouts, round_dir, round_problems, rounds_policy_ref, run_stage,
)
from compaction.scoring import TokenScorer
from compaction.tracking import log_metrics_if_active
from compaction.training import (
    collective_atomic_dir, make_accelerator, micro_batches, pad_batch, placeholder_batch, publish_final,
)
from jobs.common import params_from, parse, parser


class TrainSeq(NamedTuple):
    """One rollout that trains: prompt + sampled ids, where the response starts, its advantage and
    its mini-batch."""

    ids: list[int]
    start: int
    advantage: float
    mini: int

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.start


@dataclass
class RoundCounts:
    """A round's counts over every process: per mini-batch ``sequences`` and response ``tokens``
    [mini_batches], and the zero-variance and total groups."""

    sequences: np.ndarray
    tokens: np.ndarray
    zero_variance_groups: float
    groups: float


class RLVRStage(RoundStage):
    """setup (once) -> per round: rollouts -> grade -> update -> record -> (checkpoint) -> final."""

    def __init__(self, params: Params, policy_ref: str, problems_path: str, out: Path, grader: Grader | None = None):
        super().__init__(out, params.rlvr.keep_checkpoints, grader, launcher=params.launcher)
        self.p, self.cfg = params, params.rlvr
        self.policy_ref, self.problems_path = policy_ref, problems_path
        self.log = get_logger()

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        self.acc = make_accelerator()
        cfg = self.cfg
        self.tokenizer = load_tokenizer(self.policy_ref)
        model = load_model(self.policy_ref, dtype="float32", device=self.acc.device,
                           attn_implementation=self.p.model.attn_implementation)
        self.scorer = TokenScorer(model, backend=self.p.model.kernel_backend)
        optimizer = torch.optim.AdamW(self.scorer.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.scorer, self.optimizer = self.acc.prepare(self.scorer, optimizer)
        self.wrapped = self.scorer
        self.reference = None
        if cfg.kl_coef > 0:
            ref = load_model(self.policy_ref, dtype="float32", device=self.acc.device).eval()
            self.reference = TokenScorer(ref.requires_grad_(False), backend=self.p.model.kernel_backend)
        self.train = load_problems(self.problems_path, "train")
        if self.train.empty:
            raise ValueError(f"{self.problems_path}: no train split")
        self.start_grader(self.p.grading)
        self.setup_heldout(self.p, self.problems_path, cfg, "rlvr")
        self.start_rollout_server(self.p, self.policy_ref)

    @property
    def policy(self):
        return self.acc.unwrap_model(self.scorer).model

    # ---------------------------------------------------------------- round
    def round(self, k: int) -> dict[str, float]:
        t0 = time.perf_counter()
        problems = round_problems(self.train, k, self.cfg.prompts_per_round, self.cfg.seed)
        rollouts = self.rollouts(problems, k)
        t1 = time.perf_counter()
        grades = self.grade(rollouts, problems)
        t2 = time.perf_counter()
        stats = self.update(rollouts, grades, k)
        t3 = time.perf_counter()
        stats.update({"rlvr/generate_seconds": t1 - t0, "rlvr/grade_seconds": t2 - t1,
                      "rlvr/update_seconds": t3 - t2, "rlvr/rollout_seconds": t2 - t0, "rlvr/seconds": t3 - t0})
        return self.record(k, rollouts, grades, stats)

    # ------------------------------------------------------------- rollouts
    def rollouts(self, problems: pd.DataFrame, k: int) -> pd.DataFrame:
        cfg = self.cfg
        return generate_round_rollouts(
            self.acc, self.policy, self.tokenizer, problems, samples_per_prompt=cfg.samples_per_prompt,
            temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, round_=k,
            policy_ref=rounds_policy_ref(self.out, k), enable_thinking=self.p.model.enable_thinking,
            batch_size=self.p.rollout.batch_size, decoder=self.p.rollout.hf_decoder,
            desc=f"rlvr round {k} rollouts", engine=self.engine)

    # ---------------------------------------------------------------- grade
    def grade(self, rollouts: pd.DataFrame, problems: pd.DataFrame) -> pd.DataFrame:
        return grade_rollouts(rollouts, answers=problems[["problem_id", "answer"]], grader=self.grader,
                              workers=self.p.grading.workers, timeout_s=self.p.grading.timeout_s)

    # --------------------------------------------------------------- update
    def update(self, rollouts: pd.DataFrame, grades: pd.DataFrame, k: int) -> dict[str, float]:
        """rewards -> group advantages -> the sequences that train -> global counts -> mini-batches
        -> ``steps_per_round`` passes of one optimizer step per mini-batch."""
        groups, rewards = self.rewards(rollouts, grades)
        zero_var = zero_variance_groups(rewards)
        advantages = self.advantages(rewards)
        keep = ~zero_var if self.cfg.dynamic_sampling else np.ones(len(groups), bool)
        seqs = self.sequences(groups, advantages, keep)
        counts = self.global_counts(seqs, zero_var)
        stats = {"rlvr/group_zero_variance_fraction": counts.zero_variance_groups / max(counts.groups, 1),
                 "rlvr/trained_sequences": counts.sequences.sum()}
        if counts.sequences.sum() == 0:
            self.log.info("rlvr round %d: every group has zero reward variance; no update", k)
            return {**stats, "rlvr/loss": 0.0, "rlvr/clip_fraction": 0.0, "rlvr/grad_norm": 0.0}
        return {**stats, **self.optimize(self.mini_batches(seqs, counts), counts.tokens.sum())}

    def rewards(self, rollouts: pd.DataFrame, grades: pd.DataFrame) -> tuple[list[pd.DataFrame], np.ndarray]:
        """Each group's rows (with ``reward``) and the rewards [groups, samples]: 1 correct / 0 not,
        minus the length penalty on correct ones (``length_penalty`` > 0: the length-penalty baseline),
        plus DAPO's soft overlong penalty with ``overlong: penalty``."""
        cfg = self.cfg
        df = rollouts.assign(correct=grades["correct"].to_numpy())
        reward = df["correct"].astype(float).to_numpy()
        if cfg.length_penalty > 0:
            reward = reward + length_penalty(df["correct"].to_numpy(), df["response_tokens"].to_numpy(),
                                             cfg.max_new_tokens, cfg.length_penalty)
        if cfg.overlong == "penalty":
            reward = reward + overlong_penalty(df["response_tokens"].to_numpy(), cfg.max_new_tokens,
                                               cfg.overlong_buffer)
        df["reward"] = reward
        groups = [g for _, g in df.groupby("group", sort=True)]
        return groups, np.stack([g["reward"].to_numpy() for g in groups])

    def advantages(self, rewards: np.ndarray) -> np.ndarray:
        """Group-normalised advantages (``adv_scaling``; ``batch`` = the std of every process's
        rewards), negatives weighted by ``negative_weight``."""
        cfg, acc = self.cfg, self.acc
        batch_std = None
        if cfg.adv_scaling == "batch":
            t = torch.tensor([rewards.sum(), (rewards ** 2).sum(), rewards.size], dtype=torch.float64,
                             device=acc.device)
            s, s2, cnt = acc.reduce(t, "sum").tolist()
            batch_std = float(np.sqrt(max(s2 / cnt - (s / cnt) ** 2, 0.0)))
        return weight_negative(group_advantages(rewards, cfg.adv_scaling, batch_std), cfg.negative_weight)

    def sequences(self, groups: list[pd.DataFrame], advantages: np.ndarray, keep: np.ndarray) -> list[TrainSeq]:
        """The rollouts that train, as (prompt + sampled ids, response start, advantage, mini-batch).
        A group's mini-batch comes from its global index, so it does not depend on the layout."""
        cfg, seqs = self.cfg, []
        for g, a, kept in zip(groups, advantages, keep):
            if not kept:
                continue
            mini = int(g["group"].iloc[0]) % cfg.mini_batches
            for (_, row), adv_i in zip(g.iterrows(), a):
                if cfg.overlong == "mask" and row["finish_reason"] == "length":
                    continue  # truncated: no verdict on an unfinished answer
                p_ids = self.tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                r_ids = list(row["response_token_ids"])
                if r_ids:
                    seqs.append(TrainSeq(p_ids + r_ids, len(p_ids), float(adv_i), mini))
        return seqs

    def global_counts(self, seqs: list[TrainSeq], zero_var: np.ndarray) -> RoundCounts:
        """Sequences and response tokens per mini-batch, zero-variance groups and groups, summed
        over every process (one all-reduce): the loss normalisers."""
        M = self.cfg.mini_batches
        local = np.zeros(2 * M + 2)
        for seq in seqs:
            local[seq.mini] += 1
            local[M + seq.mini] += seq.response_tokens
        local[2 * M:] = zero_var.sum(), len(zero_var)
        total = self.acc.reduce(torch.tensor(local, dtype=torch.float64, device=self.acc.device), "sum").cpu().numpy()
        return RoundCounts(sequences=total[:M], tokens=total[M:2 * M], zero_variance_groups=float(total[2 * M]),
                           groups=float(total[2 * M + 1]))

    def mini_batches(self, seqs: list[TrainSeq], counts: RoundCounts) -> list[list]:
        """Per non-empty mini-batch, this process's micro-batches of (sequence, token weight); each
        mini-batch is one optimizer step, its loss normalised over its own global batch."""
        cfg, minis = self.cfg, []
        for m in range(cfg.mini_batches):
            if counts.sequences[m] == 0:
                continue  # empty on every process: no step
            mine = [(s.ids, s.start, s.advantage) for s in seqs if s.mini == m]
            w = token_weights([len(ids) - st for ids, st, _ in mine], cfg.loss_agg, float(counts.tokens[m]),
                              float(counts.sequences[m]), cfg.max_new_tokens)
            items = list(zip(mine, w))  # ((ids, start, advantage), token weight)
            minis.append(micro_batches(items, cfg.micro_batch_size, length=lambda item: len(item[0][0])))
        return minis

    def optimize(self, minis: list[list], n_tokens: float) -> dict[str, float]:
        """``steps_per_round`` passes over the mini-batches: the clipped surrogate (+ k3 KL)."""
        cfg, acc = self.cfg, self.acc
        # Behaviour log-probs: with a single step the policy has not moved, so ratio = 1 exactly.
        on_policy = cfg.steps_per_round == 1 and len(minis) == 1
        old = None if on_policy else [[self._logprobs(self.scorer, mb, no_grad=True) for mb in b] for b in minis]
        ref = None if self.reference is None else [
            [self._logprobs(self.reference, mb, no_grad=True) for mb in b] for b in minis]
        scale = acc.num_processes  # DDP averages gradients; the weights already normalise globally
        loss_sum, clipped, kl, n_steps = 0.0, 0.0, 0.0, 0  # summed over steps, reported per pass
        for _ in range(cfg.steps_per_round):
            for i, batches in enumerate(minis):
                # Every process must join each collective: pad the shorter lists with empty batches.
                n_micro = int(acc.reduce(torch.tensor(len(batches), device=acc.device), "max").item())
                for m in range(n_micro):
                    mb = batches[m] if m < len(batches) else []
                    ctx = acc.no_sync(self.scorer) if m < n_micro - 1 else nullcontext()
                    with ctx:
                        if mb:
                            logp = self._logprobs(self.scorer, mb)
                            b_old = logp.detach() if old is None else old[i][m]
                            adv_t, w_t = self._token_values(mb)
                            loss, st = clipped_policy_loss(logp, b_old, adv_t, w_t, cfg.eps_low, cfg.eps_high,
                                                           None if ref is None else ref[i][m], cfg.kl_coef)
                        else:
                            # Nothing left on this process: a zero loss, but through the wrapped forward,
                            # so that DDP still joins the gradient all-reduce of the other processes.
                            b = {k: v.to(acc.device) for k, v in placeholder_batch(self.tokenizer.pad_token_id).items()}
                            loss = self.scorer(b["input_ids"], b["attention_mask"], b["score_mask"]).sum() * 0.0
                            st = {"clipped": torch.tensor(0.0)}
                        acc.backward(loss * scale)
                    loss_sum += float(loss.detach())
                    clipped += float(st["clipped"])
                    kl += float(st.get("kl", 0.0))
                grad_norm = acc.clip_grad_norm_(self.scorer.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_steps += 1
        tot = acc.reduce(torch.tensor([loss_sum, clipped, kl], dtype=torch.float64, device=acc.device), "sum").tolist()
        passes = cfg.steps_per_round
        stats = {"rlvr/loss": tot[0] / passes, "rlvr/clip_fraction": tot[1] / (n_tokens * passes),
                 "rlvr/grad_norm": float(grad_norm), "rlvr/optimizer_steps": n_steps}
        if self.reference is not None:
            stats["rlvr/kl"] = tot[2] / (n_tokens * passes)
        return stats

    def _token_values(self, mb):
        adv, w = [], []
        for (ids, start, a), weight in mb:
            n = len(ids) - start
            adv += [a] * n
            w += [weight] * n
        dev = self.acc.device
        return torch.tensor(adv, device=dev), torch.tensor(w, device=dev)

    def _logprobs(self, scorer, mb, no_grad: bool = False) -> torch.Tensor:
        b = pad_batch([s[0] for s, _ in mb], [s[1] for s, _ in mb], self.tokenizer.pad_token_id)
        b = {k: v.to(self.acc.device) for k, v in b.items()}
        with torch.no_grad() if no_grad else nullcontext():
            return scorer(b["input_ids"], b["attention_mask"], b["score_mask"], self.cfg.temperature)

    # --------------------------------------------------------------- record
    def record(self, k: int, rollouts: pd.DataFrame, grades: pd.DataFrame, metrics: dict) -> dict[str, float]:
        """``round-XXXX/``: the round's rollouts, grades and metrics (no model), its log line and
        its MLflow metrics (step = round)."""
        acc = self.acc
        all_rollouts, all_grades = gather_frames(rollouts, grades)
        with collective_atomic_dir(acc, round_dir(self.out, k)) as tmp:
            if acc.is_main_process:
                order = all_rollouts.sort_values(["group", "sample_index"]).index
                all_rollouts, all_grades = all_rollouts.loc[order], all_grades.loc[order]
                write_parquet(all_rollouts.drop(columns=["group"]), tmp / "rollouts.parquet")
                write_parquet(all_grades, tmp / "grades.parquet")
                metrics.update(self._rollout_metrics(all_rollouts, all_grades))
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))  # last: marks the round done
        if acc.is_main_process:
            _log_round(k, self.cfg.rounds, metrics)
        return metrics

    # ----------------------------------------------------------------- save
    def save_final(self, path: Path) -> None:
        publish_final(self.acc, self.scorer, self.tokenizer, path.parent, path.name)

    def _rollout_metrics(self, rollouts: pd.DataFrame, grades: pd.DataFrame) -> dict[str, float]:
        correct = grades["correct"].astype(float).to_numpy()
        per_problem = pd.Series(correct).groupby(rollouts["problem_id"].to_numpy()).max()
        lengths = {f"rlvr/{k}": v for k, v in response_length_stats(rollouts).items()}
        return {"rlvr/reward_mean": float(correct.mean()), "rlvr/pass_rate": float(per_problem.mean()), **lengths}


def _log_round(k: int, rounds: int, m: dict) -> None:
    get_logger().info(
        "rlvr round %d of %d: reward %.3f pass %.3f zero-var %.2f loss %.4f clip %.3f len %.1f trunc %.2f (%.1fs)",
        k, rounds, m["rlvr/reward_mean"], m["rlvr/pass_rate"], m["rlvr/group_zero_variance_fraction"],
        m["rlvr/loss"], m["rlvr/clip_fraction"], m["rlvr/mean_response_tokens"], m["rlvr/truncation_rate"],
        m["rlvr/seconds"])
    log_metrics_if_active(m, step=k)


def run(params: Params, policy_ref: str, problems_path: str, out: str | Path, grader: Grader | None = None,
        on_round: Callable[[int, int, dict], None] | None = None) -> str:
    """Every round, resumed from the newest checkpoint in ``out``; returns ``<out>/final`` (the
    RLVR checkpoint), or ``policy_ref`` for 0 rounds."""
    if params.rlvr.rounds == 0:
        return policy_ref
    stage = RLVRStage(params, policy_ref, problems_path, Path(out), grader)
    return str(run_stage(stage, params.rlvr.rounds, params.rlvr.save_every, on_round))


def main(argv: Sequence[str] | None = None) -> str:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="starting policy (the SFT checkpoint)")
    p.add_argument("--problems", required=True)
    p.add_argument("--out", required=True, help="stage folder (round-XXXX/, checkpoints/, final/)")
    args = parse(argv, p)
    return run(params_from(args), args.policy, args.problems, args.out)


if __name__ == "__main__":
    main()
