"""Alignment losses against values worked out by hand on tiny tensors, and GAE against a naive loop."""

import math

import pytest
import torch

from llmkit.align import losses as L


def nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log(1 + math.exp(-x))


def close(t: torch.Tensor, value: float, tol: float = 1e-6) -> bool:
    return abs(float(t) - value) < tol


def test_pairwise_loss_with_and_without_margin():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert close(L.pairwise_loss(chosen, rejected), (nls(1) + nls(-2)) / 2)
    assert close(L.pairwise_loss(chosen, rejected, 0.5), (nls(0.5) + nls(-2.5)) / 2)
    assert close(L.pairwise_loss(chosen, rejected, torch.tensor([0.0, -1.0])), (nls(1) + nls(-1)) / 2)


def test_ranking_loss_averages_all_pairs_of_each_list():
    # K = 3, best first: pairs (0,1), (0,2), (1,2) with score differences 2, 3, 1
    scores = torch.tensor([[3.0, 1.0, 0.0]])
    assert close(L.ranking_loss(scores), (nls(2) + nls(3) + nls(1)) / 3)
    assert close(L.ranking_accuracy(torch.tensor([[3.0, 0.0, 1.0]])), 2 / 3)
    # K = 4: the C(4,2) = 6 explicit pairs of each list, then the mean over the two lists
    torch.manual_seed(0)
    scores = torch.randn(2, 4)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert len(pairs) == 6
    expected = sum(nls(float(scores[b, i] - scores[b, j])) for b in range(2) for i, j in pairs) / 12
    assert close(L.ranking_loss(scores), expected, 1e-5)
    # a pair is a list of two
    assert close(L.ranking_loss(torch.tensor([[1.0, 0.0], [0.0, 2.0]])), (nls(1) + nls(-2)) / 2)


def test_dpo_cdpo_and_ipo_losses():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    # h = (pc - rc) - (pr - rr) = 0.5 - (-0.5) = 1
    losses, chosen, rejected = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert close(losses, nls(0.5)) and close(chosen, 0.25) and close(rejected, -0.25)
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)  # cDPO
    assert close(losses, 0.9 * nls(0.5) + 0.1 * nls(-0.5))
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")  # (h - 1/(2 beta))^2 = (1 - 2)^2
    assert close(losses, 1.0)
    losses, _, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")  # at its target: zero
    assert close(losses, 0.0)
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")


def test_ppo_clipped_policy_loss():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.0, math.log(1.5), 5.0]])  # ratios 1, 1.5 and a padding token
    loss, clipfrac, approx_kl = L.ppo_policy_loss(logp, old, torch.ones(1, 3), mask, clip=0.2)
    # max(-A r, -A clip(r)) = max(-1, -1) and max(-1.5, -1.2): mean of -1 and -1.2
    assert close(loss, -1.1) and close(clipfrac, 0.5)
    assert close(approx_kl, 0.5 * (math.log(1.5) ** 2) / 2)
    # negative advantage: the ratio above 1 + clip is not clipped (pessimistic bound)
    loss, clipfrac, _ = L.ppo_policy_loss(logp, old, -torch.ones(1, 3), mask, clip=0.2)
    assert close(loss, (1 + 1.5) / 2) and close(clipfrac, 0.0)


def test_ppo_clipped_value_loss():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    loss, clipfrac = L.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 1: unclipped (1 - 1)^2 = 0, clipped (0.2 - 1)^2 = 0.64 -> 0.64; token 2: both 1
    assert close(loss, 0.5 * (0.64 + 1.0) / 2) and close(clipfrac, 0.5)


def naive_gae(rewards, values, lengths, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            total = 0.0
            for k in range(t, n):  # A_t = sum_k (gamma lam)^(k-t) delta_k
                v_next = values[b][k + 1] if k + 1 < n else 0.0
                delta = rewards[b][k] + gamma * v_next - values[b][k]
                total += (gamma * lam) ** (k - t) * delta
            adv[b][t] = total
    return adv


def test_gae_matches_a_naive_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    lengths = [5, 3, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    adv, returns = L.gae(rewards * mask, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor(naive_gae((rewards * mask).tolist(), values.tolist(), lengths, 0.9, 0.8))
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(returns * mask, (expected + values) * mask, atol=1e-5, rtol=0)


def test_whiten_and_kl_penalty_rewards():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    w = L.whiten(x, mask)
    real = w[mask.bool()]
    assert abs(float(real.mean())) < 1e-6 and abs(float(real.std()) - 1) < 1e-4 and float(w[0, 2]) == 0
    logp, ref = torch.tensor([[-1.0, -1.0, 0.0]]), torch.tensor([[-2.0, -0.5, 0.0]])
    rewards, kl = L.kl_penalty_rewards(torch.tensor([3.0]), logp, ref, torch.tensor([[1.0, 1.0, 0.0]]), 0.1)
    # -0.1 * (1, -0.5), and the score 3 on the last real token (index 1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.05 + 3.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[1.0, -0.5, 0.0]]))


def test_kl_controllers():
    fixed = L.FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = L.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    adaptive.update(9.0, 100)  # error 9/6 - 1 = 0.5, clipped to 0.2
    assert close(adaptive.value, 0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.update(5.4, 100)  # error -0.1
    assert close(adaptive.value, 0.1 * (1 + 0.2 * 0.01) * (1 - 0.1 * 0.01))


def test_k3_estimator_is_exact_in_expectation():
    pi, ref = torch.tensor([0.5]), torch.tensor([0.25])
    assert close(L.k3_kl(pi.log(), ref.log()), 0.5 + math.log(2) - 1)  # r - log r - 1 with r = 1/2
    # E_{x ~ pi}[k3] = KL(pi || ref) for a categorical distribution, and every term is >= 0
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ref = torch.tensor([0.25, 0.25, 0.25, 0.25])
    k3 = L.k3_kl(pi.log(), ref.log())
    assert bool((k3 >= 0).all())
    assert close((pi * k3).sum(), float((pi * (pi / ref).log()).sum()), 1e-6)


def test_group_advantages_and_grpo_loss():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = L.group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert bool((adv[4:] == 0).all())  # a group that all succeeded teaches nothing
    torch.testing.assert_close(L.group_advantages(rewards, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # two sequences of 2 and 1 tokens, ratio 1: surrogate -A per token, plus beta * k3
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.5], [0.5, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    k3 = 0.5 + math.log(2) - 1
    loss, stats = L.grpo_loss(logp, logp.detach(), ref, torch.tensor([2.0, -1.0]), mask, 0.2, beta=0.1)
    # sequence norm: ((-2 + 0.1 k3) + (-2)) / 2 for row 0, then (1 + 0) for row 1, mean of the two rows
    assert close(loss, ((-4 + 0.1 * k3) / 2 + 1.0) / 2)
    assert close(stats["kl"], k3 / 3) and close(stats["clip_fraction"], 0.0)
    loss, _ = L.grpo_loss(logp, logp.detach(), ref, torch.tensor([2.0, -1.0]), mask, 0.2, beta=0.1, norm="token")
    assert close(loss, (-4 + 0.1 * k3 + 1.0) / 3)
