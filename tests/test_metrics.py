"Tests of sae_nb.metrics: batch-size invariance, agreement with sae_nb.losses, densities, feature recovery, spliced-model metrics."
import copy
import functools
import math

import pytest
import torch

from sae_nb.data import ToyFeatures
from sae_nb.losses import explained_variance, fvu, l0, l1, l2, l2_ratio, mse
from sae_nb.metrics import (MetricAccumulator, density_histogram, evaluate, feature_matches, feature_recovery,
                            latent_density, model_metrics)
from sae_nb.sae import VARIANTS, make_sae

D_IN, D_SAE = 16, 64
SCALAR_KEYS = ("n_tokens", "mse", "fvu", "explained_variance", "l0", "l1", "l2", "l2_ratio",
               "dead_fraction", "dense_fraction", "dense_fraction_50")


def toy_x(n=2000, seed=0):
    return ToyFeatures(d_in=D_IN, n_features=32, mean_active=3, seed=seed, frequency_profile="zipf").sample(n)[0]


def trained(variant="topk", steps=30, dtype="float32"):
    "A fresh copy of an SAE after a few Adam steps on toy data (so trained state, e.g. BatchTopK's threshold, is set)."
    return copy.deepcopy(_trained(variant, steps, dtype))


@functools.cache
def _trained(variant, steps, dtype):
    kw = {"k": 4} if VARIANTS[variant].uses_k else {}
    sae = make_sae(variant, d_in=D_IN, d_sae=D_SAE, seed=0, dtype=dtype, **kw)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for xb in toy_x(steps * 64, seed=1).split(64):
        opt.zero_grad(); sae.training_loss(xb).loss.backward(); opt.step()
    sae.zero_grad(set_to_none=True)
    return sae


def assert_same_metrics(a, b, rel):
    for k in SCALAR_KEYS:
        assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=rel), (k, a[k], b[k])


# ---------------------------------------------------------------- batch-size invariance
@pytest.mark.parametrize("dtype,rel", [("float32", 1e-5), ("float64", 1e-10)])
def test_chunk_size_invariance(dtype, rel):
    "Chunks of 1, 7 and 4096 rows give the same numbers (float64 SAE: to float64 rounding)."
    sae, x = trained(dtype=dtype), toy_x(600)
    r = {bs: evaluate(sae, x, batch_size=bs) for bs in (1, 7, 4096)}
    assert_same_metrics(r[1], r[4096], rel)
    assert_same_metrics(r[7], r[4096], rel)
    assert r[4096]["n_tokens"] == len(x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunk_size_invariance_every_variant(variant):
    "In eval mode every variant encodes rows on their own, BatchTopK included."
    sae, x = trained(variant, steps=10), toy_x(700)
    assert_same_metrics(evaluate(sae, x, batch_size=7), evaluate(sae, x, batch_size=4096), 1e-5)


def test_iterable_and_leading_dims():
    sae, x = trained(), toy_x(1000)
    m = evaluate(sae, x)
    assert_same_metrics(evaluate(sae, list(x.split(300))), m, 1e-6)          # list of uneven batches
    assert_same_metrics(evaluate(sae, x.view(10, 100, D_IN), batch_size=33), m, 1e-6)   # [batch, pos, d_in]
    stream = ToyFeatures(d_in=D_IN, n_features=32, mean_active=3, seed=0, frequency_profile="zipf").batches(250)
    assert_same_metrics(evaluate(sae, stream, n_batches=4), m, 1e-6)          # endless iterable, n_batches of it


# ---------------------------------------------------------------- agreement with sae_nb.losses
def test_single_batch_equals_loss_functions():
    sae, x = trained(), toy_x(1500)
    m = evaluate(sae, x)
    with torch.no_grad():
        sae.eval(); out = sae(x)
        ref = {"mse": mse(out.x_hat, x), "fvu": fvu(out.x_hat, x), "explained_variance": explained_variance(out.x_hat, x),
               "l0": l0(out.latents), "l1": l1(out.latents, sae.W_dec), "l2": l2(out.x_hat, x),
               "l2_ratio": l2_ratio(out.x_hat, x)}
    for k, v in ref.items():
        assert math.isclose(m[k], v.item(), rel_tol=1e-5), (k, m[k], v.item())


def test_accumulator_uses_dataset_mean():
    "Over several batches the FVU baseline is the mean of all rows (fvu on the full set), not each batch's mean."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g, dtype=torch.float64) * 2
    x[300:] += 4.0                                   # two batches with very different means
    x_hat = x + 0.3 * torch.randn(600, 5, generator=g, dtype=torch.float64)
    a = torch.relu(torch.randn(600, 9, generator=g, dtype=torch.float64))
    acc = MetricAccumulator()
    for sl in (slice(0, 1), slice(1, 300), slice(300, 600)): acc.update(x[sl], x_hat[sl], a[sl])
    m = acc.compute()
    assert math.isclose(m["fvu"], fvu(x_hat, x).item(), rel_tol=1e-12)
    per_batch = (fvu(x_hat[:300], x[:300]) + fvu(x_hat[300:], x[300:])).item() / 2
    assert abs(per_batch - m["fvu"]) > 0.1 * m["fvu"]  # the mean of per-batch FVUs is a different number
    assert math.isclose(m["l0"], l0(a).item(), rel_tol=1e-12)
    torch.testing.assert_close(acc.mean, x.mean(0))


def test_l2_ratio_skips_zero_rows_across_batches():
    x = torch.tensor([[0., 0.], [3., 4.], [1., 0.]])
    x_hat = torch.tensor([[1., 1.], [3., 4.], [0.5, 0.]])
    acc = MetricAccumulator()
    for i in range(3): acc.update(x[i:i + 1], x_hat[i:i + 1], torch.ones(1, 2))
    assert math.isclose(acc.compute()["l2_ratio"], l2_ratio(x_hat, x).item(), rel_tol=1e-7)  # (1 + 0.5) / 2


# ---------------------------------------------------------------- dead / dense
def test_dead_and_dense_fractions_on_constructed_latents():
    n = 20
    lat = torch.zeros(n, 5)
    lat[0, 1] = 1.0           # 1/20 = 5%: alive, not dense
    lat[:2, 2] = 1.0          # 2/20 = 10%: not dense (dense is strictly more than 10%)
    lat[:3, 3] = 2.0          # 15%: dense, not > 50%
    lat[:11, 4] = 0.1         # 55%: dense and > 50%;  latent 0 never fires: dead
    acc = MetricAccumulator()
    for sl in lat.split(3): acc.update(torch.randn(len(sl), 2), torch.zeros(len(sl), 2), sl)
    m = acc.compute()
    torch.testing.assert_close(acc.frequency(), torch.tensor([0, .05, .10, .15, .55], dtype=torch.float64))
    assert (m["dead_fraction"], m["dense_fraction"], m["dense_fraction_50"]) == (0.2, 0.4, 0.2)
    h = density_histogram(acc.frequency(), n_tokens=n, bins=5)
    assert h["n_dead"] == 1 and h["counts"].sum() == 4
    assert math.isclose(h["edges"][0], math.log10(1 / n)) and h["edges"][-1] == 0.0


def test_latent_density_matches_latents():
    sae, x = trained(), toy_x(800)
    d = latent_density(sae, x, batch_size=100)
    sae.eval()
    with torch.no_grad(): ref = (sae(x).latents != 0).double().mean(0)
    torch.testing.assert_close(d.frequency.double(), ref, rtol=0, atol=1e-7)
    assert d.n_tokens == 800
    m = evaluate(sae, x)
    assert math.isclose(d.dead_fraction, m["dead_fraction"]) and math.isclose(d.dense_fraction, m["dense_fraction"])
    h = d.histogram(bins=10)
    assert h["counts"].sum() + h["n_dead"] == D_SAE


# ---------------------------------------------------------------- feature recovery
def test_feature_recovery_perfect_and_permutation_invariant():
    toy = ToyFeatures(d_in=D_IN, n_features=12, mean_active=2, seed=3)
    sae = make_sae("relu", d_in=D_IN, d_sae=D_SAE, seed=0)
    rows = torch.randperm(D_SAE)[:12]
    with torch.no_grad(): sae.W_dec[rows] = toy.features * torch.linspace(0.5, 3, 12)[:, None]  # any norms
    assert math.isclose(feature_recovery(sae, toy.features), 1.0, rel_tol=1e-6)
    fm = feature_matches(sae, toy.features)
    assert torch.equal(fm.index, rows)
    perm = torch.randperm(12)
    assert torch.equal(feature_matches(sae, toy.features[perm]).index, rows[perm])     # permuting true features
    sae_p = make_sae("relu", d_in=D_IN, d_sae=D_SAE, seed=0)
    p = torch.randperm(D_SAE)
    with torch.no_grad(): sae_p.W_dec.copy_(sae.W_dec[p])                              # permuting latents
    assert math.isclose(feature_recovery(sae_p, toy.features), feature_recovery(sae, toy.features), rel_tol=1e-9)


def test_feature_recovery_range_and_errors():
    sae = make_sae("relu", d_in=D_IN, d_sae=4, seed=0)
    feats = torch.randn(50, D_IN)
    r = feature_recovery(sae, feats)
    assert 0.0 <= r <= 1.0
    with torch.no_grad(): sae.W_dec.copy_(-torch.eye(D_IN)[:4])
    assert feature_recovery(sae, torch.eye(D_IN)[:4]) == 0.0      # anti-aligned rows recover nothing
    with pytest.raises(ValueError, match=r"true_features.*d_in=16.*\(7, 5\)"): feature_recovery(sae, torch.randn(7, 5))
    with pytest.raises(TypeError, match="true_features"): feature_recovery(sae, [[0.0] * D_IN])


# ---------------------------------------------------------------- mode handling and errors
@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_mode(training):
    sae, x = trained("batchtopk", steps=5), toy_x(300)
    sae.train(training)
    evaluate(sae, x, batch_size=50)
    assert sae.training == training
    bad = [x[:10], torch.randn(10, D_IN + 1)]                       # fails half-way through
    with pytest.raises(ValueError, match="d_in=16"): evaluate(sae, bad)
    assert sae.training == training
    assert all(p.grad is None for p in sae.parameters())


def test_evaluate_batchtopk_uses_eval_mode():
    "In training mode BatchTopK's latents depend on the batch; evaluate must not."
    sae, x = trained("batchtopk", steps=20), toy_x(512)
    sae.train()
    a = evaluate(sae, x, batch_size=1)["l0"]
    sae.eval()
    with torch.no_grad(): ref = l0(sae(x).latents).item()
    assert math.isclose(a, ref, rel_tol=1e-9)


def test_evaluate_argument_errors():
    sae, x = trained(steps=1), toy_x(10)
    with pytest.raises(ValueError, match="batch_size"): evaluate(sae, x, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"): evaluate(sae, x, batch_size=2.5)
    with pytest.raises(ValueError, match=r"d_in=16.*\(10, 3\)"): evaluate(sae, torch.randn(10, 3))
    with pytest.raises(ValueError, match="model and tokens"): evaluate(sae, x, model=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="x"): evaluate(sae, None)
    with pytest.raises(ValueError, match="n_batches"): evaluate(sae, x, n_batches=2)
    with pytest.raises(TypeError, match="sae"): evaluate(torch.nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="no rows"): evaluate(sae, [])


# ---------------------------------------------------------------- training-time FVU
def test_training_step_fvu_matches_evaluate():
    "The FVU a training step reports (sae.training_loss, batch-mean baseline) is evaluate's FVU on that batch."
    sae, x = trained(steps=3), toy_x(512, seed=5)
    sae.train()
    logged = sae.training_loss(x).terms["fvu"].item()
    assert math.isclose(evaluate(sae, x, batch_size=7)["fvu"], logged, rel_tol=1e-5)


def test_train_logged_fvu_matches_evaluate():
    "sae_nb.train logs the FVU of step t's batch with the weights after step t-1: evaluate reproduces it."
    tr = pytest.importorskip("sae_nb.train")
    B = 256
    x = toy_x(2 * B, seed=6)
    kw = dict(variant="topk", d_in=D_IN, d_sae=D_SAE, k=4, batch_size=B, lr=1e-2, lr_decay=0.0, log_every=1,
              progress=False, device="cpu", seed=0)
    one = tr.train(tr.TrainConfig(total_tokens=B, **kw), x[:B])        # the weights after step 1
    two = tr.train(tr.TrainConfig(total_tokens=2 * B, **kw), x)        # logs step 2, on x[B:], with those weights
    logged = two.history[1]["fvu"]
    assert math.isclose(evaluate(one.sae, x[B:])["fvu"], logged, rel_tol=1e-5), (evaluate(one.sae, x[B:])["fvu"], logged)


# ---------------------------------------------------------------- spliced-model metrics
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def lm():
    "The default model's architecture; the properties tested hold for any weights, so the random initialisation serves."
    from sae_nb.lm import build_default_model, default_tokens
    model = build_default_model(seed=0).eval()
    for p in model.parameters(): p.requires_grad_(False)
    return model, default_tokens(4, ctx=32, seed=0, split="val")


def identity_sae(d, act_scale):
    "A ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."
    sae = make_sae("relu", d_in=d, d_sae=2 * d, act_scale=act_scale, hook_name=HOOK)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1)); sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_(); sae.b_dec.zero_()
    return sae


def test_model_metrics_identity_and_zero_sae(lm):
    model, tokens = lm
    d = model.cfg.d_model
    r = evaluate(identity_sae(d, act_scale=3.7), None, model=model, tokens=tokens)   # hook from sae.cfg.hook_name
    assert math.isclose(r["ce_loss_recovered"], 1.0, abs_tol=1e-4)
    assert abs(r["spliced_kl"]) < 1e-6 and math.isclose(r["ce_spliced"], r["ce_clean"], rel_tol=1e-6)
    assert r["fvu"] < 1e-10 and r["n_tokens"] == tokens.numel()
    zero = make_sae("relu", d_in=d, d_sae=8)
    with torch.no_grad(): zero.W_dec.zero_(); zero.b_dec.zero_()
    z = model_metrics(zero, model, tokens, hook_name=HOOK)
    assert abs(z["ce_loss_recovered"]) < 1e-6
    assert math.isclose(z["spliced_kl"], z["zero_ablated_kl"], rel_tol=1e-9)
    assert math.isclose(z["ce_clean"], r["ce_clean"], rel_tol=1e-12)


def test_model_metrics_batch_invariant(lm):
    model, tokens = lm
    sae = make_sae("topk", d_in=model.cfg.d_model, d_sae=256, k=8, seed=0, hook_name=HOOK)
    a = model_metrics(sae, model, tokens, model_batch_size=1)
    b = model_metrics(sae, model, tokens, model_batch_size=3)
    for k in a: assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7), (k, a[k], b[k])
    with pytest.raises(ValueError, match="hook_name"): model_metrics(sae, model, tokens, hook_name="blocks.0.hook_resid_pots")
    with pytest.raises(ValueError, match="tokens"): model_metrics(sae, model, tokens[:, :1])
