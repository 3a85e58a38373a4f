"""RLVR math on its own: advantages, dynamic sampling, overlong penalty, loss aggregation, clipping."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compaction.rl import (
    clipped_policy_loss, group_advantages, overlong_penalty, token_weights, weight_negative, zero_variance_groups,
)


def test_group_advantages_centre_and_scale_per_group():
    r = np.array([[1, 0, 0, 1], [1, 1, 1, 0]], dtype=float)
    a = group_advantages(r, "group")
    np.testing.assert_allclose(a.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(a.std(axis=1), 1, atol=1e-4)
    none = group_advantages(r, "none")
    np.testing.assert_allclose(none, r - r.mean(axis=1, keepdims=True))
    batch = group_advantages(r, "batch", batch_std=0.5)
    np.testing.assert_allclose(batch, none / (0.5 + 1e-6))


def test_zero_variance_groups_get_zero_advantage_and_are_flagged():
    r = np.array([[1, 1, 1], [0, 0, 0], [0, 1, 0]], dtype=float)
    assert zero_variance_groups(r).tolist() == [True, True, False]
    assert np.all(group_advantages(r, "group")[:2] == 0)


def test_weight_negative_scales_only_the_below_average_samples():
    a = group_advantages(np.array([[1, 0, 0, 1], [1, 0, 0, 0]], dtype=float), "group")
    np.testing.assert_array_equal(weight_negative(a, 1.0), a)
    half = weight_negative(a, 0.5)
    np.testing.assert_allclose(half[a > 0], a[a > 0])
    np.testing.assert_allclose(half[a < 0], 0.5 * a[a < 0])
    positive_only = weight_negative(a, 0.0)
    assert (positive_only >= 0).all() and (positive_only[a > 0] == a[a > 0]).all()


def test_negative_weight_is_a_fraction(tmp_path):
    from compaction.params import load_params

    smoke = Path(__file__).resolve().parents[1] / "params" / "smoke.yaml"
    with pytest.raises(ValueError, match="rlvr.negative_weight"):
        load_params(smoke, ["rlvr.negative_weight=1.5"], base=tmp_path)


def test_unknown_scaling_is_named():
    with pytest.raises(ValueError, match="rlvr.adv_scaling"):
        group_advantages(np.zeros((1, 2)), "rank")


def test_overlong_penalty_ramps_to_minus_one():
    p = overlong_penalty(np.array([10, 96, 112, 128]), max_new_tokens=128, buffer=32)
    np.testing.assert_allclose(p, [0, 0, -0.5, -1])
    assert overlong_penalty(np.array([128]), 128, 0).tolist() == [0]


def test_token_weights_implement_the_three_aggregations():
    lengths = [2, 4]
    # token_mean: every token counts the same.
    w = token_weights(lengths, "token_mean", global_tokens=6, global_seqs=2, max_new_tokens=8)
    assert sum(wi * n for wi, n in zip(w, lengths)) == pytest.approx(1.0)
    # seq_mean: every sequence counts the same.
    w = token_weights(lengths, "seq_mean", global_tokens=6, global_seqs=2, max_new_tokens=8)
    assert [wi * n for wi, n in zip(w, lengths)] == pytest.approx([0.5, 0.5])
    # const_norm: divide by sequences x max length, whatever the lengths.
    w = token_weights(lengths, "const_norm", global_tokens=6, global_seqs=2, max_new_tokens=8)
    assert w == pytest.approx([1 / 16, 1 / 16])
    with pytest.raises(ValueError, match="rlvr.loss_agg"):
        token_weights(lengths, "sum", 6, 2, 8)


def test_clipped_loss_gradient_vanishes_outside_the_trust_region():
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    # ratios: 1.5 (A>0: clipped above 1.28), 1.0, 0.5 (A<0: clipped below 0.8), 1.0
    logp = torch.log(torch.tensor([1.5, 1.0, 0.5, 1.0])).requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, old, adv, torch.ones(4), eps_low=0.2, eps_high=0.28)
    loss.backward()
    assert stats["clipped"].item() == 2
    assert logp.grad[0] == 0 and logp.grad[2] == 0
    assert logp.grad[1] == pytest.approx(-1.0) and logp.grad[3] == pytest.approx(1.0)


def test_on_policy_loss_is_the_policy_gradient():
    """With ratio = 1 the surrogate's gradient is -A * weight for each token."""
    logp = torch.tensor([-1.0, -2.0, -0.5]).requires_grad_(True)
    adv = torch.tensor([0.5, -1.0, 2.0])
    w = torch.tensor([0.1, 0.2, 0.3])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, w, 0.2, 0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * w)


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0])
    zero, st = clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2), 0.2, 0.2, ref_logp=logp, kl_coef=1.0)
    assert zero.item() == 0 and st["kl"].item() == 0
    pos, st = clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2), 0.2, 0.2,
                                  ref_logp=logp - 0.5, kl_coef=1.0)
    assert pos.item() > 0 and st["kl"].item() > 0


# --- hand-worked numbers, with global counts that differ from this process's ---------------------
def test_token_weights_normalise_by_the_global_batch_not_the_local_one():
    """This process holds 2 sequences of 3 and 5 tokens; all processes together hold 4 sequences
    and 20 tokens. GRPO/DAPO token_mean: 1/20 a token; seq_mean: 1/(n_i * 4); Dr. GRPO
    const_norm (max 8 tokens): 1/(4 * 8)."""
    assert token_weights([3, 5], "token_mean", 20, 4, 8) == pytest.approx([1 / 20, 1 / 20])
    assert token_weights([3, 5], "seq_mean", 20, 4, 8) == pytest.approx([1 / 12, 1 / 20])
    assert token_weights([3, 5], "const_norm", 20, 4, 8) == pytest.approx([1 / 32, 1 / 32])


@pytest.mark.parametrize("agg, expected", [("token_mean", 0.5), ("seq_mean", 0.0), ("const_norm", 0.25)])
def test_aggregated_on_policy_loss_by_hand(agg, expected):
    """Sequence A: 1 token, advantage +1; sequence B: 3 tokens, advantage -1; ratio 1.
    token_mean (4 tokens): -(1/4) + 3/4 = 0.5. seq_mean (2 sequences): -(1/2) + 3 * (1/6) = 0.
    const_norm (2 sequences, max 4 tokens): -(1/8) + 3/8 = 0.25."""
    w = token_weights([1, 3], agg, 4, 2, 4)
    weights = torch.tensor([w[0], w[1], w[1], w[1]])
    logp = torch.log(torch.tensor([0.5, 0.2, 0.3, 0.4]))
    advantages = torch.tensor([1.0, -1.0, -1.0, -1.0])
    loss, _ = clipped_policy_loss(logp, logp.detach(), advantages, weights, 0.2, 0.28)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_k3_kl_by_hand():
    """pi = 0.5, ref = 0.25 on one token: d = log(ref / pi) = -log 2, k3 = e^d - d - 1 =
    0.5 + log 2 - 1 = 0.19315 (Schulman's k3; k1 would give log 2 = 0.693, the flipped sign
    2 - log 2 - 1 = 0.307). d k3 / d logp = 1 - e^d = 0.5."""
    logp = torch.log(torch.tensor([0.5])).requires_grad_()
    ref = torch.log(torch.tensor([0.25]))
    loss, stats = clipped_policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1), 0.2, 0.2,
                                      ref_logp=ref, kl_coef=0.1)
    assert float(stats["kl"]) == pytest.approx(0.5 + math.log(2) - 1)
    assert float(loss) == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    loss.backward()
    assert float(logp.grad) == pytest.approx(0.1 * 0.5)


def test_length_penalty_by_hand():
    """reward = 1[correct] * (1 - a * L / L_max): correct answers lose a * L / L_max, wrong ones nothing,
    and the longest correct answer still earns more than any wrong one."""
    from compaction.rl import length_penalty

    correct = np.array([True, True, False, True])
    lengths = np.array([0, 40, 160, 160])
    pen = length_penalty(correct, lengths, 160, 0.5)
    assert pen.tolist() == [0.0, -0.125, 0.0, -0.5]
    reward = correct.astype(float) + pen
    assert reward.tolist() == [1.0, 0.875, 0.0, 0.5]
    assert reward[correct].min() > reward[~correct].max()
