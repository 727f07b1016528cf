"Tests of sae_nb.dark_matter: exact recovery of a planted linear error, R² ~ 0 for noise, held-out evaluation, decompose_error."
import pytest
import torch

from sae_nb.dark_matter import (LinearErrorFit, decompose_error, decompose_reconstruction, linear_error_fit, r_squared,
                                split_rows)
from sae_nb.sae import make_sae


def data(n=1000, d=12, m=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 2 + 1
    A, c = torch.randn(d, m, generator=g, dtype=dtype), torch.randn(m, generator=g, dtype=dtype)
    noise = torch.randn(n, m, generator=g, dtype=dtype)
    return x, A, c, noise


def test_planted_linear_map_recovered_exactly():
    x, A, c, _ = data()
    fit = linear_error_fit(x, x @ A + c)
    assert isinstance(fit, LinearErrorFit)
    torch.testing.assert_close(fit.W, A, rtol=0, atol=1e-10)
    torch.testing.assert_close(fit.b, c, rtol=0, atol=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.nonlinear.abs().max() < 1e-10
    torch.testing.assert_close(fit.predict(x[:5]), (x @ A + c)[:5])


def test_planted_norm_map_recovered():
    x, A, c, _ = data()
    w = torch.randn(x.shape[1], dtype=x.dtype)
    u = torch.randn(x.shape[1], dtype=x.dtype); u /= u.norm()
    err = (x @ w + 50.0)[:, None] * u           # error along a fixed direction, norm linear in x (and positive)
    assert (x @ w + 50.0).min() > 0
    fit = linear_error_fit(x, err)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10) and fit.r2_norm == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(fit.W_norm, w, rtol=0, atol=1e-8)


def test_float32_inputs():
    x, A, c, _ = data(dtype=torch.float32)
    fit = linear_error_fit(x, x @ A + c)
    assert fit.W.dtype == torch.float32 and fit.r2 == pytest.approx(1.0, abs=1e-5)


def test_pure_noise_r2_near_zero():
    x, _, _, noise = data(n=4000)
    fit = linear_error_fit(x, noise)
    assert -0.02 < fit.r2 < 0.01 and -0.02 < fit.r2_norm < 0.01


def test_r2_measured_on_held_out_rows():
    # few rows per parameter: the fit overfits the training rows' noise, so a train-row R² would be clearly > 0
    x, _, _, noise = data(n=60, d=20, m=5)
    fit = linear_error_fit(x, noise, train_fraction=0.5)
    tr = fit.train_rows
    train_r2 = r_squared(noise[tr], fit.linear[tr])
    assert train_r2 > 0.4 and fit.r2 < 0.0
    assert fit.r2 == pytest.approx(r_squared(noise[fit.test_rows], fit.linear[fit.test_rows]))
    # the split: disjoint, covering, sized by train_fraction, fixed by the seed
    assert set(fit.train_rows.tolist()).isdisjoint(fit.test_rows.tolist())
    assert sorted(fit.train_rows.tolist() + fit.test_rows.tolist()) == list(range(60))
    assert len(fit.train_rows) == 30
    assert torch.equal(split_rows(60, 0.5, 0)[0], fit.train_rows) and not torch.equal(split_rows(60, 0.5, 1)[0], fit.train_rows)


def test_held_out_rows_do_not_enter_the_fit():
    x, A, c, noise = data(n=500)
    err = x @ A + c
    train, test = split_rows(500, 0.8, 0)
    corrupted = err.clone(); corrupted[test] = noise[test] * 100      # only held-out rows change
    fit_a, fit_b = linear_error_fit(x, err), linear_error_fit(x, corrupted)
    torch.testing.assert_close(fit_a.W, fit_b.W)                      # same map: fitted on the train rows only
    assert fit_b.r2 < 0.1                                             # but judged on the corrupted held-out rows


def test_ridge_shrinks_the_map():
    x, A, c, noise = data()
    err = x @ A + c + 0.1 * noise
    w0, w1 = linear_error_fit(x, err).W, linear_error_fit(x, err, ridge=1e4).W
    assert w1.norm() < 0.5 * w0.norm()


def test_leading_dims_flattened():
    x, A, c, _ = data(n=600)
    fit = linear_error_fit(x.view(20, 30, -1), (x @ A + c).view(20, 30, -1))
    assert fit.linear.shape == (600, A.shape[1]) and fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_group_split_keeps_groups_whole():
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 37, (900,), generator=g) * 7 + 5       # unequal groups, ids neither contiguous nor ordered
    n_groups = len(groups.unique())
    train, test = split_rows(900, 0.8, 0, groups)
    assert sorted(train.tolist() + test.tolist()) == list(range(900))
    tr, te = set(groups[train].tolist()), set(groups[test].tolist())
    assert tr.isdisjoint(te)                                          # no group on both sides
    assert len(tr) == round(0.8 * n_groups) and len(te) == n_groups - len(tr)
    assert torch.equal(split_rows(900, 0.8, 0, groups)[0], train)     # fixed by the seed ...
    assert not torch.equal(split_rows(900, 0.8, 1, groups)[0], train)  # ... and changed by it
    x, A, c, _ = data(n=900)
    fit = linear_error_fit(x, x @ A + c, groups=groups.view(30, 30))  # leading dims flattened like x's
    assert set(groups[fit.train_rows].tolist()).isdisjoint(groups[fit.test_rows].tolist())
    assert torch.equal(fit.train_rows, train)


def test_group_split_prevents_memorised_groups():
    # each group: its own input point z_g and its own error u_g, unrelated; a row split lets the map memorise u_g
    g = torch.Generator().manual_seed(1)
    seq = torch.arange(40).repeat_interleave(25)
    z, u = torch.randn(40, 64, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g, dtype=torch.float64)
    x = z[seq] + 0.05 * torch.randn(1000, 64, generator=g, dtype=torch.float64)
    e = u[seq] + 0.05 * torch.randn(1000, 8, generator=g, dtype=torch.float64)
    assert linear_error_fit(x, e).r2 > 0.9
    assert linear_error_fit(x, e, groups=seq).r2 < 0.05


@pytest.fixture(scope="module")
def sae_and_x():
    torch.manual_seed(0)
    sae = make_sae("topk", d_in=16, d_sae=64, k=4, seed=0)
    x = torch.randn(3000, 16) @ torch.randn(16, 16) * 0.5
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for xb in x.split(256):
        opt.zero_grad(); sae.training_loss(xb).loss.backward(); opt.step()
    sae.zero_grad(set_to_none=True)
    return sae, x


def test_decompose_error_keys_and_consistency(sae_and_x):
    sae, x = sae_and_x
    sae.train()
    r = decompose_error(sae, x)
    assert sae.training                                               # mode restored
    assert {"fvu", "r2", "r2_norm", "error_norm", "linear_error_norm", "nonlinear_error_norm",
            "fvu_heldout", "fvu_linear", "fvu_nonlinear", "n_train", "n_test", "fit"} <= set(r)
    with torch.no_grad(): err = x - sae.eval()(x).x_hat
    sae.train()
    torch.testing.assert_close(r["fit"].linear + r["fit"].nonlinear, err, rtol=0, atol=1e-5)
    h = r["fit"].test_rows
    xh = x[h].double()
    var = (xh - xh.mean(0)).pow(2).sum()                              # the mean-predictor baseline, per dimension
    assert r["fvu_heldout"] == pytest.approx((err[h].double().pow(2).sum() / var).item(), rel=1e-5)
    assert r["fvu_nonlinear"] == pytest.approx((r["fit"].nonlinear[h].double().pow(2).sum() / var).item(), rel=1e-5)
    from sae_nb.losses import fvu
    assert r["fvu"] == pytest.approx(fvu(x - err, x).item(), rel=1e-5)
    h = r["fit"].test_rows
    assert r["error_norm"] == pytest.approx(err[h].norm(dim=-1).mean().item(), rel=1e-5)
    assert r["n_train"] + r["n_test"] == len(x)
    assert 0 <= r["fvu_nonlinear"] <= r["fvu_heldout"] + 1e-9


@pytest.mark.parametrize("kw, exc, match", [
    ({"train_fraction": 0.0}, ValueError, "train_fraction"), ({"train_fraction": 1.0}, ValueError, "train_fraction"),
    ({"train_fraction": True}, ValueError, "train_fraction"), ({"ridge": -1.0}, ValueError, "ridge"),
    ({"ridge": float("inf")}, ValueError, "ridge"), ({"seed": 0.5}, TypeError, "seed"),
])
def test_linear_error_fit_bad_args(kw, exc, match):
    x, A, c, _ = data(n=100)
    with pytest.raises(exc, match=match): linear_error_fit(x, x @ A + c, **kw)


def test_decompose_error_groups_and_reconstruction(sae_and_x):
    sae, x = sae_and_x
    seq = torch.arange(len(x)) // 100                                 # 30 "sequences" of 100 tokens
    r = decompose_error(sae, x, groups=seq)
    assert set(seq[r["fit"].train_rows].tolist()).isdisjoint(seq[r["fit"].test_rows].tolist())
    assert r["n_test"] == 600                                         # 6 of the 30 sequences held out
    with torch.no_grad(): x_hat = sae.eval()(x).x_hat
    same = decompose_reconstruction(x, x_hat, groups=seq)
    for k in ("fvu", "r2", "r2_norm", "fvu_heldout", "fvu_linear", "fvu_nonlinear"):
        assert same[k] == pytest.approx(r[k], rel=1e-9, abs=1e-12)


def test_bad_inputs(sae_and_x):
    x, A, c, noise = data(n=100)
    with pytest.raises(ValueError, match="err"): linear_error_fit(x, noise[:50])
    with pytest.raises(TypeError, match="x"): linear_error_fit(x.numpy(), noise)
    with pytest.raises(TypeError, match="err"): linear_error_fit(x, noise.long())
    with pytest.raises(ValueError, match="x"): linear_error_fit(x[:, 0], noise)
    bad = noise.clone(); bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"): linear_error_fit(x, bad)
    with pytest.raises(ValueError, match="rows"): linear_error_fit(x[:3], noise[:3])
    with pytest.raises(ValueError, match="vary"): linear_error_fit(x, torch.ones_like(noise))
    sae, xs = sae_and_x
    with pytest.raises(ValueError, match="d_in"): decompose_error(sae, xs[:, :8])
    with pytest.raises(TypeError, match="sae"): decompose_error("sae", xs)
    with pytest.raises(ValueError, match="batch_size"): decompose_error(sae, xs, batch_size=0)
    with pytest.raises(ValueError, match="groups"): linear_error_fit(x, noise, groups=torch.zeros(50, dtype=torch.long))
    with pytest.raises(TypeError, match="groups"): linear_error_fit(x, noise, groups=torch.zeros(100))
    with pytest.raises(TypeError, match="groups"): linear_error_fit(x, noise, groups=list(range(100)))
    with pytest.raises(ValueError, match="rows"): linear_error_fit(x, noise, groups=torch.zeros(100, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"): decompose_error(sae, xs, groups=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="x_hat"): decompose_reconstruction(xs, xs[:, :8])
