"""Tests for trl_appo.core: hand-computed cases, loop references vs the vectorised code, masks, degenerate
inputs and bad inputs. Pure CPU, no TRL import (TRL's advantage block is copied verbatim below as reference;
one slow-marked test checks that copy's nanstd against TRL itself)."""

import math

import pytest
import torch

from trl_appo import core
from trl_appo.core import (
    BRANCH_CRITERIA,
    FALLBACK_CODES,
    FUTURE_KL_FORMS,
    BranchingScore,
    BranchPoints,
    branch_candidates,
    branch_credit,
    branching_score,
    discounted_suffix_sum,
    dual_group_advantages,
    future_kl_weights,
    get_branch_criterion,
    get_future_kl_form,
    select_branch_points,
)

SEEDS = [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# helpers: masks with tool holes and right padding, plain-python references
# ----------------------------------------------------------------------------------------------------------------


def random_mask(B, T, gen):
    """Model-token mask with right padding (random lengths, some rows empty) and tool-output holes."""
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    if B > 1:
        lengths[0] = T  # one full row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    for b in range(B):
        for _ in range(2):  # up to two tool-output spans
            if lengths[b] > 4:
                start = int(torch.randint(1, int(lengths[b]) - 2, (1,), generator=gen))
                width = int(torch.randint(1, 4, (1,), generator=gen))
                mask[b, start : start + width] = False
    return mask, lengths


def garbage_off_mask(x, mask):
    """Put NaN/inf where the mask is off: the functions must never read those values."""
    out = x.clone()
    off = ~mask
    out[off] = float("nan")
    if off.any():
        out[off.nonzero()[0][0], off.nonzero()[0][1]] = float("inf")
    return out


def loop_suffix_sum(x, mask, gamma):
    B, T = x.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        acc = 0.0
        for t in reversed(range(T)):
            acc = acc * gamma + (float(x[b, t]) * float(mask[b, t]) if mask[b, t] else 0.0)
            out[b, t] = acc
    return out


def loop_branching_score(entropy, lc, lr, mask, gamma=1.0, clip=0.2, eps=1e-6, tol=1e-6):
    B, T = entropy.shape
    scores, zh_all, zo_all, om_all = (torch.zeros(B, T, dtype=torch.float64) for _ in range(4))
    degenerate = torch.ones(B, dtype=torch.bool)
    gain = loop_suffix_sum(lc.double() - lr.double(), mask, gamma)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        if not idx:
            continue
        om = [min(max(math.exp(max(-20.0, min(20.0, float(gain[b, t])))), 1 - clip), 1 + clip) for t in idx]
        h = [float(entropy[b, t]) for t in idx]

        def z(v):
            mean = sum(v) / len(v)
            std = math.sqrt(sum((a - mean) ** 2 for a in v) / len(v))
            return [0.0] * len(v) if std < tol else [(a - mean) / (std + eps) for a in v], std < tol

        zh, _ = z(h)
        zo, flat = z(om)
        degenerate[b] = flat
        for j, t in enumerate(idx):
            om_all[b, t] = om[j]
            zh_all[b, t] = zh[j]
            zo_all[b, t] = zo[j]
            scores[b, t] = zh[j] if flat else zh[j] * zo[j]
    return scores, zh_all, zo_all, om_all, degenerate


def loop_select(scores, cands, K, criterion="bs", group_size=1, min_distance=0, entropy=None, rand=None):
    """Plain-python selection: sort tuples, greedy spacing, relax, cycle, -1."""
    B, T = cands.shape
    ekey = entropy if entropy is not None else (scores.z_entropy if scores is not None else None)
    roots, positions, codes = [], [], []
    for g in range(B // group_size):
        items = []
        for r in range(group_size):
            b = g * group_size + r
            for t in range(T):
                if not cands[b, t]:
                    continue
                if criterion == "bs":
                    zh, zo, bs = float(scores.z_entropy[b, t]), float(scores.z_omega[b, t]), float(scores.scores[b, t])
                    deg = bool(scores.degenerate[b])  # degenerate: no strict pick, all by entropy (code 2)
                    strict = zh > 0 and zo > 0 and not deg
                    tier = 0 if strict else (1 if bs > 0 and not deg else 2)
                    prim = bs if tier < 2 else float(ekey[b, t])
                    sec = float(ekey[b, t]) if tier < 2 else 0.0
                elif criterion == "entropy":
                    tier, prim, sec = 2, float(ekey[b, t]), 0.0
                else:
                    tier, prim, sec = 3, float(rand[b, t]), 0.0
                items.append((tier, -prim, -sec, t, r))
        items.sort()
        quota = group_size * K
        if not items:
            for j in range(quota):
                roots.append(g * group_size + j // K)
                positions.append(-1)
                codes.append(5)
            continue
        chosen, skipped = [], []
        for it in items:
            if len(chosen) == quota:
                break
            if min_distance <= 1 or all(abs(it[3] - c[3]) >= min_distance for c in chosen if c[4] == it[4]):
                chosen.append(it)
            else:
                skipped.append(it)
        picked = (chosen + skipped)[:quota]
        for j in range(quota):
            it = picked[j % len(picked)]
            roots.append(g * group_size + it[4])
            positions.append(it[3])
            codes.append(it[0] if j < len(picked) else 4)
    return roots, positions, codes


def loop_branch_credit(ra, ba, broot, bpos, bscore, mask, rho, lam, prefix=True, proc=True):
    R, T = mask.shape
    valid = [j for j in range(len(ba)) if bpos[j] >= 0]
    mx = max([max(float(bscore[j]), 0.0) for j in valid], default=0.0)
    out = torch.zeros(R, T, dtype=torch.float64)
    for i in range(R):
        for t in range(T):
            if not mask[i, t]:
                continue
            C = [j for j in valid if int(broot[j]) == i and int(bpos[j]) >= t]
            a = float(ra[i])
            if prefix and C:
                a += sum(float(ba[j]) for j in C) / len(C)
            s = 1.0
            if proc and C:
                terms = []
                for j in C:
                    w = max(float(bscore[j]), 0.0) / mx if mx > 0 else 0.0
                    terms.append(1 + lam * w * rho ** (int(bpos[j]) - t))
                s = sum(terms) / len(terms)
            out[i, t] = a * s
    return out


def loop_future_kl(lc, lo, mask, adv, decay, clip, high_only, weight, thresh, c, form):
    B, T = lc.shape
    g = 2 ** (-1 / decay)
    mult = torch.ones(B, T, dtype=torch.float64)
    f_out = torch.zeros(B, T, dtype=torch.float64)
    fk_out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        acc = 0.0
        deltas = {}
        for t in reversed(range(T)):
            if mask[b, t]:
                d = max(-20.0, min(20.0, float(lc[b, t]) - float(lo[b, t])))
                deltas[t] = d
                if d <= math.log(c):
                    acc = acc * g + d
                else:
                    acc = acc * g
            else:
                acc = acc * g
            fk_out[b, t] = acc if mask[b, t] else 0.0
        for t in range(T):
            if not mask[b, t]:
                continue
            f = min(max(math.exp(fk_out[b, t]), 1.0 if high_only else 1 - clip), 1 + clip)
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            if a < 0 and math.exp(deltas[t]) > thresh:
                f = min(f, 1.0)
            f_out[b, t] = f
            mult[b, t] = 1 + weight * f if form == "appo" else f
    return mult, f_out, fk_out


# TRL 1.16 GRPOTrainer advantage block (trl/trainer/grpo_trainer.py ~L2746-2790) and trl.trainer.utils.nanstd,
# copied verbatim (self.* replaced by arguments) as the bit-for-bit reference.
def trl_nanstd(tensor, dim=None, keepdim=False):
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)  # count of non-NaN values
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction  # Bessel's correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, multi_objective_aggregation):
    nanstd = trl_nanstd
    device = rewards_per_func.device
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            if num_generations > 1:
                std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
                std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
            else:
                std_rewards = torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            if rewards.numel() > 1:
                std_rewards = nanstd(rewards).expand_as(rewards)
            else:
                std_rewards = torch.zeros_like(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def make_scores(z_h, z_o, degenerate=None):
    z_h = torch.as_tensor(z_h, dtype=torch.float32)
    z_o = torch.as_tensor(z_o, dtype=torch.float32)
    if z_h.dim() == 1:
        z_h, z_o = z_h[None], z_o[None]
    deg = torch.zeros(z_h.shape[0], dtype=torch.bool) if degenerate is None else torch.tensor(degenerate)
    scores = torch.where(deg[:, None], z_h, z_h * z_o)
    return BranchingScore(scores, z_h, torch.where(deg[:, None], 0.0, z_o), torch.ones_like(z_h), deg)


# ----------------------------------------------------------------------------------------------------------------
# discounted_suffix_sum
# ----------------------------------------------------------------------------------------------------------------


def test_suffix_sum_hand_case():
    # x = [1, 2, 3, 4], mask = [1, 0, 1, 1], gamma = 0.5
    # out[3] = 4
    # out[2] = 3 + 0.5*4 = 5
    # out[1] = 0 (masked) + 0.5*5 = 2.5
    # out[0] = 1 + 0.5*2.5 = 2.25
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[1, 0, 1, 1]])
    assert torch.allclose(discounted_suffix_sum(x, m, 0.5), torch.tensor([[2.25, 2.5, 5.0, 4.0]]))
    # gamma = 1: plain suffix sums 1+3+4=8, 3+4=7, 7, 4;  gamma = 0: the masked values themselves
    assert torch.allclose(discounted_suffix_sum(x, m, 1.0), torch.tensor([[8.0, 7.0, 7.0, 4.0]]))
    assert torch.allclose(discounted_suffix_sum(x, m, 0.0), torch.tensor([[1.0, 0.0, 3.0, 4.0]]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T", [1, 7, 128, 300, 1000])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.97, 2 ** (-1 / 64), 1.0])
def test_suffix_sum_matches_loop(seed, T, gamma):
    gen = torch.Generator().manual_seed(seed)
    B = 3
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask, _ = random_mask(B, T, gen)
    out = discounted_suffix_sum(garbage_off_mask(x, mask), mask, gamma)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loop_suffix_sum(x, mask, gamma), rtol=1e-9, atol=1e-9)


def test_suffix_sum_long_row_no_overflow_float32():
    # gamma^-T would overflow at T=8192 for gamma_F = 2^(-1/64) (2^128); the blocked scan never forms it.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8192, generator=gen)
    mask = torch.ones(2, 8192, dtype=torch.bool)
    gamma = 2 ** (-1 / 64)
    out = discounted_suffix_sum(x, mask, gamma)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = torch.zeros(2, dtype=torch.float64)
    expected = torch.empty(2, 8192, dtype=torch.float64)
    xd = x.double()
    for t in reversed(range(8192)):  # vector-over-B loop reference
        ref = ref * gamma + xd[:, t]
        expected[:, t] = ref
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_suffix_sum_empty_and_weights():
    assert discounted_suffix_sum(torch.zeros(0, 5), torch.zeros(0, 5), 0.9).shape == (0, 5)
    assert discounted_suffix_sum(torch.zeros(3, 0), torch.zeros(3, 0), 0.9).shape == (3, 0)
    # float mask acts as a weight: 0.5*2 = 1, then 1*0.5 = 0.5 at t=0 (x[0]=0)
    out = discounted_suffix_sum(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.5]]), 0.5)
    assert torch.allclose(out, torch.tensor([[0.5, 1.0]]))
    # bf16 input is computed in float32
    assert discounted_suffix_sum(torch.ones(1, 3, dtype=torch.bfloat16), torch.ones(1, 3), 1.0).dtype == torch.float32


def test_suffix_sum_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        discounted_suffix_sum(x, torch.ones(2, 4), 0.9)
    with pytest.raises(ValueError, match="2-D"):
        discounted_suffix_sum(torch.zeros(3), torch.ones(3), 0.9)
    with pytest.raises(ValueError, match="device"):
        discounted_suffix_sum(x, torch.ones(2, 3, device="meta"), 0.9)
    with pytest.raises(ValueError, match="floating"):
        discounted_suffix_sum(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 0.9)
    with pytest.raises(ValueError, match="gamma"):
        discounted_suffix_sum(x, torch.ones(2, 3), 1.5)


# ----------------------------------------------------------------------------------------------------------------
# branching_score
# ----------------------------------------------------------------------------------------------------------------


def test_branching_score_hand_case():
    # log-ratio d = [0.1, 0, -0.1, 0.05], gamma = 1 → suffix sums [0.05, -0.05, -0.05, 0.05]
    # Ω = exp(.) = [e^.05, e^-.05, e^-.05, e^.05] (inside [0.8, 1.2]); mean = cosh(.05), population std = sinh(.05)
    # z(Ω) = [1, -1, -1, 1] · sinh/(sinh + 1e-6)
    # H = [2, 0, 1, 1]: mean 1, deviations [1, -1, 0, 0], var 0.5, std 0.70711 → z(H) = [1.41421, -1.41421, 0, 0]
    # BS = z(H)·z(Ω) = [1.41421, 1.41421, 0, 0]
    lr = torch.zeros(1, 4)
    lc = torch.tensor([[0.1, 0.0, -0.1, 0.05]])
    H = torch.tensor([[2.0, 0.0, 1.0, 1.0]])
    out = branching_score(H, lc, lr, torch.ones(1, 4, dtype=torch.bool))
    s = math.sinh(0.05)
    zo = s / (s + 1e-6)
    zh = 0.5**0.5 / (0.5**0.5 + 1e-6) * 2**0.5
    torch.testing.assert_close(out.omega, torch.tensor([[math.exp(0.05), math.exp(-0.05), math.exp(-0.05), math.exp(0.05)]]))
    torch.testing.assert_close(out.z_omega, torch.tensor([[zo, -zo, -zo, zo]]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.z_entropy, torch.tensor([[zh, -zh, 0.0, 0.0]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores, torch.tensor([[zh * zo, zh * zo, 0.0, 0.0]]), rtol=1e-4, atol=1e-4)
    assert out.degenerate.tolist() == [False]


def test_branching_score_degenerate_rows():
    # Row 0: π_θ = π_ref → Ω ≡ 1 → degenerate, BS = z(H).
    # Row 1: huge gains → Ω clipped to 1.2 everywhere → constant → degenerate too.
    # Row 2: no model token → zeros, degenerate.  Row 3: a single model token → std 0 → zeros, degenerate.
    H = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0], [5.0, 5.0, 5.0], [4.0, 1.0, 1.0]])
    lc = torch.tensor([[-1.0, -2.0, -3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    lr = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    out = branching_score(H, lc, lr, mask)
    assert out.degenerate.tolist() == [True, True, True, True]
    # z(H) row 0: mean 2, std sqrt(2/3) = 0.8165 → [-1.2247, 1.2247, 0]
    zh = 1 / (math.sqrt(2 / 3) + 1e-6)
    torch.testing.assert_close(out.scores[0], torch.tensor([-zh, zh, 0.0]))
    torch.testing.assert_close(out.scores[1], out.z_entropy[1])
    assert torch.equal(out.z_omega, torch.zeros(4, 3))
    assert torch.equal(out.omega[1], torch.full((3,), 1.2))
    assert torch.equal(out.scores[2:], torch.zeros(2, 3))
    for t in out[:4]:
        assert torch.isfinite(t).all()


def test_branching_score_constant_entropy_gives_zero_not_noise():
    # mean of [0.1]*3 may differ from 0.1 by an ulp; the z-score must still be exactly 0, not ulp/1e-6.
    H = torch.full((1, 3), 0.1)
    out = branching_score(H, torch.tensor([[0.3, 0.0, 0.0]]), torch.zeros(1, 3), torch.ones(1, 3))
    assert torch.equal(out.z_entropy, torch.zeros(1, 3))
    assert torch.equal(out.scores, torch.zeros(1, 3)) and not out.degenerate[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_branching_score_matches_loop_and_respects_mask(seed, gamma):
    gen = torch.Generator().manual_seed(seed)
    B, T = 6, 40
    mask, _ = random_mask(B, T, gen)
    H = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    lr = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    lc = lr + 0.05 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lc[1] = lr[1]  # one degenerate row
    out = branching_score(garbage_off_mask(H, mask), garbage_off_mask(lc, mask), garbage_off_mask(lr, mask), mask, gamma=gamma)
    ref = loop_branching_score(H, lc, lr, mask, gamma=gamma)
    for got, exp in zip(out[:4], ref[:4]):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-7)
        assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    assert torch.equal(out.degenerate, ref[4])
    assert bool(out.degenerate[1])


def test_branching_score_empty_and_T1():
    out = branching_score(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    assert out.scores.shape == (0, 4) and out.degenerate.shape == (0,)
    out = branching_score(torch.ones(2, 1), torch.zeros(2, 1), torch.ones(2, 1), torch.ones(2, 1))
    assert torch.equal(out.scores, torch.zeros(2, 1)) and out.degenerate.all()


def test_branching_score_bad_inputs():
    H, lp, m = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="logp_reference"):
        branching_score(H, lp, torch.zeros(2, 4), m)
    with pytest.raises(ValueError, match="device"):
        branching_score(H, lp, torch.zeros(2, 3, device="meta"), m)
    with pytest.raises(ValueError, match="floating"):
        branching_score(H, lp.long(), lp, m)
    bad = lp.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"`logp_current`.*row 1, token 2.*mask it out"):
        branching_score(H, bad, lp, m)
    bad[1, 2] = -float("inf")
    with pytest.raises(ValueError, match="logp_reference"):
        branching_score(H, lp, bad, m)
    m2 = m.clone()
    m2[1, 2] = 0  # the same non-finite value off the mask is ignored
    assert torch.isfinite(branching_score(H, lp, bad, m2).scores).all()
    mixed = branching_score(H.double(), lp.float(), lp.bfloat16(), m)  # mixed float dtypes are promoted
    assert mixed.scores.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------
# branch_candidates
# ----------------------------------------------------------------------------------------------------------------


def test_branch_candidates_hand_case():
    # T = 6, one row of length 5 (token 5 is padding), tool token at 2, whitespace at 1.
    # max_completion_length = 7, min_branch_tokens = 3 → need 7 - (s+1) >= 3 → s <= 3.
    # not final: s < 5 - 1 = 4.  → candidates: 0 (yes), 1 (whitespace), 2 (tool), 3 (yes), 4 (final), 5 (pad)
    mm = torch.tensor([[1, 1, 0, 1, 1, 0]])
    ws = torch.tensor([[0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    out = branch_candidates(mm, torch.tensor([5]), 7, min_branch_tokens=3, whitespace_mask=ws)
    assert out.tolist() == [[True, False, False, True, False, False]]
    # min_branch_tokens = 5 → s <= 1 → only token 0 remains
    assert branch_candidates(mm, torch.tensor([5]), 7, 5, ws).tolist() == [[True] + [False] * 5]


@pytest.mark.parametrize("seed", SEEDS)
def test_branch_candidates_matches_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    B, T, M, k = 5, 30, 32, 4
    mask, lengths = random_mask(B, T, gen)
    ws = torch.rand(B, T, generator=gen) < 0.2
    out = branch_candidates(mask, lengths, M, k, ws)
    for b in range(B):
        for s in range(T):
            exp = bool(mask[b, s]) and not bool(ws[b, s]) and s < int(lengths[b]) - 1 and M - (s + 1) >= k
            assert bool(out[b, s]) == exp


def test_branch_candidates_degenerate_and_bad():
    assert branch_candidates(torch.ones(0, 3), torch.zeros(0, dtype=torch.long), 3).shape == (0, 3)
    assert not branch_candidates(torch.ones(2, 1), torch.tensor([1, 0]), 8).any()  # T=1: only a final token
    with pytest.raises(ValueError, match="completion_lengths"):
        branch_candidates(torch.ones(2, 3), torch.tensor([3, 4]), 8)
    with pytest.raises(ValueError, match="integer"):
        branch_candidates(torch.ones(2, 3), torch.tensor([3.0, 2.0]), 8)
    with pytest.raises(ValueError, match="rows"):
        branch_candidates(torch.ones(2, 3), torch.tensor([3]), 8)
    with pytest.raises(ValueError, match="whitespace_mask"):
        branch_candidates(torch.ones(2, 3), torch.tensor([3, 3]), 8, whitespace_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="device"):
        branch_candidates(torch.ones(2, 3), torch.tensor([3, 3], device="meta"), 8)


# ----------------------------------------------------------------------------------------------------------------
# select_branch_points
# ----------------------------------------------------------------------------------------------------------------

# One row, T = 6:
#   z_H = [1, 2, -1,  0.5, -2, 1]
#   z_Ω = [1, .5, -1, -1,  -1, 2]
#   BS  = [1, 1,  1,  -.5,  2, 2]
# candidates: all but token 5 (final).
# strict (z_H>0, z_Ω>0): 0 (BS 1), 1 (BS 1) → BS tie broken by entropy: 1 (z_H 2) then 0.
# BS fill (BS>0, not strict): 4 (BS 2), 2 (BS 1).   entropy fill: 3.
# rank: 1, 0, 4, 2, 3
HAND = make_scores([1, 2, -1, 0.5, -2, 1], [1, 0.5, -1, -1, -1, 2])
HAND_CANDS = torch.tensor([[True] * 5 + [False]])


def test_select_hand_case_ranking_and_fallback():
    bp = select_branch_points(HAND, HAND_CANDS, 4)
    assert bp.position.tolist() == [1, 0, 4, 2]
    assert bp.fallback.tolist() == [0, 0, 1, 1]
    assert bp.strict.tolist() == [True, True, False, False]
    assert bp.root.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(bp.score, torch.tensor([1.0, 1.0, 2.0, 1.0]))
    # K = 7 > 5 candidates: 5 real points then the chosen points cycled, code 4 (documented duplicates)
    bp = select_branch_points(HAND, HAND_CANDS, 7)
    assert bp.position.tolist() == [1, 0, 4, 2, 3, 1, 0]
    assert bp.fallback.tolist() == [0, 0, 1, 1, 2, 4, 4]


def test_select_hand_case_min_distance():
    # min_distance 2, K = 3: 1 accepted; 0 rejected (|0-1|<2); 4 accepted; 2 rejected (|2-1|<2);
    # 3 rejected (|3-4|<2). Only 2 spaced points → relax in rank order: add 0.
    bp = select_branch_points(HAND, HAND_CANDS, 3, min_distance=2)
    assert bp.position.tolist() == [1, 4, 0]
    assert bp.fallback.tolist() == [0, 1, 0]
    bp = select_branch_points(HAND, HAND_CANDS, 2, min_distance=2)
    assert bp.position.tolist() == [1, 4]


def test_select_hand_case_entropy_and_degenerate():
    # criterion entropy: z_H desc over candidates 0..4 = [1, 2, -1, .5, -2] → 1, 0, 3
    bp = select_branch_points(HAND, HAND_CANDS, 3, criterion="entropy")
    assert bp.position.tolist() == [1, 0, 3] and bp.fallback.tolist() == [2, 2, 2] and not bp.strict.any()
    # degenerate row: BS := z_H and no strict candidate (z_Ω ≡ 0): every pick is the entropy fallback (code 2),
    # ranked by entropy: tokens 1 (2), 0 (1), 3 (.5), 2 (-1)
    deg = make_scores([[1, 2, -1, 0.5, -2, 1]], [[1, 0.5, -1, -1, -1, 2]], degenerate=[True])
    bp = select_branch_points(deg, HAND_CANDS, 4)
    assert bp.position.tolist() == [1, 0, 3, 2] and bp.fallback.tolist() == [2, 2, 2, 2]
    assert not bp.strict.any()


def test_select_hand_case_pooled():
    # Two roots of one prompt, K = 1, pooled → top 2 over both rows.
    # row 0 = HAND (best: token 1, strict BS 1), row 1: z_H = [3, 1, 0], z_Ω = [1, 1, 1] → BS [3, 1, 0];
    # strict: tokens 0 (BS 3), 1 (BS 1). Group ranking: (r1,t0) BS 3, then BS 1 ties: (r0,t0), (r0,t1), (r1,t1)
    # broken by entropy: (r0,t1) z_H 2 first.  → points (1, 0), (0, 1)
    sc = make_scores([[1, 2, -1, 0.5, -2, 1], [3, 1, 0, 0, 0, 0]], [[1, 0.5, -1, -1, -1, 2], [1, 1, 1, 0, 0, 0]])
    cands = torch.tensor([[True] * 5 + [False], [True, True, True, False, False, False]])
    bp = select_branch_points(sc, cands, 1, pooled=True, group_size=2)
    assert list(zip(bp.root.tolist(), bp.position.tolist())) == [(1, 0), (0, 1)]
    # per-root: one point each, root-major
    bp = select_branch_points(sc, cands, 1)
    assert list(zip(bp.root.tolist(), bp.position.tolist())) == [(0, 1), (1, 0)]
    # pooled, K = 4: 8 points over 8 candidates, root 0 and 1 get unequal counts (5 and 3)
    bp = select_branch_points(sc, cands, 4, pooled=True, group_size=2)
    assert sorted(bp.root.tolist()) == [0] * 5 + [1] * 3 and (bp.fallback != 4).all()


def test_select_no_candidates_and_empty():
    sc = make_scores([[1.0, 2.0], [1.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]])
    cands = torch.tensor([[True, False], [False, False]])
    bp = select_branch_points(sc, cands, 2)
    assert bp.root.tolist() == [0, 0, 1, 1]
    assert bp.position.tolist() == [0, 0, -1, -1]
    assert bp.fallback.tolist() == [0, 4, 5, 5]
    assert bp.score.tolist() == [1.0, 1.0, 0.0, 0.0]
    # pooled group with no candidate: -1 spread root-major over the group's roots
    bp = select_branch_points(sc, torch.zeros(2, 2, dtype=torch.bool), 2, pooled=True, group_size=2)
    assert bp.root.tolist() == [0, 0, 1, 1] and bp.position.tolist() == [-1] * 4
    # num_branches = 0 ("none" ablation) and B = 0
    assert select_branch_points(sc, cands, 0).position.shape == (0,)
    e = make_scores(torch.zeros(0, 3), torch.zeros(0, 3))
    assert select_branch_points(e, torch.zeros(0, 3, dtype=torch.bool), 3).root.shape == (0,)
    # T = 1: never a candidate (final token) → -1
    one = make_scores([[0.0]], [[0.0]])
    assert select_branch_points(one, torch.zeros(1, 1, dtype=torch.bool), 2).position.tolist() == [-1, -1]


def _random_inputs(seed, B=6, T=24):
    gen = torch.Generator().manual_seed(seed)
    mask, lengths = random_mask(B, T, gen)
    H = torch.rand(B, T, generator=gen)
    lr = -torch.rand(B, T, generator=gen)
    lc = lr + 0.1 * torch.randn(B, T, generator=gen)
    lc[2] = lr[2]  # a degenerate row
    sc = branching_score(H, lc, lr, mask)
    cands = branch_candidates(mask, lengths, T + 2, 2)
    cands[3] = False  # a root without candidates
    return sc, cands, H


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("criterion", ["bs", "entropy"])
@pytest.mark.parametrize("pooled,group_size", [(False, 1), (True, 2), (True, 3)])
@pytest.mark.parametrize("min_distance", [0, 3])
@pytest.mark.parametrize("K", [1, 3, 30])
def test_select_matches_loop(seed, criterion, pooled, group_size, min_distance, K):
    sc, cands, H = _random_inputs(seed)
    bp = select_branch_points(sc, cands, K, criterion=criterion, pooled=pooled, group_size=group_size,
                              min_distance=min_distance)
    roots, positions, codes = loop_select(sc, cands, K, criterion, group_size if pooled else 1, min_distance)
    assert bp.root.tolist() == roots
    assert bp.position.tolist() == positions
    assert bp.fallback.tolist() == codes
    assert torch.equal(bp.strict, bp.fallback == 0)
    real = bp.position >= 0
    assert cands[bp.root[real], bp.position[real]].all()  # never a tool token, padding or final token
    if not pooled:
        assert bp.root.tolist() == [b for b in range(cands.shape[0]) for _ in range(K)]
    # duplicates only when the root/group has fewer candidates than asked for
    gs = group_size if pooled else 1
    for g in range(cands.shape[0] // gs):
        n = int(cands[g * gs : (g + 1) * gs].sum())
        codes_g = bp.fallback[g * gs * K : (g + 1) * gs * K]
        assert bool((codes_g == 4).any()) == (0 < n < gs * K)


def test_select_raw_entropy_key():
    sc, cands, H = _random_inputs(0)
    bp = select_branch_points(None, cands, 2, criterion="entropy", entropy=H)
    roots, positions, _ = loop_select(None, cands, 2, "entropy", entropy=H)
    assert bp.position.tolist() == positions and bp.score.abs().sum() == 0


def test_select_random_reproducible_uniform():
    sc, cands, _ = _random_inputs(1)
    a = select_branch_points(sc, cands, 3, criterion="random", generator=torch.Generator().manual_seed(7))
    b = select_branch_points(None, cands, 3, criterion="random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.position, b.position) and torch.equal(a.root, b.root)
    rand = torch.rand(cands.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, positions, codes = loop_select(None, cands, 3, "random", rand=rand)
    assert a.position.tolist() == positions and a.fallback.tolist() == codes
    assert set(a.fallback.tolist()) <= {3, 4, 5}
    # uniform over candidates: with K=1 over many seeds every candidate of row 0 is hit at a similar rate
    row = cands[0:1]
    n = int(row.sum())
    hits = torch.zeros(row.shape[1])
    for s in range(60 * n):
        p = select_branch_points(None, row, 1, criterion="random", generator=torch.Generator().manual_seed(s))
        hits[p.position[0]] += 1
    assert hits[~row[0]].sum() == 0
    assert hits[row[0]].min() > 0.4 * 60 and hits[row[0]].max() < 1.8 * 60


def test_select_bad_inputs():
    with pytest.raises(ValueError, match=r"Unknown branch criterion 'foo'.*\['bs', 'entropy', 'random', 'surprisal'\]"):
        select_branch_points(HAND, HAND_CANDS, 2, criterion="foo")
    with pytest.raises(ValueError, match="bool"):
        select_branch_points(HAND, HAND_CANDS.long(), 2)
    with pytest.raises(ValueError, match="scores.scores"):
        select_branch_points(HAND, torch.ones(1, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="needs `scores`"):
        select_branch_points(None, HAND_CANDS, 2, criterion="bs")
    with pytest.raises(ValueError, match="group_size"):
        select_branch_points(HAND, HAND_CANDS, 2, pooled=True, group_size=2)
    with pytest.raises(ValueError, match="device"):
        select_branch_points(HAND, HAND_CANDS.to("meta"), 2)
    with pytest.raises(ValueError, match="num_branches"):
        select_branch_points(HAND, HAND_CANDS, -1)


def _context(logp):
    return core.BranchContext(logp, [], [], [], None, True)


def test_surprisal_ranks_the_least_expected_sampled_tokens_first():
    # −log p = [0.1, 2.0, 0.5, 3.0, 1.0, (not a candidate) 9.0]: the top three are tokens 3, 1, 4, all code 6.
    logp = -torch.tensor([[0.1, 2.0, 0.5, 3.0, 1.0, 9.0]])
    bp = select_branch_points(None, HAND_CANDS, 3, criterion="surprisal", context=_context(logp))
    assert bp.position.tolist() == [3, 1, 4] and bp.fallback.tolist() == [6, 6, 6]
    assert FALLBACK_CODES[6] == "surprisal"
    with pytest.raises(ValueError, match="needs `context`"):
        select_branch_points(None, HAND_CANDS, 3, criterion="surprisal")
    with pytest.raises(ValueError, match="context.logp"):
        select_branch_points(None, HAND_CANDS, 3, criterion="surprisal", context=_context(logp[:, :4]))


def test_hint_ranking_takes_the_nearest_candidate_to_each_hint_and_fills_unhinted_rows_at_random():
    @core.register_branch_criterion("test_hint", needs_context=True)
    def by_hint(scores, entropy_key, candidates, generator, *, context):
        return core.hint_ranking(context.inputs, candidates, generator)

    try:
        # Row 0 is hinted at token 3, which is not a candidate: its nearest candidates are 2 and 4 (tie: the
        # earlier first), then 1. Row 1 has no hint: two random candidates, after every hinted one.
        cands = torch.tensor([[False, True, True, False, True, False], [True] * 6])
        ctx = core.BranchContext(torch.zeros(2, 6), [], [], [3, None], None, True)
        bp = select_branch_points(None, cands, 3, criterion="test_hint", context=ctx,
                                  generator=torch.Generator().manual_seed(0))
        assert bp.position.tolist()[:3] == [2, 4, 1] and bp.fallback.tolist() == [7, 7, 7, 8, 8, 8]
        assert len(set(bp.position.tolist()[3:])) == 3 and bp.root.tolist() == [0, 0, 0, 1, 1, 1]
        # Pooled over the two roots of one prompt, the hinted root's candidates come first.
        pooled = select_branch_points(None, cands, 2, criterion="test_hint", context=ctx, pooled=True,
                                      group_size=2, generator=torch.Generator().manual_seed(0))
        assert pooled.root.tolist()[:3] == [0, 0, 0] and pooled.fallback.tolist() == [7, 7, 7, 8]
        with pytest.raises(ValueError, match="one per row"):
            core.hint_ranking([1], cands)
    finally:
        del core.BRANCH_CRITERIA["test_hint"]


def test_registries():
    assert set(BRANCH_CRITERIA) == {"bs", "entropy", "surprisal", "random"}
    assert [n for n, r in BRANCH_CRITERIA.items() if r.needs_context] == ["surprisal"]
    assert set(FUTURE_KL_FORMS) == {"appo", "fipo"}
    assert get_branch_criterion("bs") is BRANCH_CRITERIA["bs"]
    with pytest.raises(ValueError, match=r"\['appo', 'fipo'\]"):
        get_future_kl_form("ppo")


# ----------------------------------------------------------------------------------------------------------------
# dual_group_advantages
# ----------------------------------------------------------------------------------------------------------------


def test_dual_group_hand_case():
    # roots [1, 0] (one prompt, N=2): mean .5, Bessel var = (.25+.25)/2 · 2/1 = .5, std .70711
    #   → ±.5/(.70711 + 1e-4) = ±.70701
    # branches [1, 1, 0, 1]: mean .75, dev [.25,.25,-.75,.25], Σdev² = .75, /4 · 4/3 = .25, std .5
    #   → [.25, .25, -.75, .25]/.5001 = [.49990, .49990, -1.49970, .49990]
    ra, ba = dual_group_advantages(
        torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [1.0], [0.0], [1.0]]), torch.tensor([1.0]), 2, 4
    )
    s = 0.5**0.5 + 1e-4
    torch.testing.assert_close(ra, torch.tensor([0.5 / s, -0.5 / s]))
    torch.testing.assert_close(ba, torch.tensor([0.25, 0.25, -0.75, 0.25]) / 0.5001)
    # dual_groups=False: one group [1, 0, 1, 1, 0, 1]: mean 2/3, dev ±, Σdev² = 4·(1/9) + 2·(4/9) = 4/3,
    # /6 · 6/5 = 4/15, std .516398 → 1 → (1/3)/(.516398+1e-4) = .64537, 0 → -(2/3)/.516498 = -1.29074
    ra, ba = dual_group_advantages(
        torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [1.0], [0.0], [1.0]]), torch.tensor([1.0]), 2, 4,
        dual_groups=False,
    )
    s = math.sqrt(4 / 15) + 1e-4
    torch.testing.assert_close(ra, torch.tensor([1 / 3 / s, -2 / 3 / s]))
    torch.testing.assert_close(ba, torch.tensor([1 / 3, 1 / 3, -2 / 3, 1 / 3]) / s)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("agg", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("N,NB", [(4, 12), (1, 3), (2, 1)])
def test_dual_group_bit_for_bit_trl(seed, scale_rewards, agg, N, NB):
    gen = torch.Generator().manual_seed(seed)
    G, F = 3, 2
    roots = torch.randn(G * N, F, generator=gen)
    branches = torch.randn(G * NB, F, generator=gen)
    roots[roots > 1.2] = float("nan")  # partly unscored rows
    roots[0] = float("nan")  # an unscorable row
    roots[N : 2 * N] = 0.5  # a zero-std group
    branches[branches > 1.2] = float("nan")
    w = torch.tensor([1.0, 0.5])
    ra, ba = dual_group_advantages(roots, branches, w, N, NB, scale_rewards=scale_rewards,
                                   multi_objective_aggregation=agg)
    assert torch.equal(ra, trl_advantages(roots, w, N, scale_rewards, agg))  # exact, bit for bit
    assert torch.equal(ba, trl_advantages(branches, w, NB, scale_rewards, agg))
    assert ra[0] == 0 and torch.isfinite(ra).all() and torch.isfinite(ba).all()
    if scale_rewards == "group" and agg == "sum_then_normalize":
        assert torch.equal(ra[N : 2 * N], torch.zeros(N))
    ra2, ba2 = dual_group_advantages(roots, branches, w, N, NB, scale_rewards=scale_rewards,
                                     multi_objective_aggregation=agg, dual_groups=False)
    joint = torch.cat([roots.view(G, N, F), branches.view(G, NB, F)], 1).view(-1, F)
    ref = trl_advantages(joint, w, N + NB, scale_rewards, agg).view(G, -1)
    assert torch.equal(ra2, ref[:, :N].reshape(-1)) and torch.equal(ba2, ref[:, N:].reshape(-1))


def test_dual_group_degenerate():
    w = torch.tensor([1.0])
    # all rewards equal → 0
    ra, ba = dual_group_advantages(torch.ones(4, 1), torch.ones(8, 1), w, 2, 4)
    assert torch.equal(ra, torch.zeros(4)) and torch.equal(ba, torch.zeros(8))
    # singleton groups (N=1, one branch per prompt) → 0, as TRL
    ra, ba = dual_group_advantages(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]]), w, 1, 1)
    assert torch.equal(ra, torch.zeros(2)) and torch.equal(ba, torch.zeros(2))
    # no branches ("none" ablation) → roots are exactly GRPO; empty batch
    r = torch.tensor([[1.0], [0.0], [2.0], [2.0]])
    ra, ba = dual_group_advantages(r, torch.zeros(0, 1), w, 2, 0)
    assert torch.equal(ra, trl_advantages(r, w, 2, "group", "sum_then_normalize")) and ba.shape == (0,)
    ra, ba = dual_group_advantages(torch.zeros(0, 1), torch.zeros(0, 1), w, 2, 4)
    assert ra.shape == (0,) and ba.shape == (0,)
    # a group whose every row is unscorable → all 0, never NaN
    ra, _ = dual_group_advantages(torch.full((2, 1), float("nan")), torch.ones(2, 1), w, 2, 2)
    assert torch.equal(ra, torch.zeros(2))


def test_dual_group_bad_inputs():
    w = torch.tensor([1.0])
    with pytest.raises(ValueError, match="num_roots"):
        dual_group_advantages(torch.ones(3, 1), torch.ones(4, 1), w, 2, 2)
    with pytest.raises(ValueError, match="branch_rewards_per_func"):
        dual_group_advantages(torch.ones(4, 1), torch.ones(3, 1), w, 2, 2)
    with pytest.raises(ValueError, match="reward_weights"):
        dual_group_advantages(torch.ones(4, 2), torch.ones(4, 2), w, 2, 2)
    with pytest.raises(ValueError, match=r"scale_rewards.*\['batch', 'group', 'none'\]"):
        dual_group_advantages(torch.ones(4, 1), torch.ones(4, 1), w, 2, 2, scale_rewards="std")
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        dual_group_advantages(torch.ones(4, 1), torch.ones(4, 1), w, 2, 2, multi_objective_aggregation="max")
    with pytest.raises(ValueError, match="dtype"):
        dual_group_advantages(torch.ones(4, 1), torch.ones(4, 1).double(), w, 2, 2)
    with pytest.raises(ValueError, match="device"):
        dual_group_advantages(torch.ones(4, 1), torch.ones(4, 1, device="meta"), w, 2, 2)
    with pytest.raises(ValueError, match="floating"):
        dual_group_advantages(torch.ones(4, 1, dtype=torch.long), torch.ones(4, 1), w, 2, 2)


@pytest.mark.slow
def test_reference_nanstd_is_trls():
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    x = torch.tensor([[1.0, float("nan"), 3.0, 2.5], [1.0, float("nan"), float("nan"), float("nan")]])
    torch.testing.assert_close(nanstd(x, dim=1), trl_nanstd(x, dim=1), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(nanstd(x[0]), trl_nanstd(x[0]))


# ----------------------------------------------------------------------------------------------------------------
# branch_credit
# ----------------------------------------------------------------------------------------------------------------


def test_branch_credit_hand_case():
    # R=1, T=5, mask [1,1,0,1,1], Â_root = 1, ρ = .5, λ = 1.
    # b0: s=3, Â .5, BS 2;  b1: s=1, Â -1, BS 1;  b2: s=-1 (no prefix), Â 3, BS 5 → ignored, also for max.
    # max BS⁺ = 2 → w0 = 1, w1 = .5
    # t=0: C={b0,b1}: mean Â = -.25; S = mean(1 + 1·.5³, 1 + .5·.5¹) = mean(1.125, 1.25) = 1.1875 → .75·1.1875 = .890625
    # t=1: C={b0,b1}: S = mean(1 + .5², 1 + .5·1) = mean(1.25, 1.5) = 1.375 → .75·1.375 = 1.03125
    # t=2: tool token → 0
    # t=3: C={b0}: mean Â .5; S = 1 + 1 = 2 → 1.5·2 = 3
    # t=4: C empty → Â_root = 1, S = 1
    args = (
        torch.tensor([1.0]),
        torch.tensor([0.5, -1.0, 3.0]),
        torch.tensor([0, 0, 0]),
        torch.tensor([3, 1, -1]),
        torch.tensor([2.0, 1.0, 5.0]),
        torch.tensor([[1, 1, 0, 1, 1]]),
    )
    out = branch_credit(*args, rho=0.5, lam=1.0)
    torch.testing.assert_close(out, torch.tensor([[0.890625, 1.03125, 0.0, 3.0, 1.0]]))
    # prefix_credit off: Â_root · S = [1.1875, 1.375, 0, 2, 1]
    out = branch_credit(*args, rho=0.5, lam=1.0, prefix_credit=False)
    torch.testing.assert_close(out, torch.tensor([[1.1875, 1.375, 0.0, 2.0, 1.0]]))
    # procedure_scale off: Â_root + mean Â_b = [.75, .75, 0, 1.5, 1]
    out = branch_credit(*args, rho=0.5, procedure_scale=False)
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.75, 0.0, 1.5, 1.0]]))
    # both off: GRPO's Â_root on model tokens
    out = branch_credit(*args, prefix_credit=False, procedure_scale=False)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("prefix,proc", [(True, True), (False, True), (True, False)])
def test_branch_credit_matches_loop(seed, prefix, proc):
    gen = torch.Generator().manual_seed(seed)
    R, T, P = 5, 30, 14
    mask, _ = random_mask(R, T, gen)
    ra = torch.randn(R, generator=gen, dtype=torch.float64)
    ba = torch.randn(P, generator=gen, dtype=torch.float64)
    broot = torch.randint(0, R, (P,), generator=gen)
    bpos = torch.randint(-1, T, (P,), generator=gen)
    bscore = torch.randn(P, generator=gen, dtype=torch.float64)
    out = branch_credit(ra, ba, broot, bpos, bscore, mask, rho=0.9, lam=0.7, prefix_credit=prefix,
                        procedure_scale=proc)
    ref = loop_branch_credit(ra, ba, broot, bpos, bscore, mask, 0.9, 0.7, prefix, proc)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


def test_branch_credit_degenerate():
    m = torch.ones(2, 3)
    # no branches → Â_root broadcast;  all scores ≤ 0 → S = 1
    out = branch_credit(torch.tensor([1.0, -2.0]), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long), torch.zeros(0), m)
    assert torch.equal(out, torch.tensor([[1.0] * 3, [-2.0] * 3]))
    out = branch_credit(torch.tensor([1.0, 0.0]), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([2]),
                        torch.tensor([-3.0]), m)
    assert torch.equal(out, torch.tensor([[2.0] * 3, [0.0] * 3]))
    # B = 0, T = 1
    assert branch_credit(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0, 4)).shape == (0, 4)
    out = branch_credit(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]),
                        torch.tensor([1.0]), torch.ones(1, 1), rho=0.9)
    assert torch.equal(out, torch.tensor([[4.0]]))  # (1 + 1)·(1 + 1·1·.9⁰)


def test_branch_credit_bad_inputs():
    ok = dict(root_advantages=torch.zeros(2), branch_advantages=torch.zeros(1), branch_root=torch.tensor([0]),
              branch_position=torch.tensor([1]), branch_score=torch.zeros(1), model_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="branch_score"):
        branch_credit(**{**ok, "branch_score": torch.zeros(2)})
    with pytest.raises(ValueError, match="root_advantages"):
        branch_credit(**{**ok, "root_advantages": torch.zeros(3)})
    with pytest.raises(ValueError, match="branch_position"):
        branch_credit(**{**ok, "branch_position": torch.tensor([3])})
    with pytest.raises(ValueError, match="branch_root"):
        branch_credit(**{**ok, "branch_root": torch.tensor([2])})
    with pytest.raises(ValueError, match="integer"):
        branch_credit(**{**ok, "branch_root": torch.tensor([0.0])})
    with pytest.raises(ValueError, match="device"):
        branch_credit(**{**ok, "model_mask": torch.ones(2, 3, device="meta")})
    with pytest.raises(ValueError, match="branch_advantages"):
        branch_credit(**{**ok, "branch_advantages": torch.tensor([float("nan")])})
    with pytest.raises(ValueError, match="rho"):
        branch_credit(**ok, rho=1.5)


# ----------------------------------------------------------------------------------------------------------------
# future_kl_weights
# ----------------------------------------------------------------------------------------------------------------


def test_future_kl_hand_case():
    # decay = 1 → γ_F = 0.5.  δ = [.1, .2, -.4]
    # FutureKL: t2 = -.4;  t1 = .2 + .5·(-.4) = 0;  t0 = .1 + .5·0 = .1
    # f = clip(exp(.), 1, 1.2) = [e^.1 = 1.10517, 1, 1] → multiplier (appo, b=1) = [2.10517, 2, 2]
    lo = torch.zeros(1, 3)
    lc = torch.tensor([[0.1, 0.2, -0.4]])
    out = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0)
    torch.testing.assert_close(out.future_kl, torch.tensor([[0.1, 0.0, -0.4]]))
    torch.testing.assert_close(out.f, torch.tensor([[math.exp(0.1), 1.0, 1.0]]))
    torch.testing.assert_close(out.multiplier, torch.tensor([[1 + math.exp(0.1), 2.0, 2.0]]))
    # two-sided clip: f_2 = clip(e^-.4 = .67032, .8, 1.2) = .8 ;  form fipo: multiplier = f
    out = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0, clip_high_only=False, form="fipo")
    torch.testing.assert_close(out.multiplier, torch.tensor([[math.exp(0.1), 1.0, 0.8]]))


def test_future_kl_normalised_is_one_on_policy_and_keeps_relative_weights():
    # Same δ as the hand case: unnormalised multiplier [1 + e^.1, 2, 2] (b = 1); normalised divides by 1 + b = 2.
    lo = torch.zeros(1, 3)
    lc = torch.tensor([[0.1, 0.2, -0.4]])
    out = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0, normalize=True)
    torch.testing.assert_close(out.multiplier, torch.tensor([[(1 + math.exp(0.1)) / 2, 1.0, 1.0]]))
    # b = 0.5: (1 + 0.5·e^.1) / 1.5
    out = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0, weight=0.5, normalize=True)
    torch.testing.assert_close(out.multiplier, torch.tensor([[(1 + 0.5 * math.exp(0.1)) / 1.5, 1.0, 1.0]]))
    # on-policy (π_θ = π_old): exactly 1 everywhere, i.e. GRPO's scale
    on_policy = future_kl_weights(lo, lo, torch.ones(1, 3), torch.tensor([-1.0]), normalize=True)
    assert torch.equal(on_policy.multiplier, torch.ones(1, 3))
    # fipo's on-policy value is already 1: normalising changes nothing
    a = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0, form="fipo")
    b = future_kl_weights(lc, lo, torch.ones(1, 3), torch.tensor([1.0]), decay=1.0, form="fipo", normalize=True)
    torch.testing.assert_close(a.multiplier, b.multiplier)


def test_future_kl_hand_case_dual_clip_exclusion_and_safety():
    # δ = [.1, 1.9, .5], ln 3 = 1.0986 → token 1 excluded from the sums (but the discount still counts it)
    # FutureKL: t2 = .5; t1 = 0 + .5·.5 = .25; t0 = .1 + .5·.25 = .225 → f = [1.2, 1.2, 1.2] (all exp > 1.2)
    # A < 0 and ratio e^1.9 = 6.69 > 6 at token 1 → f_1 capped at 1 → f = [1.2, 1, 1.2]
    lc = torch.tensor([[0.1, 1.9, 0.5]])
    m = torch.ones(1, 3)
    pos = future_kl_weights(lc, torch.zeros(1, 3), m, torch.tensor([1.0]), decay=1.0)
    torch.testing.assert_close(pos.future_kl, torch.tensor([[0.225, 0.25, 0.5]]))
    torch.testing.assert_close(pos.f, torch.tensor([[1.2, 1.2, 1.2]]))
    neg = future_kl_weights(lc, torch.zeros(1, 3), m, torch.tensor([[-1.0, -1.0, -1.0]]), decay=1.0)
    torch.testing.assert_close(neg.f, torch.tensor([[1.2, 1.0, 1.2]]))
    torch.testing.assert_close(neg.multiplier, torch.tensor([[2.2, 2.0, 2.2]]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("high_only,form,adv_2d", [(True, "appo", False), (False, "fipo", True), (False, "appo", True)])
def test_future_kl_matches_loop(seed, high_only, form, adv_2d):
    gen = torch.Generator().manual_seed(seed)
    B, T = 4, 200
    mask, _ = random_mask(B, T, gen)
    lo = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    lc = lo + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lc[0, 5] = lo[0, 5] + 2.5  # excluded by the dual clip and unsafe
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64) if adv_2d else torch.randn(B, generator=gen, dtype=torch.float64)
    out = future_kl_weights(garbage_off_mask(lc, mask), garbage_off_mask(lo, mask), mask, adv, decay=16.0,
                            clip_high_only=high_only, weight=0.5, form=form)
    ref = loop_future_kl(lc, lo, mask, adv, 16.0, 0.2, high_only, 0.5, 6.0, 3.0, form)
    for got, exp in zip(out, ref):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9)
    assert torch.equal(out.multiplier[~mask], torch.ones_like(out.multiplier[~mask]))
    assert torch.equal(out.f[~mask], torch.zeros_like(out.f[~mask]))


def test_future_kl_detached_and_degenerate():
    lc = torch.zeros(2, 3, requires_grad=True)
    out = future_kl_weights(lc, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2))
    assert not out.multiplier.requires_grad
    assert torch.equal(out.multiplier, torch.full((2, 3), 2.0))  # π_θ = π_old → f = 1 → 1 + 1·1
    assert future_kl_weights(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0)).f.shape == (0, 3)
    out = future_kl_weights(torch.full((1, 1), 30.0), torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([1.0]))
    assert torch.isfinite(out.multiplier).all()  # δ clamped to 20, excluded (> ln 3) → f = 1


def test_future_kl_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        future_kl_weights(z, z, z, torch.zeros(3))
    with pytest.raises(ValueError, match="logp_old"):
        future_kl_weights(z, torch.zeros(2, 2), z, torch.zeros(2))
    with pytest.raises(ValueError, match="device"):
        future_kl_weights(z, z.to("meta"), z, torch.zeros(2))
    bad = z.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="`logp_old`.*non-finite"):
        future_kl_weights(z, bad, torch.ones(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"Unknown future-KL form"):
        future_kl_weights(z, z, z, torch.zeros(2), form="ppo")
    with pytest.raises(ValueError, match="decay"):
        future_kl_weights(z, z, z, torch.zeros(2), decay=0.0)
    with pytest.raises(ValueError, match="floating"):
        future_kl_weights(z, z, z, torch.zeros(2, dtype=torch.long))


def test_outputs_are_named_tuples():
    assert BranchPoints._fields == ("root", "position", "strict", "fallback", "score")
    assert BranchingScore._fields == ("scores", "z_entropy", "z_omega", "omega", "degenerate")


# ------------------------------------------------------------------ fork (local) advantages of branch rows


def test_fork_advantages_hand_case():
    from trl_appo.core import fork_advantages

    # One prompt, N=2 roots rewarded 1 and 0. Root 0 has branches forking after token 3 (R=0) and token 5 (R=1);
    # root 1 has one branch that shares nothing (R=1).
    root = torch.tensor([1.0, 0.0])
    rb = torch.tensor([0.0, 1.0, 1.0])
    which, end = torch.tensor([0, 0, 1]), torch.tensor([3, 5, -1])
    raw = fork_advantages(root, rb, which, end, 2, scale_rewards="none")
    # b0: V = mean(root0, b0, b1) = 2/3; b1: V = mean(root0, b1) = 1; b2 forks at the prompt: V = mean of all 5 = 0.6
    torch.testing.assert_close(raw, torch.tensor([-2 / 3, 0.0, 0.4]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]).std()  # Bessel, the prompt's M = 5 rewards
    torch.testing.assert_close(fork_advantages(root, rb, which, end, 2), raw / (std + 1e-4))
    # an unscored branch gets 0 and is left out of its siblings' V
    rb_nan = torch.tensor([float("nan"), 1.0, 1.0])
    out = fork_advantages(root, rb_nan, which, end, 2, scale_rewards="none")
    assert out[0] == 0.0 and out[1] == 0.0
    torch.testing.assert_close(out[2], torch.tensor(1.0 - 3.0 / 4.0))


def test_fork_advantages_keep_prompts_apart_and_check_inputs():
    from trl_appo.core import fork_advantages, scalar_rewards

    root = torch.tensor([1.0, 0.0, 5.0, 5.0])  # two prompts of N=2
    rb = torch.tensor([1.0, 0.0])
    out = fork_advantages(root, rb, torch.tensor([0, 2]), torch.tensor([-1, -1]), 2, scale_rewards="none")
    torch.testing.assert_close(out, torch.tensor([1.0 - 2.0 / 3.0, 0.0 - 10.0 / 3.0]))
    with pytest.raises(ValueError, match="branch_root"):
        fork_advantages(root, rb, torch.tensor([0, 4]), torch.tensor([1, 1]), 2)
    with pytest.raises(ValueError, match="num_roots"):
        fork_advantages(root, rb, torch.tensor([0, 1]), torch.tensor([1, 1]), 3)
    rpf = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")]])
    s = scalar_rewards(rpf, torch.tensor([2.0, 1.0]))
    assert s[0] == 2.0 and torch.isnan(s[1])


# ------------------------------------------------------------------ registries declare what a rule needs


def test_a_registered_criterion_that_needs_omega_is_an_omega_criterion_without_another_edit():
    from trl_appo import core

    @core.register_branch_criterion("omega_probe", needs_omega=True)
    def probe(scores, entropy_key, candidates, generator):
        return core.get_branch_criterion("bs")(scores, entropy_key, candidates, generator)

    try:
        assert core.uses_omega("omega_probe") and "omega_probe" in core.OMEGA_CRITERIA
        assert not core.uses_omega("entropy") and core.OMEGA_CRITERIA >= {"bs"}
        assert core.get_branch_criterion("omega_probe").needs_omega
    finally:
        del core.BRANCH_CRITERIA["omega_probe"]
    assert "omega_probe" not in core.OMEGA_CRITERIA


def test_every_swappable_rule_is_a_registry_entry_with_its_needs():
    from trl_appo import core

    assert set(core.ALLOCATIONS) == {"uniform", "need"}
    assert core.get_allocation("need").needs_rewards and not core.get_allocation("uniform").needs_rewards
    assert set(core.BRANCH_ADVANTAGES) == {"dual_group", "local"}
    assert core.get_branch_advantage("local").needs_fork_points
    assert not core.get_branch_advantage("dual_group").needs_fork_points
    assert core.get_allocation("uniform")(3, 2, 4) == [8, 8, 8]
    with pytest.raises(ValueError, match="branch allocation 'budget'"):
        core.get_allocation("budget")


def test_an_allocation_rule_sets_each_groups_number_of_points():
    from trl_appo import core

    @core.register_allocation("first_group_only")
    def first_only(num_groups, group_size, num_branches):
        return [group_size * num_branches] + [0] * (num_groups - 1)

    try:
        cand = torch.ones(4, 6, dtype=torch.bool)
        ent = torch.arange(24, dtype=torch.float32).view(4, 6)
        pts = select_branch_points(None, cand, 1, criterion="entropy", entropy=ent, pooled=True, group_size=2,
                                   allocation="first_group_only")
        assert pts.root.tolist() == [1, 1] and pts.position.tolist() == [5, 4]  # group 1 gets none
    finally:
        del core.ALLOCATIONS["first_group_only"]


# ------------------------------------------------------------------ allocation by need (docs/algorithm.md §9)


def test_need_allocation_moves_branches_to_agreeing_prompts_and_failed_roots_by_hand():
    from trl_appo import core

    # G = 3 prompts of N = 2, K = 2: total 12. Range 1, so the largest variance is 0.25.
    # Spread V = (0, 0, 1) -> weights (1, 1, 0.25) -> shares 12·w/2.25 = (5.33, 5.33, 1.33) -> (6, 5, 1), the last
    # seat to the first of the tied remainders. Within: (3, 3); (3, 2) (tie -> lower index); prompt 2's one branch
    # goes to its failed root (weight 2 vs 1: shares 0.67, 0.33).
    counts = core.need_allocation(torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0]), 2, 2)
    assert counts.tolist() == [3, 3, 3, 2, 1, 0] and counts.sum() == 12
    # N = 4, K = 1: prompt 1 has one failure in four, V = 4·0.75·0.25 = 0.75, w = 1 − 0.75·0.75 = 0.4375;
    # shares 8·(1, 0.4375)/1.4375 = (5.57, 2.43) -> (6, 2). Prompt 0: 1.5 each -> (2, 2, 1, 1). Prompt 1:
    # u = (1, 2, 1, 1) -> (0.4, 0.8, 0.4, 0.4) -> the failed root, then the lowest index.
    counts = core.need_allocation(torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]), 4, 1)
    assert counts.tolist() == [2, 2, 1, 1, 1, 1, 0, 0]
    # A batch whose rewards all agree is the uniform allocation; so is a single prompt group without failures.
    assert core.need_allocation(torch.full((6,), 0.5), 3, 2).tolist() == [2] * 6
    assert core.need_allocation(torch.tensor([0.2, 0.9, 0.9, 0.1]), 2, 0).tolist() == [0] * 4
    with pytest.raises(ValueError, match="divide the number of roots"):
        core.need_allocation(torch.zeros(5), 2, 1)
    with pytest.raises(ValueError, match="finite"):
        core.need_allocation(torch.tensor([0.0, float("nan")]), 2, 1)


def test_need_quotas_always_sum_to_the_uniform_total():
    from trl_appo import core

    gen = torch.Generator().manual_seed(0)
    for N, K, G in ((2, 1, 5), (4, 3, 3), (3, 2, 7), (1, 2, 4)):
        rewards = torch.randint(0, 3, (G * N,), generator=gen).double() / 2
        counts = core.need_allocation(rewards, N, K)
        assert counts.sum().item() == G * N * K and counts.min() >= 0


def test_selection_takes_per_root_counts_from_a_reward_allocation():
    from trl_appo import core

    cand = torch.ones(4, 6, dtype=torch.bool)
    cand[3] = False  # root 3 has no candidate: its points resample from the prompt
    ent = torch.arange(24, dtype=torch.float32).view(4, 6)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # prompt 0 mixed, prompt 1 agrees
    # w = (0.25, 1): shares 8·w/1.25 = (1.6, 6.4) -> (2, 6). Prompt 0: u = (1, 2), shares (0.67, 1.33) -> (1, 1).
    assert core.need_allocation(rewards, 2, 2).tolist() == [1, 1, 3, 3]
    pts = select_branch_points(None, cand, 2, criterion="entropy", entropy=ent, group_size=2, allocation="need",
                               rewards=rewards)
    assert pts.root.tolist() == [0, 1, 2, 2, 2, 3, 3, 3]  # P = 8 = B·K, as uniform
    assert pts.position.tolist() == [5, 5, 5, 4, 3, -1, -1, -1] and pts.fallback.tolist()[-3:] == [5, 5, 5]
    pooled = select_branch_points(None, cand, 2, criterion="entropy", entropy=ent, group_size=2, pooled=True,
                                  allocation="need", rewards=rewards)
    assert pooled.root.tolist() == [1, 1, 2, 2, 2, 2, 2, 2]  # group quotas 2 and 6, ranked over the group
    assert pooled.position.tolist() == [5, 4, 5, 4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="needs `rewards`"):
        select_branch_points(None, cand, 2, criterion="entropy", entropy=ent, group_size=2, allocation="need")


def test_a_reward_allocation_that_breaks_the_total_is_refused():
    from trl_appo import core

    @core.register_allocation("greedy", needs_rewards=True)
    def greedy(rewards, group_size, num_branches):
        return [num_branches + 1] * len(rewards)

    try:
        with pytest.raises(ValueError, match="expected 4 non-negative counts summing to 4"):
            select_branch_points(None, torch.ones(4, 6, dtype=torch.bool), 1, criterion="random", group_size=2,
                                 allocation="greedy", rewards=torch.zeros(4))
    finally:
        del core.ALLOCATIONS["greedy"]


def test_dual_group_advantages_with_unequal_branch_groups_by_hand():
    from trl_appo import core

    roots = torch.tensor([[1.0], [0.0], [1.0], [1.0]])  # G = 2, N = 2
    branches = torch.tensor([[1.0], [0.0], [0.0], [1.0]])  # prompts (0, 1, 0, 0): three branches and one
    prompt = torch.tensor([0, 1, 0, 0])
    root_adv, branch_adv = core.dual_group_advantages(roots, branches, torch.ones(1), 2, 2, branch_prompt=prompt)
    a = 0.5 / (0.5**0.5 + 1e-4)
    s = (1 / 3) ** 0.5 + 1e-4  # prompt 0's branches (1, 0, 1): mean 2/3, Bessel std sqrt(1/3)
    torch.testing.assert_close(root_adv, torch.tensor([a, -a, 0.0, 0.0]))
    torch.testing.assert_close(branch_adv, torch.tensor([(1 / 3) / s, 0.0, (-2 / 3) / s, (1 / 3) / s]))
    # One joint group per prompt: prompt 0 = roots (1, 0) + branches (1, 0, 1); prompt 1 = (1, 1, 0).
    root_adv, branch_adv = core.dual_group_advantages(roots, branches, torch.ones(1), 2, 2, branch_prompt=prompt,
                                                      dual_groups=False)
    s0, s1 = torch.tensor([1.0, 0, 1, 0, 1]).std().item() + 1e-4, torch.tensor([1.0, 1, 0]).std().item() + 1e-4
    expected_roots = torch.tensor([0.4 / s0, -0.6 / s0, (1 / 3) / s1, (1 / 3) / s1])
    torch.testing.assert_close(root_adv, expected_roots)
    torch.testing.assert_close(branch_adv, torch.tensor([0.4 / s0, (-2 / 3) / s1, -0.6 / s0, 0.4 / s0]))
    # Equal groups given by prompt index: exactly the equal-group result.
    even = torch.tensor([0, 0, 1, 1])
    for dual in (True, False):
        for scale in ("group", "batch", "none"):
            kw = dict(dual_groups=dual, scale_rewards=scale)
            plain = core.dual_group_advantages(roots, branches, torch.ones(1), 2, 2, **kw)
            by_prompt = core.dual_group_advantages(roots, branches, torch.ones(1), 2, 2, branch_prompt=even, **kw)
            for x, y in zip(plain, by_prompt, strict=True):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_groups_all_equal_by_hand():
    from trl_appo import core

    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    assert core.groups_all_equal(rewards, group, 4).tolist() == [True, False, True, True]  # group 3 is empty
