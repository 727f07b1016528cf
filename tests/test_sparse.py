"The sparse training step of the TopK family gives the loss, terms and gradients of the plain dense formulas."
import pytest
import torch
import torch.nn.functional as F

import sae_nb.sae as sae_mod
import sae_nb.sparse as sparse_mod
import sae_nb.variants as variants_mod
from sae_nb.losses import auxk_loss, auxk_nmse
from sae_nb.sae import VARIANTS, make_sae
from sae_nb.sparse import (batch_topk_pattern, decode_active, dead_topk_pattern, gather_pre_acts,
                           nest_pattern, scatter_active, topk_pattern)

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
SHAPES = [(16, 64, 4, (64,)), (24, 96, 7, (5, 13)), (8, 40, 1, (3, 4, 6)), (32, 128, 16, (100,))]  # d_in, d_sae, k, x shape


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def pair(name, d_in, d_sae, k, dtype="float32", **kw):
    "Two SAEs with the same (perturbed) parameters: the sparse step and the dense formulas."
    sparse = make_sae(name, d_in=d_in, d_sae=d_sae, k=k, seed=0, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sparse.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    dense = make_sae(name, d_in=d_in, d_sae=d_sae, k=k, seed=0, dtype=dtype, sparse_step=False, **kw)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


def rows(shape, d_in, seed=0, dtype=torch.float32):
    "Random activations with a non-zero mean."
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, d_in, generator=g) + 0.3).to(dtype)


def step(sae, x, dead_mask=None):
    "One training_loss + backward; returns the output and the gradients by parameter name."
    sae.zero_grad(set_to_none=True)
    out = sae.training_loss(x, dead_mask=dead_mask)
    out.loss.backward()
    return out, {n: p.grad for n, p in sae.named_parameters()}


def assert_same_step(sparse, dense, x, dead_mask=None, tol=None):
    "Loss, terms, x_hat, latents, buffers and every gradient agree between the two SAEs."
    tol = tol or dict(rtol=1e-4, atol=1e-5)
    assert sparse._takes_sparse_step(x.reshape(-1, x.shape[-1])) and not dense._takes_sparse_step(x)
    out_s, g_s = step(sparse, x, dead_mask)
    out_d, g_d = step(dense, x, dead_mask)
    torch.testing.assert_close(out_s.loss, out_d.loss, **tol)
    assert out_s.terms.keys() == out_d.terms.keys()
    for name in out_d.terms:
        torch.testing.assert_close(out_s.terms[name], out_d.terms[name], **tol, msg=name)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **tol)
    torch.testing.assert_close(out_s.latents, out_d.latents, **tol)
    for name in g_d:
        assert g_s[name] is not None, name
        torch.testing.assert_close(g_s[name], g_d[name], **tol, msg=name)
    for name, buf in dense.named_buffers():
        torch.testing.assert_close(dict(sparse.named_buffers())[name], buf, **tol)
    return out_s


@pytest.mark.parametrize("name", TOPK_FAMILY)
@pytest.mark.parametrize("d_in,d_sae,k,shape", SHAPES)
def test_sparse_step_matches_dense(name, d_in, d_sae, k, shape):
    sparse, dense = pair(name, d_in, d_sae, k)
    x = rows(shape, d_in)
    assert_same_step(sparse, dense, x)


@pytest.mark.parametrize("name", TOPK_FAMILY)
@pytest.mark.parametrize("n_dead", [1, 10, 64])
@pytest.mark.parametrize("aux_path", ["block", "pattern"])
def test_sparse_step_matches_dense_with_dead_latents(name, n_dead, aux_path, monkeypatch):
    # AuxK takes the dense block of the dead columns or their sparse pattern, by AUXK_BLOCK_DENSITY: force each
    monkeypatch.setattr(sparse_mod, "AUXK_BLOCK_DENSITY", 0.0 if aux_path == "block" else 2.0)
    calls = {"block": 0, "pattern": 0}
    for path, fn in (("block", "dead_block_decode"), ("pattern", "dead_topk_pattern")):
        real = getattr(sae_mod, fn)
        monkeypatch.setattr(sae_mod, fn, lambda *a, _real=real, _path=path, **kw: calls.__setitem__(_path, calls[_path] + 1) or _real(*a, **kw))
    sparse, dense = pair(name, 16, 64, 4, aux_k=8)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    out = assert_same_step(sparse, dense, rows((50,), 16), dead)
    assert out.terms["aux"] > 0
    assert calls[aux_path] == 1 and sum(calls.values()) == 1, calls


@pytest.mark.parametrize("name", TOPK_FAMILY)
def test_no_dead_latent_gives_zero_aux(name):
    sparse, dense = pair(name, 16, 64, 4)
    out = assert_same_step(sparse, dense, rows((40,), 16), torch.zeros(64, dtype=torch.bool))
    assert out.terms["aux"] == 0


@pytest.mark.parametrize("name", ("batchtopk", "matryoshka"))
def test_threshold_updates_match_over_steps(name):
    "Several optimiser steps: the parameters and the BatchTopK threshold stay together."
    sparse, dense = pair(name, 16, 64, 4)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-3) for s in (sparse, dense)]
    for i in range(4):
        x = rows((64,), 16, seed=i)
        assert_same_step(sparse, dense, x, torch.arange(64) >= 60)
        for s, opt in zip((sparse, dense), opts):
            s.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            s.set_decoder_norm_to_unit_norm()
    assert sparse.threshold > 0
    torch.testing.assert_close(sparse.threshold, dense.threshold)
    torch.testing.assert_close(sparse.W_enc, dense.W_enc, rtol=1e-4, atol=1e-5)


def test_matryoshka_custom_prefixes():
    sparse, dense = pair("matryoshka", 16, 96, 6, matryoshka_prefixes=(5, 40, 41, 96))
    out = assert_same_step(sparse, dense, rows((3, 20), 16), torch.arange(96) < 30)
    assert {"mse_prefix_5", "mse_prefix_40", "mse_prefix_41", "mse_prefix_96"} <= set(out.terms)


@pytest.mark.parametrize("name", TOPK_FAMILY)
def test_float64_matches_tightly(name):
    sparse, dense = pair(name, 16, 64, 4, dtype="float64")
    assert_same_step(sparse, dense, rows((50,), 16, dtype=torch.float64), torch.arange(64) < 20,
                     tol=dict(rtol=1e-10, atol=1e-12))


def test_batchtopk_with_few_positive_pre_acts():
    "Fewer positive pre-activations than k * batch: the extra picks are zeros, as in the dense formula."
    sparse, dense = pair("batchtopk", 16, 64, 40)
    with torch.no_grad():
        for s in (sparse, dense):
            s.b_enc.fill_(-3.0)
    out = assert_same_step(sparse, dense, rows((30,), 16))
    assert out.terms["l0"] < 40


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in TOPK_FAMILY])
def test_other_variants_ignore_the_flag(name):
    a = make_sae(name, d_in=16, d_sae=64, seed=0)
    b = make_sae(name, d_in=16, d_sae=64, seed=0, sparse_step=False)
    x = rows((40,), 16)
    (oa, ga), (ob, gb) = step(a, x), step(b, x)
    torch.testing.assert_close(oa.loss, ob.loss)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], msg=n)


def test_dense_fallbacks():
    "Eval mode, x that needs a gradient, and sparse_step=False take the dense formulas."
    sae = make_sae("topk", d_in=16, d_sae=64, k=4, seed=0)
    x = rows((8,), 16)
    assert sae._takes_sparse_step(x)
    assert not sae._takes_sparse_step(x.clone().requires_grad_())
    assert not sae.eval()._takes_sparse_step(x)
    sae.train()
    xg = x.clone().requires_grad_()
    sae.training_loss(xg).loss.backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="sparse_step"):
        make_sae("topk", d_in=16, d_sae=64, k=4, sparse_step="yes")


def test_latents_carry_gradient():
    "A penalty on the returned dense latents (the cross-sample penalties) reaches the encoder as in the dense path."
    sparse, dense = pair("topk", 16, 64, 4)
    x = rows((40,), 16)
    grads = []
    for s in (sparse, dense):
        out = s.training_loss(x)
        (out.latents.pow(2).sum(0).sqrt().sum() + out.loss).backward()
        grads.append(s.W_enc.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the kernels on their own

def dense_of(vals, pat):
    "The dense [n_rows, n_cols] matrix of a pattern's values."
    return torch.zeros(pat.n_rows, pat.n_cols, dtype=vals.dtype).index_put_((pat.row, pat.col), vals)


def test_topk_pattern_is_rowwise_topk():
    pre = torch.randn(30, 50)
    vals, pat = topk_pattern(pre, 5)
    ref_v, ref_i = pre.topk(5, dim=-1)
    torch.testing.assert_close(dense_of(vals, pat), torch.zeros(30, 50).scatter(1, ref_i, ref_v))
    assert torch.equal(pat.offsets, torch.arange(0, 151, 5))
    assert (pat.col.view(30, 5).diff(dim=-1) > 0).all()   # sorted within rows
    assert torch.equal(pat.col[pat.by_col], pat.col.sort().values)


@pytest.mark.parametrize("n_active", [1, 7, 300, 1500])
def test_batch_topk_pattern_is_batch_topk(n_active):
    pre = torch.randn(30, 50)
    vals, pat = batch_topk_pattern(pre, n_active)
    ref_v, ref_i = pre.flatten().topk(n_active)
    torch.testing.assert_close(dense_of(vals, pat).flatten(), torch.zeros(1500).scatter(0, ref_i, ref_v))
    assert (pat.offsets.diff() >= 0).all() and pat.offsets[-1] == n_active


def test_decode_and_gather_gradients_match_dense():
    "The sparse backward of gather_pre_acts and decode_active equals autograd through the dense products."
    g = torch.Generator().manual_seed(0)
    n, d_in, d_sae = 20, 8, 30
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
              for s in ((d_in, d_sae), (d_sae,), (d_sae, d_in), (d_in,))]
    W_enc, b_enc, W_dec, b_dec = params
    target = torch.randn(3 * n, d_in, generator=g, dtype=torch.float64)

    def sparse_loss():
        with torch.no_grad():
            x_c = x - b_dec
            pre = x_c @ W_enc + b_enc
            pat = nest_pattern(topk_pattern(pre, 6)[1], (7, 19, 30))
        a = gather_pre_acts(pre, x_c, W_enc, b_enc, b_dec, pat).tanh()
        return (decode_active(a, W_dec, pat) - target).pow(2).sum() + scatter_active(a, pre, pat).pow(3).sum()

    def dense_loss():
        pre = (x - b_dec) @ W_enc + b_enc
        idx = pre.detach().topk(6, dim=-1).indices
        a = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).tanh())
        parts = torch.stack([a * ((torch.arange(d_sae) >= lo) & (torch.arange(d_sae) < hi))
                             for lo, hi in ((0, 7), (7, 19), (19, 30))]) @ W_dec
        return (parts.reshape(3 * n, d_in) - target).pow(2).sum() + a.pow(3).sum()

    gs = torch.autograd.grad(sparse_loss(), params)
    gd = torch.autograd.grad(dense_loss(), params)
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b)
    pat = topk_pattern(torch.randn(4, 30, generator=g), 3)[1]
    a0 = torch.rand(12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, W: decode_active(a, W, pat), (a0, W_dec.detach().clone().requires_grad_()))


def test_sparse_auxk_matches_auxk_loss():
    g = torch.Generator().manual_seed(0)
    x, x_hat, pre = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, 30, generator=g)
    W_dec = torch.randn(30, 8, generator=g)
    dead = torch.arange(30) % 3 == 0
    vals, pat = dead_topk_pattern(pre, dead, 4)
    assert dead[pat.col].all()
    ours = auxk_nmse(x, x_hat, decode_active(F.relu(vals), W_dec, pat))
    torch.testing.assert_close(ours, auxk_loss(x, x_hat, pre, W_dec, dead, 4))


@pytest.mark.parametrize("name", ["relu", "gated"])
@pytest.mark.parametrize("density", ["sparse", "dense"])
@pytest.mark.parametrize("d_in,d_sae,shape", [(16, 64, (50,)), (24, 96, (5, 13))])
def test_relu_and_gated_sparse_step_matches_dense(name, density, d_in, d_sae, shape, monkeypatch):
    # a trained ReLU (or Gated) SAE is sparse: with the encoder (gate) bias pushed down, few pre-activations are
    # positive and the step takes the sparse kernels; at initialisation about half are: the dense formulas
    sparse, dense = pair(name, d_in, d_sae, 1, l1_coefficient=0.3)
    x = rows(shape, d_in)
    if density == "sparse":
        with torch.no_grad():
            pre = sparse.pre_acts(x.reshape(-1, d_in))
            shift = torch.quantile(pre - sparse.b_enc, 1 - 3 / d_sae, dim=0)     # about 3 latents per row
            for s in (sparse, dense): s.b_enc.copy_(-shift)
    taken = []
    real = variants_mod.pattern_above
    monkeypatch.setattr(variants_mod, "pattern_above", lambda *a: taken.append(real(*a)) or taken[-1])
    out = assert_same_step(sparse, dense, x)
    assert (taken[0] is not None) == (density == "sparse"), taken
    assert out.terms["sparsity"] > 0 and out.terms["l0"] > 0
    if density == "sparse": assert out.terms["l0"] < sparse_mod.SPARSE_MAX_DENSITY * d_sae


@pytest.mark.parametrize("density", ["sparse", "dense"])
def test_jumprelu_sparse_step_matches_dense(density, monkeypatch):
    # the pattern holds the latents above threshold and the kernel window just below it, whose pairs carry the
    # thresholds' straight-through gradient though their latents are zero
    d_in, d_sae = 16, 64
    sparse, dense = pair("jumprelu", d_in, d_sae, 1, l0_coefficient=0.5, bandwidth=0.05, threshold_init=0.01)
    x = rows((80,), d_in)
    if density == "sparse":
        with torch.no_grad():
            pre = sparse.pre_acts(x)
            theta = torch.quantile(pre, 1 - 2 / d_sae, dim=0).clamp_min(0.05)      # about 2 latents per row
            for s in (sparse, dense): s.log_threshold.copy_(theta.log())
    taken = []
    real = variants_mod.pattern_above
    monkeypatch.setattr(variants_mod, "pattern_above", lambda *a: taken.append(real(*a)) or taken[-1])
    out = assert_same_step(sparse, dense, x)
    assert (taken[0] is not None) == (density == "sparse"), taken
    if density == "sparse":
        pat, theta = taken[0], sparse.log_threshold.exp().detach()
        z = sparse.pre_acts(x).detach()[pat.row, pat.col]
        assert (z <= theta[pat.col]).sum() > 0 and (z > theta[pat.col]).sum() > 0   # window pairs below threshold too
        assert (sparse.log_threshold.grad != 0).sum() > 0
