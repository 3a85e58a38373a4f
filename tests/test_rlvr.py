"""RLVR as one job: a record per round, checkpoints every save_every rounds with retention, the
final folder, and 2 processes taking the same step as 1. (Resume after SIGKILL: test_stage_resume.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from compaction.data import GRADE_COLUMNS, ROLLOUT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
# Rewards vary with length under the soft overlong penalty even when nothing is correct yet,
# so the barely trained smoke model still gets a gradient. 64 tokens: at 32 only ~1 response in
# 5 ends before the limit, and a round of 8 where all run to it has no reward variance at all.
UPDATE_OPTS = ["rlvr.overlong=penalty", "rlvr.max_new_tokens=64", "rlvr.overlong_buffer=56",
               "rlvr.dynamic_sampling=false",
               "rlvr.prompts_per_round=4", "rlvr.samples_per_prompt=2", "rollout.batch_size=4"]


@pytest.fixture(scope="module")
def sft_ckpt(smoke_params, smoke_data, tiny_model, tmp_path_factory):
    from jobs import sft

    params = smoke_params.model_copy(deep=True)
    params.sft.max_steps = 8
    return sft.run(params, tiny_model, smoke_data["traces"], tmp_path_factory.mktemp("sft"))


def rlvr_cmd(policy, problems, out, *overrides, launcher=(sys.executable, "-m")):
    sets = [a for o in overrides for a in ("--set", o)]
    return [*launcher, "jobs.rlvr", "--params", "params/smoke.yaml", *sets, "--policy", policy,
            "--problems", problems, "--out", str(out)]


def test_rounds_write_records_checkpoints_and_the_final_model(sft_ckpt, smoke_data, smoke_params, tmp_path):
    from compaction.params import load_params
    from jobs import rlvr

    params = load_params(REPO / "params" / "smoke.yaml", UPDATE_OPTS + [
        "rlvr.kl_coef=0.05", "rlvr.mini_batches=2", "rlvr.rounds=5", "rlvr.save_every=2", "rlvr.keep_checkpoints=2"],
        base=Path(smoke_params.paths.root))
    seen = []
    final = rlvr.run(params, sft_ckpt, smoke_data["problems"], tmp_path / "rlvr",
                     on_round=lambda done, total, m: seen.append((done, total)))
    assert seen == [(k, 5) for k in range(1, 6)]  # progress after every round
    out = tmp_path / "rlvr"
    rounds = sorted(out.glob("round-*"))
    assert [r.name for r in rounds] == [f"round-{k:04d}" for k in range(5)]
    assert final == str(out / "final") and Path(final, "config.json").is_file()
    # Checkpoints after rounds 2 and 4 and after the last (5); the newest two kept.
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text()) == {"step": 5}
    # The only model folders are the checkpoints' state and the final folder.
    assert sorted(str(p.parent.relative_to(out)) for p in out.rglob("*.safetensors")) == [
        "checkpoints/step-00000004/state", "checkpoints/step-00000005/state", "final"]
    # The checkpoint holds the final weights (resume starts from them).
    last = load_file(str(out / "checkpoints" / "step-00000005" / "state" / "model.safetensors"))
    fin = load_file(f"{final}/model.safetensors")
    shared = [k for k in fin if "model." + k in last]
    assert len(shared) >= len(fin) - 1  # a tied LM head is stored once
    assert all(torch.equal(last["model." + k], fin[k]) for k in shared)
    for k, r in enumerate(rounds):
        assert {p.name for p in r.iterdir()} == {"rollouts.parquet", "grades.parquet", "metrics.json"}
        ro, gr = pd.read_parquet(r / "rollouts.parquet"), pd.read_parquet(r / "grades.parquet")
        assert set(ROLLOUT_COLUMNS) <= set(ro.columns) and list(gr.columns) == list(GRADE_COLUMNS)
        assert len(ro) == 4 * 2 and (ro["round"] == k).all() and list(ro.rollout_id) == list(gr.rollout_id)
        assert all(len(ids) == n for ids, n in zip(ro.response_token_ids, ro.response_tokens))
        m = json.loads((r / "metrics.json").read_text())
        for key in ("rlvr/loss", "rlvr/reward_mean", "rlvr/pass_rate", "rlvr/group_zero_variance_fraction",
                    "rlvr/clip_fraction", "rlvr/grad_norm", "rlvr/kl", "rlvr/mean_response_tokens",
                    "rlvr/p90_response_tokens", "rlvr/truncation_rate"):
            assert key in m, key
    m0 = json.loads((rounds[0] / "metrics.json").read_text())
    assert m0["rlvr/trained_sequences"] > 0 and m0["rlvr/grad_norm"] > 0
    assert m0["rlvr/optimizer_steps"] == 2  # 4 groups in 2 mini-batches: two steps per round
    # The policy moved.
    a, b = load_file(f"{sft_ckpt}/model.safetensors"), load_file(f"{final}/model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # A finished stage is not redone: a rerun returns at once with the same files.
    stamp = (rounds[0] / "metrics.json").stat().st_mtime_ns
    assert rlvr.run(params, sft_ckpt, smoke_data["problems"], tmp_path / "rlvr") == final
    assert (rounds[0] / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("mini_batches", [1, 2])
def test_two_processes_take_the_same_rlvr_steps_as_one(sft_ckpt, smoke_data, tmp_path, mini_batches):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 3 one-prompt generation chunks: one process gets 2 micro-batches, the other 1 (it must still
    # join the gradient all-reduce of the second). With 2 mini-batches, groups {0, 2} then {1}:
    # each step mixes both processes' groups.
    opts = [*UPDATE_OPTS, "rlvr.prompts_per_round=3", "rollout.batch_size=2", "rlvr.micro_batch_size=2",
            f"rlvr.mini_batches={mini_batches}"]
    one, two = tmp_path / "one", tmp_path / "two"
    opts.append("rlvr.rounds=1")
    subprocess.run(rlvr_cmd(sft_ckpt, smoke_data["problems"], one, *opts), cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launcher = (accelerate, "launch", "--config_file", "params/accelerate/cpu-2proc.yaml", "-m")
    r = subprocess.run(rlvr_cmd(sft_ckpt, smoke_data["problems"], two, *opts, launcher=launcher),
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r1, r2 = one / "round-0000", two / "round-0000"
    # Same rollouts (layout-independent generation), same loss, same new weights. Ids and policy_ref
    # name the stage folder, which differs.
    named = ["rollout_id", "policy_ref"]
    pd.testing.assert_frame_equal(pd.read_parquet(r1 / "rollouts.parquet").drop(columns=named),
                                  pd.read_parquet(r2 / "rollouts.parquet").drop(columns=named))
    m1, m2 = json.loads((r1 / "metrics.json").read_text()), json.loads((r2 / "metrics.json").read_text())
    assert m2["rlvr/loss"] == pytest.approx(m1["rlvr/loss"], rel=1e-4, abs=1e-7)
    a, b = load_file(f"{one}/final/model.safetensors"), load_file(f"{two}/final/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", [
    "rlvr.loss_agg=seq_mean", "rlvr.loss_agg=const_norm", "rlvr.adv_scaling=batch", "rlvr.overlong=mask",
    "rlvr.steps_per_round=2",
])
def test_every_aggregation_and_option_takes_a_step(option, sft_ckpt, smoke_data, smoke_params, tmp_path):
    """Each loss aggregation and update option runs through the update and moves the weights."""
    from compaction.grading import shared_grader
    from compaction.params import load_params
    from jobs import rlvr

    params = load_params(REPO / "params" / "smoke.yaml", UPDATE_OPTS + ["rlvr.rounds=1", option],
                         base=Path(smoke_params.paths.root))
    final = rlvr.run(params, sft_ckpt, smoke_data["problems"], tmp_path / "rlvr",
                     grader=shared_grader(params.grading.workers, params.grading.timeout_s))
    m = json.loads((tmp_path / "rlvr" / "round-0000" / "metrics.json").read_text())
    steps = 2 if option == "rlvr.steps_per_round=2" else 1
    assert m["rlvr/optimizer_steps"] == steps and m["rlvr/trained_sequences"] > 0 and np.isfinite(m["rlvr/loss"]), m
    if option == "rlvr.overlong=mask":
        # Truncated responses leave the loss; without the length penalty the smoke model's rewards
        # (all 0: it answers nothing right) carry no gradient, so only the masking is checked here.
        rollouts = pd.read_parquet(tmp_path / "rlvr" / "round-0000" / "rollouts.parquet")
        assert m["rlvr/trained_sequences"] == int((rollouts["finish_reason"] != "length").sum()) < len(rollouts)
        return
    assert m["rlvr/grad_norm"] > 0, m
    a, b = load_file(str(Path(sft_ckpt) / "model.safetensors")), load_file(str(Path(final) / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_length_penalty_baseline_rewards_shorter_correct_answers(smoke_params, tmp_path):
    """rlvr.length_penalty (the `lenpen` branch): 1 - a * L / max_new_tokens for a correct answer, 0
    for a wrong one, so a group of correct answers of different lengths has advantages that
    favour the shorter (DAPO's overlong penalty off here)."""
    from compaction.rl import group_advantages
    from jobs.rlvr import RLVRStage

    params = smoke_params.model_copy(deep=True)
    params.rlvr.length_penalty, params.rlvr.overlong, params.rlvr.max_new_tokens = 0.5, "none", 100
    stage = RLVRStage(params, "unused-policy", "unused-problems", tmp_path)
    rollouts = pd.DataFrame({"group": [0, 0, 1, 1], "response_tokens": [10, 50, 20, 100],
                             "finish_reason": ["stop", "stop", "stop", "length"]})
    grades = pd.DataFrame({"correct": [True, True, False, True]})
    _, rewards = stage.rewards(rollouts, grades)
    np.testing.assert_allclose(rewards, [[0.95, 0.75], [0.0, 0.5]])
    adv = group_advantages(rewards, "group")
    assert adv[0, 0] > 0 > adv[0, 1]  # two correct answers: the shorter one is reinforced
    params.rlvr.length_penalty = 0.0  # RLVR itself: correct is 1 whatever its length
    _, plain = RLVRStage(params, "unused-policy", "unused-problems", tmp_path).rewards(rollouts, grades)
    np.testing.assert_allclose(plain, [[1.0, 1.0], [0.0, 1.0]])
