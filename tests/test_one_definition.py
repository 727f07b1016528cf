"""One definition: the loss every variant trains on, as `SAE.training_loss` computes it (sparse step, fused autograd
nodes, bf16 autocast), equals plain autograd of the formulas of the variants chapter, in value and in every gradient.

The reference below is written from the formulas with `sae_nb.losses` and ordinary torch ops only: none of the
package's autograd Functions (JumpReLUFn, StepFn, JumpReLUL0Fn, GatedFn, the kernels of `sae_nb.sparse`). Its
straight-through estimators use the detach trick: a term t - sg(t) is zero in value and passes t's chosen gradient.

The data make every discrete decision (which latents fire, which win a top-k, which pre-activations fall in the
JumpReLU kernel's window) the same in every dtype: inputs, encoder weights and biases lie on coarse binary grids, so
the pre-activations are exact in float64, float32 and bfloat16 alike; thresholds, gated magnitudes and window edges
sit half a grid step away from every pre-activation; and ties at a top-k boundary that keeps a positive value are
avoided (BatchTopK and Matryoshka batches are a few distinct rows, each repeated, so that the batch-wide boundary is a
row-wise one). The package then differs from the reference only by rounding, which the tolerances bound:

    float64  relative 1e-12 (norm of the difference over the norm of the reference)
    float32  relative 1e-5
    bfloat16 autocast (float32 parameters)  relative 4e-2
plus a small absolute floor for terms that vanish; integer outputs (L0, per-latent firing counts) must be equal.
"""
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import sae_nb.sparse as sparse_mod
from sae_nb.losses import auxk_loss, fvu, l0, l1, mse
from sae_nb.sae import VARIANTS, make_sae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest

D_IN, D_SAE, K, AUX_K, N_ROWS = 16, 64, 4, 4, 64
ACT_SCALE, SPARSITY_SCALE = 2.0, 0.5                 # a power of two keeps x * act_scale exact
BANDWIDTH = 1 / 8                                    # JumpReLU: window edges theta +- 1/16 lie on the 1/32 half-grid
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
BATCHWIDE = ("batchtopk", "matryoshka")
DEAD = {"none": None,
        "block": torch.arange(D_SAE) % 3 == 0,       # 22 dead latents: AuxK over the dense dead block
        "pattern": torch.arange(D_SAE) % 4 != 0}     # 48 dead latents: AuxK over a sparse pattern
TOL = {"float64": (1e-12, 1e-12), "float32": (1e-5, 1e-6), "bfloat16": (4e-2, 1e-3)}   # (relative, absolute)


# ---------------------------------------------------------------- the data: exact pre-activations, no boundary ties

def _grid(shape, step, lo, hi, g):
    "Uniform draws from the multiples of `step` in [lo, hi]."
    n = round((hi - lo) / step) + 1
    return torch.randint(0, n, shape, generator=g, dtype=torch.float64) * step + lo


def _clean_row(p, k):
    "Whether the k largest entries of the row `p` are unambiguous: no tie at the boundary unless it keeps only <= 0."
    if k >= p.numel():
        return True
    top = p.topk(k + 1).values
    return bool(top[k - 1] > top[k] or top[k - 1] <= 0)


def _rows_ok(p):
    "Row-wise checks of the pre-activations `p` [n, d_sae]: TopK and both AuxK dead sets without boundary ties."
    ok = torch.tensor([_clean_row(r, K) for r in p])
    for dead in (DEAD["block"], DEAD["pattern"]):
        ok &= torch.tensor([_clean_row(r[dead], AUX_K) for r in p])
    return ok


@lru_cache(maxsize=None)
def problem(variant: str, regime: str):
    "(x [N_ROWS, d_in] in model units, float64 parameters by name) for a variant at 'init' density or 'sparse'."
    g = torch.Generator().manual_seed(1234)
    params = {"W_enc": _grid((D_IN, D_SAE), 0.25, -0.5, 0.5, g),         # x_c W_enc: multiples of 1/16
              "b_dec": _grid((D_IN,), 0.25, -0.5, 0.5, g),
              "W_dec": torch.randn(D_SAE, D_IN, generator=g, dtype=torch.float64) / 4
                       * (0.5 + torch.rand(D_SAE, 1, generator=g, dtype=torch.float64))}  # norms far from 1
    b_enc = _grid((D_SAE,), 1 / 16, -0.25, 0.25, g)
    pool = _grid((2048, D_IN), 1 / 8, -1, 1, g)                         # x * act_scale - b_dec: multiples of 1/4
    p = (pool * ACT_SCALE - params["b_dec"]) @ params["W_enc"]            # exact
    if regime == "sparse":   # a trained-like SAE: about 1/40 of the pairs above threshold (sparse step at 1/16)
        shift = torch.quantile(p.flatten(), 1 - 1 / 40).item()
        b_enc = b_enc - torch.ceil(torch.tensor(shift * 16)) / 16
    params["b_enc"] = b_enc
    if variant == "jumprelu":   # thresholds on the odd multiples of 1/32, in (0, 1)
        params["log_threshold"] = (_grid((D_SAE,), 1 / 16, 1 / 32, 31 / 32, g)).log()
    if variant == "gated":      # e^r_mag in {1/2, 1, 2}, b_mag odd multiples of 1/64: |magnitude| >= 1/64
        params["r_mag"] = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)[
            torch.randint(0, 3, (D_SAE,), generator=g)] * torch.log(torch.tensor(2.0, dtype=torch.float64))
        params["b_mag"] = _grid((D_SAE,), 1 / 32, -15 / 64, 15 / 64, g)
    pi = p + b_enc
    keep = _rows_ok(pi)
    if variant not in BATCHWIDE:
        x = pool[keep][:N_ROWS]
    else:   # R distinct rows, each repeated: the batch's k*n largest are the R rows' k*R largest, taken without ties
        R = 8
        cand = keep.nonzero().squeeze(1)
        for _ in range(500):
            pick = cand[torch.randperm(cand.numel(), generator=g)[:R]]
            if _clean_row(pi[pick].flatten(), K * R):
                break
        else:
            raise AssertionError("no batch without a tie at its BatchTopK boundary")
        x = pool[pick].repeat_interleave(N_ROWS // R, dim=0)
    assert x.shape == (N_ROWS, D_IN)
    assert (pi.abs() < 16).all()       # exact in bfloat16 too (8 significant bits, multiples of 1/16)
    return x, params


def build(variant, regime, dtype, sparse_step):
    "The SAE with the problem's parameters (in `dtype`: float64 or float32; bf16 runs float32 under autocast)."
    x, params = problem(variant, regime)
    kw = dict(k=K, aux_k=AUX_K) if VARIANTS[variant].uses_k else {}
    if variant == "jumprelu":
        kw.update(bandwidth=BANDWIDTH, l0_coefficient=0.3)
    if variant in ("relu", "gated"):
        kw.update(l1_coefficient=0.7)
    sae = make_sae(variant, d_in=D_IN, d_sae=D_SAE, seed=0, act_scale=ACT_SCALE, aux_coefficient=0.25,
                   dtype="float64" if dtype == "float64" else "float32", sparse_step=sparse_step, **kw)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(params[name])
    return sae.train(), x.to(sae.W_dec.dtype)


# ---------------------------------------------------------------- the reference: plain autograd of the formulas

def reference(sae, x, dead_mask, sparsity_scale):
    "Loss, terms, latents, x_hat (model units) and parameter gradients of the chapter's formulas, in float64."
    cfg, name = sae.cfg, sae.cfg.variant
    P = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    xs = x.double() * cfg.act_scale                                      # training units
    x_c = xs - P["b_dec"]
    pi = x_c @ P["W_enc"] + P["b_enc"]                                   # pi(x) = (x - b_dec) W_enc + b_enc
    sg = lambda t: t.detach()
    sparsity = aux = torch.zeros((), dtype=torch.float64)
    if name == "relu":                                                   # f = ReLU(pi), S = sum_i |f_i| ||W_dec[i]||
        f = F.relu(pi)
        sparsity = cfg.l1_coefficient * sparsity_scale * l1(f, P["W_dec"])
    elif name == "topk":                                                 # f = ReLU(TopK_k(pi)), row-wise
        vals, idx = pi.topk(cfg.k, dim=-1)
        f = torch.zeros_like(pi).scatter(-1, idx, F.relu(vals))
    elif name in BATCHWIDE:                                              # the k * n largest ReLU(pi) of the batch
        flat = F.relu(pi).flatten()
        vals, idx = flat.topk(cfg.k * pi.shape[0])
        f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pi)
    elif name == "jumprelu":                                             # f = z H(z - theta), S = sum_i H(z_i - theta_i)
        theta, eps = P["log_threshold"].exp(), cfg.bandwidth
        H = (pi > theta).double()
        K_ = (((pi - theta) / eps).abs() < 0.5).double()                 # rectangle kernel K((z - theta) / eps)
        d_theta = theta - sg(theta)                                      # zero, with gradient 1 wrt theta
        f = sg(H) * pi + sg(-theta / eps * K_) * d_theta                 # d/dz = H, d/dtheta = -(theta/eps) K
        step = sg(H) + sg(-K_ / eps) * d_theta                           # d/dz = 0, d/dtheta = -(1/eps) K
        sparsity = cfg.l0_coefficient * sparsity_scale * step.sum(-1).mean()
    elif name == "gated":
        mag = (x_c @ P["W_enc"]) * P["r_mag"].exp() + P["b_mag"]       # pi_mag = x_c (W_enc e^r_mag) + b_mag
        f = sg((pi > 0).double()) * F.relu(mag)                          # f = H(pi_gate) ReLU(pi_mag)
        gate = F.relu(pi)
        sparsity = cfg.l1_coefficient * sparsity_scale * l1(gate, sg(P["W_dec"]))
        aux = mse(gate @ sg(P["W_dec"]) + sg(P["b_dec"]), xs)             # x_hat_frozen(ReLU(pi_gate))
    x_hat = f @ P["W_dec"] + P["b_dec"]
    full = mse(x_hat, xs)
    parts = {"mse": full}
    if name == "matryoshka":                                             # sum over prefixes m of ||x - x_hat_m||^2
        parts = {f"mse_prefix_{m}": mse(f[:, :m] @ P["W_dec"][:m] + P["b_dec"], xs) for m in cfg.matryoshka_prefixes}
    fidelity = sum(parts.values())
    if name in TOPK_FAMILY and dead_mask is not None:                    # alpha nmse(e_hat, e) sigma^2
        sigma2 = sg((xs - xs.mean(0)).pow(2).sum(-1).mean())
        aux = cfg.aux_coefficient * auxk_loss(xs, x_hat, pi, P["W_dec"], dead_mask, cfg.aux_k) * sigma2
    loss = fidelity + sparsity + aux
    grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True)
    grads = {n: torch.zeros_like(P[n]) if g is None else g for n, g in zip(P, grads)}
    terms = {"mse": full, "fvu": fvu(x_hat, xs), "l0": l0(f), "fidelity": fidelity, "sparsity": sparsity,
             "aux": aux, **parts}
    return dict(loss=loss.detach(), terms={n: t.detach() for n, t in terms.items()}, latents=f.detach(),
                x_hat=x_hat.detach() / cfg.act_scale, fired=(f != 0).sum(0), grads=grads)


# ---------------------------------------------------------------- the comparison

def close(what, got, want, dtype):
    "|got - want| <= rel |want| + abs, in the norm over all entries."
    rel, abs_ = TOL[dtype]
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, size = (got - want).norm().item(), want.norm().item()
    assert err <= rel * size + abs_, f"{what}: |package - reference| = {err:.3g}, |reference| = {size:.3g} ({dtype})"


def run_package(sae, x, dead_mask, dtype):
    "training_loss + backward as `train` runs them; also whether the sparse step was taken."
    taken, sparse_terms = [], sae._sparse_terms
    def spy(*a):
        r = sparse_terms(*a)
        taken.append(r[0] is not None)
        return r
    sae._sparse_terms = spy
    if dtype == "bfloat16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae.training_loss(x, dead_mask=dead_mask, sparsity_scale=SPARSITY_SCALE)
    else:
        out = sae.training_loss(x, dead_mask=dead_mask, sparsity_scale=SPARSITY_SCALE)
    out.loss.backward()
    return out, any(taken)


CASES = [(v, dt, regime, path, dead)
         for v in VARIANTS for dt in ("float64", "float32", "bfloat16") for regime in ("init", "sparse")
         for path in ("sparse_step", "dense") for dead in (DEAD if VARIANTS[v].uses_k else ["none"])]


@pytest.mark.parametrize("variant,dtype,regime,path,dead", CASES)
def test_training_loss_is_plain_autograd_of_the_formulas(variant, dtype, regime, path, dead):
    sae, x = build(variant, regime, dtype, sparse_step=path == "sparse_step")
    dead_mask = DEAD[dead]
    ref = reference(sae, x, dead_mask, SPARSITY_SCALE)
    out, sparse = run_package(sae, x, dead_mask, dtype)
    # the path under test is the one intended: the sparse step where the variant can take it
    assert sparse == (path == "sparse_step" and (variant in TOPK_FAMILY or regime == "sparse")), sparse
    if dead_mask is not None:   # the two AuxK kernels of the sparse step
        block = AUX_K >= sparse_mod.AUXK_BLOCK_DENSITY * int(dead_mask.sum())
        assert block == (dead == "block")
    close("loss", out.loss, ref["loss"], dtype)
    assert out.terms.keys() == ref["terms"].keys()
    for name, t in ref["terms"].items():
        if name == "l0":
            assert out.terms[name].item() == t.item(), (name, out.terms[name].item(), t.item())
        else:
            close(name, out.terms[name], t, dtype)
    close("latents", out.latents, ref["latents"], dtype)
    close("x_hat", out.x_hat, ref["x_hat"], dtype)
    assert torch.equal(out.fired, ref["fired"])
    grads = {n: p.grad for n, p in sae.named_parameters()}
    assert grads.keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        assert grads[name] is not None, name
        close(f"grad {name}", grads[name], g, dtype)
    if variant in BATCHWIDE:    # the first training step sets the inference threshold: the smallest kept value
        f = ref["latents"]
        want = f[f > 0].min() if (f > 0).any() else torch.tensor(-1.0, dtype=torch.float64)
        close("threshold", sae.threshold, want, dtype)


def test_cases_reach_every_path():
    "Sparse and dense steps, both AuxK kernels, and both regimes of the sparse variants are all exercised."
    for v in ("relu", "jumprelu", "gated"):
        x, params = problem(v, "sparse")
        assert params["b_enc"].max() < 0
    assert len(CASES) == 3 * 3 * 2 * 2 * 3 + 3 * 3 * 2 * 2
