"""Property tests of sae_nb.losses against plain reference formulas (numpy / loops), on random shapes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_nb.losses import (CROSS_SAMPLE_PENALTIES, auxk_loss, ce_loss_recovered, check_pair,
                           contrastive_penalty, explained_variance, frequency_penalty, fvu,
                           independence_penalty, kl_div, l0, l1, l2, l2_ratio, mse)

SEEDS = range(4)
SHAPES = [(7, 5), (3, 4, 6), (2, 3, 2, 4), (1, 9)]   # leading dims are flattened


def pairs():
    "Yield (x_hat, x) float64 pairs over seeds and shapes, including 3-D and 4-D inputs."
    for seed in SEEDS:
        for shape in SHAPES:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            yield x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64), x


def sparse_latents(seed, shape, density=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    return a * (torch.rand(shape, generator=g, dtype=torch.float64) < density)


def rows(t):
    a = t.detach().numpy()
    return a.reshape(-1, a.shape[-1])


# ---- plain references: loops over rows in numpy ----

def ref_mse(x_hat, x):
    xs, xh = rows(x), rows(x_hat)
    return np.mean([sum((xs[b, j] - xh[b, j]) ** 2 for j in range(xs.shape[1])) for b in range(len(xs))])


def ref_fvu(x_hat, x, mean=None):
    xs, xh = rows(x), rows(x_hat)
    mu = xs.mean(axis=0) if mean is None else mean.numpy()
    return sum(np.sum((xs[b] - xh[b]) ** 2) for b in range(len(xs))) / sum(np.sum((xs[b] - mu) ** 2) for b in range(len(xs)))


def ref_l2(x_hat, x):
    xs, xh = rows(x), rows(x_hat)
    return np.mean([math.sqrt(np.sum((xs[b] - xh[b]) ** 2)) for b in range(len(xs))])


def ref_l2_ratio(x_hat, x):
    xs, xh = rows(x), rows(x_hat)
    return np.mean([np.linalg.norm(xh[b]) / np.linalg.norm(xs[b]) for b in range(len(xs)) if np.linalg.norm(xs[b]) > 0])


def ref_l0(a):
    return np.mean([sum(1 for v in r if v != 0) for r in rows(a)])


def ref_l1(a, W_dec=None):
    A = rows(a)
    norms = np.ones(A.shape[1]) if W_dec is None else np.array([math.sqrt(sum(w ** 2 for w in r)) for r in W_dec.numpy()])
    return np.mean([sum(abs(r[i]) * norms[i] for i in range(len(r))) for r in A])


# ---- reconstruction losses ----

@pytest.mark.parametrize("fn,ref", [(mse, ref_mse), (fvu, ref_fvu), (l2, ref_l2), (l2_ratio, ref_l2_ratio)])
def test_reconstruction_losses_match_reference(fn, ref):
    for x_hat, x in pairs():
        if fn is fvu and rows(x).shape[0] < 2:
            continue   # one row: zero variance, tested below
        out = fn(x_hat, x)
        assert out.shape == ()
        np.testing.assert_allclose(out.item(), ref(x_hat, x), rtol=1e-10)


def test_fvu_given_mean_and_explained_variance():
    for x_hat, x in pairs():
        mean = torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)
        np.testing.assert_allclose(fvu(x_hat, x, mean=mean).item(), ref_fvu(x_hat, x, mean), rtol=1e-10)
        np.testing.assert_allclose(explained_variance(x_hat, x, mean).item(), 1 - ref_fvu(x_hat, x, mean), rtol=1e-10)
    x = torch.randn(6, 3)
    assert fvu(x.mean(0).expand(6, 3), x).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match=r"mean.shape=\(4,\)"):
        fvu(x, x, mean=torch.zeros(4))
    with pytest.raises(TypeError, match="mean"):
        fvu(x, x, mean=[0.0, 0.0, 0.0])


def test_fvu_zero_variance_is_inf_or_nan():
    x = torch.ones(5, 3)
    assert fvu(x + 1, x).item() == math.inf
    assert math.isnan(fvu(x, x).item())
    assert fvu(torch.zeros(1, 3), torch.ones(1, 3)).item() == math.inf   # a single row always has zero variance


def test_l2_ratio_skips_zero_rows_and_shrinkage():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    x_hat = torch.tensor([[1.5, 2.0], [5.0, 5.0], [2.0, 0.0]])
    assert l2_ratio(x_hat, x).item() == pytest.approx((0.5 + 2.0) / 2)
    assert math.isnan(l2_ratio(torch.ones(2, 2), torch.zeros(2, 2)).item())


# ---- sparsity ----

def test_l0_l1_match_reference():
    for seed in SEEDS:
        for shape in [(6, 10), (2, 3, 8), (1, 5)]:
            a = sparse_latents(seed, shape)
            a[..., 0] *= -1   # signs do not matter
            W_dec = torch.randn(shape[-1], 4, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
            assert l0(a).item() == pytest.approx(ref_l0(a))
            assert l1(a).item() == pytest.approx(ref_l1(a))
            assert l1(a, W_dec).item() == pytest.approx(ref_l1(a, W_dec))
    assert l0(torch.tensor([[1, 0, 2]])).dtype == torch.float32   # integer latents still give a float
    with pytest.raises(ValueError, match=r"W_dec.shape=\(4, 6\)"):
        l1(torch.ones(2, 5), torch.ones(4, 6))


# ---- downstream ----

def test_kl_div_matches_torch_reference():
    for seed in SEEDS:
        for shape in [(5, 11), (2, 4, 7), (1, 3)]:
            g = torch.Generator().manual_seed(seed)
            clean = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
            patched = clean + torch.randn(shape, generator=g, dtype=torch.float64)
            log_p = F.log_softmax(clean, -1).reshape(-1, shape[-1])
            log_q = F.log_softmax(patched, -1).reshape(-1, shape[-1])
            ref = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")   # KL(p || q), mean over positions
            assert kl_div(clean, patched).item() == pytest.approx(ref.item(), rel=1e-10)
            assert kl_div(clean, clean).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_div_masked_logits_are_finite():
    clean = torch.tensor([[0.0, -math.inf, 1.0]])
    patched = torch.tensor([[0.5, 0.0, 1.0]])
    out = kl_div(clean, patched)
    p = torch.softmax(clean, -1)[0]; q = torch.softmax(patched, -1)[0]
    assert out.item() == pytest.approx(sum(p[v] * math.log(p[v] / q[v]) for v in (0, 2)).item())


def test_ce_loss_recovered():
    assert ce_loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert isinstance(ce_loss_recovered(2.0, 2.5, 4.0), float)
    out = ce_loss_recovered(torch.tensor(2.0), torch.tensor(2.5), torch.tensor(4.0))
    assert isinstance(out, torch.Tensor) and out.shape == () and out.item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="ce_zero_ablated"):
        ce_loss_recovered(2.0, 2.5, 2.0)
    with pytest.raises(TypeError, match="ce_spliced"):
        ce_loss_recovered(2.0, "2.5", 4.0)
    with pytest.raises(ValueError, match="ce_clean"):
        ce_loss_recovered(torch.ones(2), 2.5, 4.0)


# ---- AuxK ----

def ref_auxk(x, x_hat, pre_acts, W_dec, dead_mask, k_aux):
    "Loop reference: per row, the k_aux largest dead pre-activations, ReLU'd, decoded without bias."
    X, Xh, Z, W = rows(x), rows(x_hat), rows(pre_acts), W_dec.detach().numpy()
    dead = [i for i in range(Z.shape[1]) if dead_mask[i]]
    e = X - Xh
    e_hat = np.zeros_like(e)
    for b in range(len(Z)):
        chosen = sorted(dead, key=lambda i: -Z[b, i])[:k_aux]
        for i in chosen:
            e_hat[b] += max(Z[b, i], 0.0) * W[i]
    return np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(axis=0)) ** 2)


def auxk_case(seed, lead=(6,), d_in=4, d_sae=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    x_hat = (x + 0.5 * torch.randn(*lead, d_in, generator=g, dtype=torch.float64)).requires_grad_()
    pre_acts = torch.randn(*lead, d_sae, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    dead_mask = torch.rand(d_sae, generator=g) < 0.5
    dead_mask[0] = True
    return x, x_hat, pre_acts, W_dec, dead_mask


def test_auxk_matches_hand_computation():
    for seed in SEEDS:
        for lead in [(6,), (2, 3)]:
            for k_aux in (1, 3, 50):   # 50 > number of dead latents: all of them are used
                x, x_hat, pre_acts, W_dec, dead_mask = auxk_case(seed, lead)
                out = auxk_loss(x, x_hat, pre_acts, W_dec, dead_mask, k_aux)
                assert out.item() == pytest.approx(ref_auxk(x, x_hat, pre_acts, W_dec, dead_mask, k_aux), rel=1e-10)


def test_auxk_gradients():
    x, x_hat, pre_acts, W_dec, dead_mask = auxk_case(0)
    auxk_loss(x, x_hat, pre_acts, W_dec, dead_mask, 2).backward()
    assert x_hat.grad is None                                   # the reconstruction is a constant for AuxK
    assert torch.all(pre_acts.grad[:, ~dead_mask] == 0)         # live latents get nothing
    assert pre_acts.grad[:, dead_mask].abs().sum() > 0
    assert torch.all(W_dec.grad[~dead_mask] == 0) and W_dec.grad[dead_mask].abs().sum() > 0


def test_auxk_zero_without_dead_latents():
    x, x_hat, pre_acts, W_dec, _ = auxk_case(1)
    out = auxk_loss(x, x_hat, pre_acts, W_dec, torch.zeros(10, dtype=torch.bool), 4)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.all(pre_acts.grad == 0)


def test_auxk_bad_arguments():
    x, x_hat, pre_acts, W_dec, dead = auxk_case(2)
    with pytest.raises(ValueError, match="dead_mask"):
        auxk_loss(x, x_hat, pre_acts, W_dec, dead.float(), 2)
    with pytest.raises(ValueError, match=r"W_dec.shape=\(4, 10\)"):
        auxk_loss(x, x_hat, pre_acts, W_dec.T, dead, 2)
    with pytest.raises(ValueError, match="k_aux"):
        auxk_loss(x, x_hat, pre_acts, W_dec, dead, 0)
    with pytest.raises(ValueError, match="pre_acts"):
        auxk_loss(x, x_hat, pre_acts[:3], W_dec, dead, 2)


# ---- cross-sample penalties ----

def codes(n, d, k, dense_latent, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(n, d, dtype=torch.float64)
    for b in range(n):
        idx = torch.randperm(d - 1, generator=g)[:k - 1] + 1 if dense_latent else torch.randperm(d, generator=g)[:k]
        if dense_latent:
            idx = torch.cat([torch.tensor([0]), idx])
        a[b, idx] = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return a


def ref_frequency(a, target=0.1, eps=1e-2):
    A = np.abs(rows(a))
    return sum(max(0.0, np.mean([v / (v + eps) for v in A[:, i]]) - target) for i in range(A.shape[1]))


def ref_independence(a, eps=1e-2):
    S = np.abs(rows(a)); S = S / (S + eps); n, d = S.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                total += (np.dot(S[:, i], S[:, j]) / n) ** 2
    return total


def ref_contrastive(a, T=0.1):
    A = rows(a); n = len(A)
    Z = [r / max(np.linalg.norm(r), 1e-8) for r in A]
    ell = [-math.log(math.exp(1 / T) / (math.exp(1 / T) + sum(math.exp(np.dot(Z[b], Z[c]) / T) for c in range(n) if c != b)))
           for b in range(n)]
    return np.mean(ell) - math.log(1 + (n - 1) * math.exp(-1 / T))


@pytest.mark.parametrize("shape", [(12, 7), (3, 4, 9), (20, 5)])
def test_penalties_match_reference(shape):
    for seed in SEEDS:
        a = sparse_latents(seed, shape, density=0.4)
        assert frequency_penalty(a).item() == pytest.approx(ref_frequency(a), abs=1e-12)
        assert frequency_penalty(a, target=0.3, eps=0.1).item() == pytest.approx(ref_frequency(a, 0.3, 0.1), abs=1e-12)
        assert independence_penalty(a).item() == pytest.approx(ref_independence(a), rel=1e-9)
        assert contrastive_penalty(a).item() == pytest.approx(ref_contrastive(a), rel=1e-7, abs=1e-10)
        assert contrastive_penalty(a, temperature=0.7).item() == pytest.approx(ref_contrastive(a, 0.7), rel=1e-9)


def test_penalties_max_rows_uses_first_rows():
    a = sparse_latents(0, (40, 6))
    assert independence_penalty(a, max_rows=10).item() == pytest.approx(ref_independence(a[:10]), rel=1e-9)
    assert contrastive_penalty(a, max_rows=10).item() == pytest.approx(ref_contrastive(a[:10]), rel=1e-9)
    with pytest.raises(ValueError, match="max_rows"):
        contrastive_penalty(a, max_rows=1)


@pytest.mark.parametrize("name", ["frequency", "independence", "contrastive"])
def test_penalty_larger_with_a_dense_latent(name):
    penalty = CROSS_SAMPLE_PENALTIES[name]
    for seed in SEEDS:
        dense, spread = codes(64, 32, 3, True, seed), codes(64, 32, 3, False, seed)
        assert l0(dense) == l0(spread)
        assert penalty(dense) > penalty(spread)


@pytest.mark.parametrize("name", ["frequency", "independence", "contrastive"])
def test_penalty_gradients_flow(name):
    penalty = CROSS_SAMPLE_PENALTIES[name]
    a = codes(32, 16, 3, True, 0).reshape(4, 8, 16).requires_grad_()   # [batch, pos, d_sae]
    out = penalty(a)
    assert out.shape == ()
    out.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_penalties_zero_on_disjoint_codes():
    eye = torch.eye(20, dtype=torch.float64)
    assert frequency_penalty(eye).item() == 0.0           # each latent fires on 1/20 of rows, under the target
    assert independence_penalty(eye).item() == pytest.approx(0.0, abs=1e-12)
    assert contrastive_penalty(eye).item() == pytest.approx(0.0, abs=1e-12)


def test_penalties_cost_at_training_scale():
    "d_sae=4096 on a 1024-token batch, forward and backward: must run (and stay small in memory)."
    torch.manual_seed(0)
    a = torch.zeros(1024, 4096)
    idx = torch.randint(0, 4096, (1024, 32))
    a.scatter_(1, idx, torch.rand(1024, 32))
    for penalty in CROSS_SAMPLE_PENALTIES.values():
        a_ = a.clone().requires_grad_()
        penalty(a_).backward()
        assert torch.isfinite(a_.grad).all()


# ---- bad inputs ----

@pytest.mark.parametrize("fn", [mse, fvu, explained_variance, l2, l2_ratio])
def test_bad_pairs(fn):
    with pytest.raises(ValueError, match=r"x_hat.shape=\(4, 1, 3\).*x.shape=\(4, 3\)"):
        fn(torch.zeros(4, 1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"torch.float64.*torch.float32"):
        fn(torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3))
    with pytest.raises(TypeError, match="x_hat"):
        fn([[0.0]], torch.zeros(1, 1))
    with pytest.raises(TypeError, match="^x must be a torch.Tensor"):
        fn(torch.zeros(1, 1), np.zeros((1, 1)))


def test_check_pair_and_single_inputs():
    check_pair(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"patched_logits.shape=\(2, 5\).*clean_logits.shape=\(2, 4\)"):
        kl_div(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="0-d"):
        mse(torch.tensor(1.0), torch.tensor(2.0))
    for fn in (l0, l1, *CROSS_SAMPLE_PENALTIES.values()):
        with pytest.raises(TypeError, match="latents"):
            fn([[1.0, 0.0]])
    with pytest.raises(ValueError, match="floating"):
        frequency_penalty(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="target"):
        frequency_penalty(torch.ones(3, 4), target=2.0)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_penalty(torch.ones(3, 4), temperature=0.0)
