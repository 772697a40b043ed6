"""The algorithm core against plain-Python computations written from the paper's formulas."""

import math
import random
import statistics

import pytest
import torch

from copd_ray.algo import (
    clip_fraction,
    grpo_advantages,
    merge_state_dicts,
    opd_advantages,
    policy_loss,
    symmetric_kl,
    topk_overlap,
)


def test_grpo_advantages_match_group_formula():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0]
    got = grpo_advantages(torch.tensor(rewards), group_size=4).tolist()
    expected = []
    for g in range(0, len(rewards), 4):
        group = rewards[g : g + 4]
        mu, sd = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mu) / (sd + 1e-6) for r in group]
    assert got == pytest.approx(expected, abs=1e-6)
    assert got[4:8] == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal


def test_grpo_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(torch.zeros(6), group_size=4)


def _plain_objective(lp, old, adv, lo, hi):
    ratio = math.exp(lp - old)
    return min(ratio * adv, min(max(ratio, 1 - lo), 1 + hi) * adv)


def _random_batch(seed, b=3, t=5):
    rng = random.Random(seed)
    lp = [[rng.uniform(-3, 0) for _ in range(t)] for _ in range(b)]
    old = [[x + rng.uniform(-0.6, 0.6) for x in row] for row in lp]
    adv = [[rng.uniform(-2, 2) for _ in range(t)] for _ in range(b)]
    mask = [[1] * rng.randint(1, t) for _ in range(b)]
    mask = [m + [0] * (t - len(m)) for m in mask]
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_loss_seq_mean_token_mean(seed):
    lp, old, adv, mask = _random_batch(seed)
    per_seq = []
    for i in range(len(lp)):
        terms = [_plain_objective(lp[i][t], old[i][t], adv[i][t], 0.2, 0.28) for t in range(len(lp[i])) if mask[i][t]]
        per_seq.append(sum(terms) / len(terms))
    expected = -sum(per_seq) / len(per_seq)
    got = policy_loss(torch.tensor(lp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask))
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [3, 4])
def test_policy_loss_token_mean(seed):
    lp, old, adv, mask = _random_batch(seed)
    terms = [
        _plain_objective(lp[i][t], old[i][t], adv[i][t], 0.1, 0.3)
        for i in range(len(lp)) for t in range(len(lp[i])) if mask[i][t]
    ]
    got = policy_loss(torch.tensor(lp), torch.tensor(old), torch.tensor(adv), torch.tensor(mask),
                      clip_low=0.1, clip_high=0.3, agg="token_mean")
    assert got.item() == pytest.approx(-sum(terms) / len(terms), rel=1e-5)


def test_policy_loss_gradient_sign_and_clipping():
    # Positive advantage, ratio already past 1 + clip_high: clipped, so no gradient.
    lp = torch.tensor([[0.5]], requires_grad=True)
    policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)).backward()
    assert lp.grad.item() == 0.0
    # Inside the trust region a positive advantage pushes the log-prob up (loss falls).
    lp = torch.tensor([[0.0]], requires_grad=True)
    policy_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)).backward()
    assert lp.grad.item() < 0


def test_policy_loss_kl_penalty_is_opt_in():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask, adv = torch.ones(1, 2), torch.zeros(1, 2)
    assert policy_loss(lp, lp, adv, mask).item() == 0.0
    k3 = [math.exp(r - l) - (r - l) - 1 for l, r in zip([-1.0, -2.0], [-1.5, -1.0])]
    got = policy_loss(lp, lp, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert got.item() == pytest.approx(0.1 * sum(k3) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp, adv, mask, kl_coef=0.1)


def test_policy_loss_accepts_sequence_advantages_and_rejects_unknown_agg():
    lp, old, mask = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    got = policy_loss(lp, old, torch.tensor([1.0, -3.0]), mask)
    assert got.item() == pytest.approx(-(1.0 - 3.0) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(lp, old, torch.zeros(2, 3), mask, agg="sum")


def test_clip_fraction_counts_tokens_outside_the_range():
    lp = torch.log(torch.tensor([[0.7, 1.0, 1.3, 2.0]]))
    got = clip_fraction(lp, torch.zeros(1, 4), torch.tensor([[1, 1, 1, 0]]))
    assert got.item() == pytest.approx(2 / 3)  # 0.7 and 1.3 are out; 2.0 is masked


def test_opd_advantages_are_scaled_differences_without_gradient():
    teacher = torch.tensor([[-0.1, -2.0, -0.5]])
    student = torch.tensor([[-1.0, -1.0, -0.5]], requires_grad=True)
    got = opd_advantages(teacher, student, beta=0.5)
    assert got.tolist()[0] == pytest.approx([0.45, -0.5, 0.0])
    assert not got.requires_grad
    with pytest.raises(ValueError, match="shape"):
        opd_advantages(teacher, student[:, :2], beta=1.0)
    # One beta per row: each row's teacher edge's.
    rows = opd_advantages(torch.cat([teacher, teacher]), torch.cat([student, student]), torch.tensor([[0.5], [2.0]]))
    assert rows.tolist()[0] == pytest.approx([0.45, -0.5, 0.0]) and rows.tolist()[1] == pytest.approx([1.8, -2.0, 0.0])


def test_topk_overlap_counts_shared_ids():
    student = torch.tensor([[[5.0, 4.0, 3.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]]])
    teacher = torch.tensor([[[5.0, 0.0, 4.0, 3.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]]])
    # position 0: top3 {0,1,2} vs {0,2,3} -> 2/3; position 1: {4,3,2} vs {0,1,2} -> 1/3
    both = topk_overlap(student, teacher, k=3, mask=torch.tensor([[1, 1]]))
    assert both.item() == pytest.approx(0.5)
    first = topk_overlap(student, teacher, k=3, mask=torch.tensor([[1, 0]]))
    assert first.item() == pytest.approx(2 / 3)
    assert topk_overlap(student, student, k=2, mask=torch.ones(1, 2)).item() == 1.0


def test_symmetric_kl_matches_plain_sums():
    rng = random.Random(7)
    s = [[[rng.gauss(0, 1) for _ in range(6)] for _ in range(3)]]
    t = [[[rng.gauss(0, 1) for _ in range(6)] for _ in range(3)]]
    mask = [[1, 1, 0]]

    def softmax(xs):
        z = sum(math.exp(x) for x in xs)
        return [math.exp(x) / z for x in xs]

    per_pos = []
    for pos in range(2):
        p, q = softmax(s[0][pos]), softmax(t[0][pos])
        per_pos.append(sum(a * math.log(a / b) for a, b in zip(p, q)) + sum(b * math.log(b / a) for a, b in zip(p, q)))
    got = symmetric_kl(torch.tensor(s), torch.tensor(t), torch.tensor(mask))
    assert got.item() == pytest.approx(sum(per_pos) / 2, rel=1e-5)
    assert symmetric_kl(torch.tensor(s), torch.tensor(s), torch.tensor(mask)).item() == pytest.approx(0.0, abs=1e-6)


def _sd(*values):
    return {"w": torch.tensor(values[:2]), "b": torch.tensor([values[2]]), "steps": torch.tensor([7])}


def test_merge_mean_and_weighted_mean():
    a, b = _sd(1.0, 2.0, 3.0), _sd(3.0, 6.0, -1.0)
    merged = merge_state_dicts([a, b])
    assert merged["w"].tolist() == [2.0, 4.0] and merged["b"].tolist() == [1.0]
    assert merged["steps"].tolist() == [7]  # integer buffers are copied, not averaged
    weighted = merge_state_dicts([a, b], weights=[3.0, 1.0])
    assert weighted["w"].tolist() == pytest.approx([(3 * 1 + 3) / 4, (3 * 2 + 6) / 4])


def test_merge_task_arithmetic():
    base, a, b = _sd(0.0, 0.0, 1.0), _sd(1.0, 2.0, 3.0), _sd(3.0, 6.0, -1.0)
    merged = merge_state_dicts([a, b], base=base, method="task_arithmetic")
    # base + (1/2)(a - base) + (1/2)(b - base)
    assert merged["w"].tolist() == pytest.approx([2.0, 4.0])
    assert merged["b"].tolist() == pytest.approx([1.0 + 0.5 * 2 + 0.5 * -2])
    full = merge_state_dicts([a, b], weights=[1.0, 1.0], base=base, method="task_arithmetic")
    assert full["w"].tolist() == pytest.approx([4.0, 8.0])


def test_merge_keeps_dtype_and_rejects_mismatches():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16)}
    assert merge_state_dicts([a, b])["w"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts([a, {"v": torch.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        merge_state_dicts([a, {"w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="needs the base"):
        merge_state_dicts([a, b], method="task_arithmetic")
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_state_dicts([a, b], method="ties")


def test_algo_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, copd_ray.algo; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_chunked_chosen_logprobs_equal_the_full_log_softmax_with_gradients():
    from copd_ray.algo import chosen_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    banned = (3, 7)

    # Plainly: the whole [N, V] float32 logits, banned tokens pushed out, log-softmax, gather.
    logits = head(hidden).float()
    logits[:, list(banned)] = -1e9
    full = torch.log_softmax(logits, -1)
    expected = full.gather(1, targets[:, None]).squeeze(1)
    expected_entropy = -(full.exp() * full).sum(-1)
    expected.sum().backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None

    for chunk in (1, 5, 23, 100):
        got, _, _ = chosen_logprobs(head, hidden, targets, chunk, banned)
        assert torch.allclose(got, expected, atol=1e-5)
        got.sum().backward()  # each chunk recomputed in backward: same gradients
        assert torch.allclose(hidden.grad, grads[0], atol=1e-5) and torch.allclose(head.weight.grad, grads[1], atol=1e-5)
        hidden.grad, head.weight.grad = None, None
        with torch.no_grad():
            lp, entropy, _ = chosen_logprobs(head, hidden, targets, chunk, banned, entropy=True)
        assert torch.allclose(lp, expected, atol=1e-5) and torch.allclose(entropy, expected_entropy, atol=1e-5)


def test_a_loss_split_into_parts_with_the_whole_denominator_adds_up_to_the_whole():
    torch.manual_seed(1)
    logp, old, adv = torch.randn(6, 5) * 0.1 - 1, torch.randn(6, 5) * 0.1 - 1, torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    for agg, whole_count in (("token_mean", mask.sum().item()), ("seq_mean_token_mean", 6.0)):
        whole = policy_loss(logp, old, adv, mask, agg=agg)
        parts = sum(policy_loss(logp[i:j], old[i:j], adv[i:j], mask[i:j], agg=agg, denominator=whole_count)
                    for i, j in ((0, 1), (1, 4), (4, 6)))
        assert torch.allclose(parts, whole, atol=1e-6)


def test_micro_batches_stay_within_the_token_budget():
    from copd_ray.batch import pack_microbatches

    lengths = [5, 9, 3, 9, 7, 2, 12]
    packed = pack_microbatches(list(range(7)), lengths, 20)
    assert sorted(i for mb in packed for i in mb) == list(range(7))
    assert all(len(mb) * max(lengths[i] for i in mb) <= 20 or len(mb) == 1 for mb in packed)
    assert pack_microbatches([2, 0], lengths, None) == [[2, 0]]
    assert pack_microbatches([], lengths, 20) == []


# -- off-policy correction and pair metrics from top-k only -------------------------------------


def test_truncated_is_weight_is_one_on_policy_and_matches_a_hand_computation():
    from copd_ray.algo import truncated_is_weight

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    assert torch.equal(truncated_is_weight(old, old.clone(), 2.0), torch.ones(1, 3))
    behaviour = torch.tensor([[-1.5, -0.5, -0.5 - math.log(4.0)]])
    # exp(-1.0 + 1.5) = 1.6487; exp(-2.0 + 0.5) = 0.2231; exp(log 4) = 4, truncated to 2.
    assert truncated_is_weight(old, behaviour, 2.0).tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-1.5), 2.0])
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weight(old, behaviour, 0.0)


def test_the_importance_weight_scales_each_tokens_surrogate():
    from copd_ray.algo import policy_loss

    logp = torch.tensor([[-1.0, -1.2]])
    old = torch.tensor([[-1.1, -1.0]])
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    ratio = [math.exp(0.1), math.exp(-0.2)]
    # token 0: min(r A, clip(r) A) = r (inside the clip); token 1: A < 0, r = 0.82 -> max of the two = clip: 0.8 * -2
    per_token = [-min(ratio[0] * 1.0, min(max(ratio[0], 0.8), 1.28) * 1.0) * 0.5,
                 -min(ratio[1] * -2.0, min(max(ratio[1], 0.8), 1.28) * -2.0) * 2.0]
    got = policy_loss(logp, old, adv, mask, 0.2, 0.28, "token_mean", is_weight=w)
    assert got.item() == pytest.approx(sum(per_token) / 2)


def test_topk_pair_metrics_overlap_is_exact_and_kl_a_tight_lower_bound():
    from copd_ray.algo import symmetric_kl, topk_overlap, topk_pair_metrics

    torch.manual_seed(0)
    vocab = 40
    s_logits, t_logits = torch.randn(3, 5, vocab) * 2, torch.randn(3, 5, vocab) * 2
    mask = torch.ones(3, 5)
    mask[2, 3:] = 0
    exact_kl = symmetric_kl(s_logits, t_logits, mask).item()
    bounds = []
    for k_share in (10, 20, vocab):
        s_top, t_top = s_logits.log_softmax(-1).topk(k_share, -1), t_logits.log_softmax(-1).topk(k_share, -1)
        overlap, kl = topk_pair_metrics(s_top.indices, s_top.values, t_top.indices, t_top.values, 5, mask)
        assert overlap.item() == pytest.approx(topk_overlap(s_logits, t_logits, 5, mask).item())
        bounds.append(kl.item())
    assert 0 <= bounds[0] <= bounds[1] <= bounds[2] + 1e-6
    assert bounds[1] <= exact_kl + 1e-6
    assert bounds[2] == pytest.approx(exact_kl, rel=1e-5)  # the whole vocabulary shared: exact

    # Hand computation at one position: tokens {0, 1} in both top-2 sets, the rest one bin.
    p_s, p_t = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    kl = topk_pair_metrics(torch.tensor([[[0, 1]]]), p_s[:2].log().view(1, 1, 2), torch.tensor([[[1, 0]]]),
                           p_t[[1, 0]].log().view(1, 1, 2), 2, torch.ones(1, 1))[1].item()
    assert kl == pytest.approx(sum((a - b) * math.log(a / b) for a, b in zip(p_s.tolist(), p_t.tolist())))
