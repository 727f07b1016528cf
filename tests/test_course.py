"Behaviour of sae_nb.course: the checkers accept correct solutions and reject known mistakes with a hint naming them."
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sae_nb.course import (ExerciseError, check_auxk, check_fvu, check_jumprelu_ste, check_l1, check_mse,
                           check_topk)
from sae_nb.losses import auxk_loss, fvu, l1, mse
from sae_nb.sae import JumpReLUFn, jumprelu, rectangle, topk_activation

NBS = Path(__file__).resolve().parents[1] / "nbs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def hidden_solutions() -> dict:
    "The reference solutions hidden in the chapters' exercise cells, executed into one namespace."
    ns = {"torch": torch, "F": F}
    for name in ("00_losses.ipynb", "01_sae.ipynb"):
        for cell in json.loads((NBS / name).read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and src.startswith("#| hide") and "Reference solution" in src:
                exec(src, ns)
    return ns


def rejects(check, fn, *needles):
    "Assert that `check(fn)` raises an ExerciseError whose message contains every needle."
    with pytest.raises(ExerciseError) as info:
        check(fn)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in:\n{info.value}"
    return str(info.value)


def test_exercise_error_is_an_assertion_error():
    assert issubclass(ExerciseError, AssertionError)


def test_package_functions_pass(capsys):
    check_mse(mse)
    check_fvu(fvu)
    check_l1(l1)
    check_auxk(auxk_loss)
    check_topk(lambda z, k: topk_activation(SimpleNamespace(cfg=SimpleNamespace(k=k)), z))
    check_jumprelu_ste(jumprelu)
    check_jumprelu_ste(JumpReLUFn)          # an autograd.Function class is accepted too
    out = capsys.readouterr().out
    assert out.count("cases pass") == 7


def test_hidden_solutions_of_the_chapters_pass(capsys):
    ns = hidden_solutions()
    assert {"my_fvu", "my_auxk", "my_topk", "MyJumpReLU"} <= set(ns)
    check_fvu(ns["my_fvu"])
    check_auxk(ns["my_auxk"])
    check_topk(ns["my_topk"])
    check_jumprelu_ste(ns["MyJumpReLU"])
    assert capsys.readouterr().out.count("cases pass") == 4


# ---- planted mistakes, each with the hint that names it -------------------------------------------------------

def test_fvu_mistakes():
    msg = rejects(check_fvu, lambda x_hat, x, mean=None: (x - x_hat).pow(2).sum() / x.pow(2).sum(),
                  "mean of x squared, not the variance about the mean", "expected:", "got:", "case:")
    assert "[64, 8]" in msg                                                   # the inputs are described
    rejects(check_fvu, lambda x_hat, x, mean=None: fvu(x_hat, x), "ignore the given `mean`")
    rejects(check_fvu, lambda x_hat, x, mean=None: 1 - fvu(x_hat, x, mean), "explained variance")
    rejects(check_fvu, lambda x_hat, x, mean=None: (x - x_hat).pow(2).sum() / (x - (x.mean(0) if mean is None else mean)).pow(2).sum(),
            "leading dims are not flattened")
    per_dim = lambda x_hat, x, mean=None: ((x - x_hat).pow(2).sum(0) / (x - (x.mean(0) if mean is None else mean)).pow(2).sum(0)).mean()
    rejects(check_fvu, per_dim, "ratio per dimension")
    rejects(check_fvu, lambda x_hat, x: fvu(x_hat, x), "raised TypeError")  # no `mean` argument


def test_mse_mistakes():
    rejects(check_mse, lambda x_hat, x: F.mse_loss(x_hat, x), "average over d instead of summing")
    rejects(check_mse, lambda x_hat, x: (x - x_hat).pow(2).sum(), "you sum over rows")
    rejects(check_mse, lambda x_hat, x: (x - x_hat).pow(2).sum(-1), "expected a 0-d tensor")
    rejects(check_mse, lambda x_hat, x: torch.tensor(mse(x_hat, x).item()), "does not depend on `x_hat` through autograd")


def test_l1_mistakes():
    rejects(check_l1, lambda f, W_dec: f.abs().sum(-1).mean(), "ignores the decoder norms")
    rejects(check_l1, lambda f, W_dec: (f.abs() * W_dec.norm(dim=1).pow(2)).sum(-1).mean(), "squared decoder norm")
    rejects(check_l1, lambda f, W_dec: (f * W_dec.norm(dim=1)).sum(-1).mean(), "absolute value")
    rejects(check_l1, lambda f, W_dec: (f.abs() * W_dec.norm(dim=0)).sum(-1).mean(), "raised RuntimeError")


def test_topk_mistakes():
    def keep(k_extra=0, relu=True, dim=-1, detach=False):
        def topk(z, k):
            vals, idx = z.topk(k + k_extra, dim=dim)
            vals = F.relu(vals) if relu else vals
            out = torch.zeros_like(z).scatter(dim, idx, vals)
            return out.detach() if detach else out
        return topk
    rejects(check_topk, keep(k_extra=1), "more than k=4", "not k+1")
    rejects(check_topk, keep(relu=False), "negative values kept", "ReLU")
    def by_abs(z, k):                                                         # the k largest |z|, not the largest z
        idx = z.abs().topk(k, -1).indices
        return torch.zeros_like(z).scatter(-1, idx, F.relu(z.gather(-1, idx)))
    rejects(check_topk, by_abs, "not the k largest")
    rejects(check_topk, lambda z, k: keep()(z, k) * 2, "differs from its pre-activation")
    rejects(check_topk, lambda z, k: keep()(z, k)[..., :-1], "shape of pre_acts")
    rejects(check_topk, keep(detach=True), "gradient wrt pre_acts")


def ste(width=1.0, sign=-1.0, theta_factor=True, use_grad=True, z_rule=None):
    "A JumpReLU autograd.Function with a configurable backward (the planted mistakes)."
    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, theta, eps):
            ctx.save_for_backward(z, theta)
            ctx.eps = eps
            return z * (z > theta).to(z.dtype)

        @staticmethod
        def backward(ctx, g):
            z, theta = ctx.saved_tensors
            K = rectangle((z - theta) / (ctx.eps * width))
            d = sign * (theta if theta_factor else 1.0) / ctx.eps * K * (g if use_grad else 1.0)
            gz = g * (z > theta).to(z.dtype) if z_rule is None else z_rule(g, z, theta, ctx.eps, K)
            return gz, d.sum_to_size(theta.shape), None
    return Planted


def test_jumprelu_ste_mistakes():
    rejects(check_jumprelu_ste, ste(width=2.0), "kernel width", "|z - theta| < eps", "wrong gradient wrt theta")
    rejects(check_jumprelu_ste, ste(sign=1.0), "sign")
    rejects(check_jumprelu_ste, ste(theta_factor=False), "missing the factor theta")
    rejects(check_jumprelu_ste, ste(use_grad=False), "ignore grad_output")
    rejects(check_jumprelu_ste, lambda z, theta, eps: z * (z >= theta), "STRICT")
    rejects(check_jumprelu_ste, lambda z, theta, eps: z * (z > theta), "no gradient reaches theta")
    with pytest.raises(TypeError, match="callable"):
        check_jumprelu_ste(3)


def auxk(all_latents=False, relu=True, norm="centred", detach=True):
    "An AuxK loss with the planted mistakes."
    def loss(x, x_hat, pre_acts, W_dec, dead_mask, k_aux):
        d = x.shape[-1]
        e = (x - (x_hat.detach() if detach else x_hat)).reshape(-1, d)
        z = pre_acts.reshape(-1, pre_acts.shape[-1])
        mask = torch.ones_like(dead_mask) if all_latents else dead_mask
        if not dead_mask.any():
            return pre_acts.sum() * 0
        vals, idx = z.masked_fill(~mask, float("-inf")).topk(min(k_aux, int(mask.sum())), dim=-1)
        e_hat = torch.zeros_like(z).scatter(-1, idx, F.relu(vals) if relu else vals) @ W_dec
        num = (e - e_hat).pow(2).sum()
        return num / (e - e.mean(0)).pow(2).sum() if norm == "centred" else num / e.shape[0]
    return loss


def test_auxk_mistakes():
    check_auxk(auxk())                                                       # the planting harness is right
    rejects(check_auxk, auxk(all_latents=True), "not restricted to dead latents")
    rejects(check_auxk, auxk(relu=False), "ReLU the selected dead pre-activations")
    rejects(check_auxk, auxk(norm="none"), "normalise")
    rejects(check_auxk, auxk(detach=False), "gradient into x_hat", "detach x_hat")


# ---- mistakes recognised by what the output shows ------------------------------------------------------------

def test_forward_mismatch_shows_a_small_input_and_its_values():
    msg = rejects(check_mse, lambda x_hat, x: F.mse_loss(x_hat, x), "a small input on which yours differs",
                  "x = [[1, 10], [3, 20], [2, 45]]", "expected 11.17, got 5.583")
    assert "x_hat = [[1.5, 12], [2.5, 18], [2, 40]]" in msg
    rejects(check_l1, lambda f, W_dec: f.abs().sum(-1).mean(), "latents = [[0.5, 0, 2], [0, 1, 0]]", "W_dec = [[3, 4]")
    rejects(check_auxk, auxk(norm="none"), "dead_mask = [False, True, False, True]", "k_aux = 1")


def test_mse_sum_over_rows_and_middle_dims():
    rejects(check_mse, lambda x_hat, x: (x - x_hat).pow(2).sum(), "you sum over rows", "mean over rows")
    def middle(x_hat, x):                                                     # sums over positions as well
        per = (x - x_hat).pow(2).sum(-1)
        return (per.sum(tuple(range(1, per.ndim))) if per.ndim > 1 else per).mean()
    rejects(check_mse, middle, "middle dims", "3-D input")


def test_fvu_check_data_separates_scalar_from_per_dimension_centring():
    from sae_nb.course import _recon_cases
    x_hat, x = _recon_cases()[0].args
    scalar = (x - x_hat).pow(2).sum() / (x - x.mean()).pow(2).sum()
    assert fvu(x_hat, x) > 2 * scalar                     # the means differ per dimension: not a rounding difference
    assert (x.mean(0).max() - x.mean(0).min()) > 20


def test_fvu_scalar_mean_and_reductions():
    scalar = lambda x_hat, x, mean=None: (x - x_hat).pow(2).sum() / (x - (x.mean() if mean is None else mean)).pow(2).sum()
    rejects(check_fvu, scalar, "ONE scalar mean", "x.mean(0)")
    rejects(check_fvu, lambda x_hat, x, mean=None: F.mse_loss(x_hat, x) / x.var(), "scalar mean", "x.var()")
    def mean_over_sum(x_hat, x, mean=None):
        xs, xh = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1])
        return (xs - xh).pow(2).mean() / (xs - (xs.mean(0) if mean is None else mean)).pow(2).sum()
    rejects(check_fvu, mean_over_sum, "1/n*d of the expected one", "reduce the squared error and the squared deviation differently")
    def rows_mean_over_sum(x_hat, x, mean=None):
        xs, xh = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x.shape[-1])
        return (xs - xh).pow(2).sum(-1).mean() / (xs - (xs.mean(0) if mean is None else mean)).pow(2).sum()
    rejects(check_fvu, rows_mean_over_sum, "1/n (rows) of the expected one (n (rows) = 64)")


def test_l1_reductions_and_weighting():
    rejects(check_l1, lambda f, W_dec: (f.abs() * W_dec.norm(dim=1)).sum(), "you sum over rows")
    rejects(check_l1, lambda f, W_dec: (f.abs() * W_dec.norm(dim=1)).mean(), "average over latents too")
    rejects(check_l1, lambda f, W_dec: f.abs().sum(-1).mean() * W_dec.norm(), "norm of the whole W_dec")


def topk_planted(k_extra=0, dim=-1):
    def topk(z, k):
        vals, idx = z.topk(k + k_extra, dim=dim)
        return torch.zeros_like(z).scatter(dim, idx, F.relu(vals))
    return topk


def test_topk_k_minus_and_plus_one_named_with_counts():
    rejects(check_topk, topk_planted(k_extra=-1), "kept k-1 = 3 latents per row where k = 4")
    rejects(check_topk, topk_planted(k_extra=1), "kept k+1 = 5 latents per row where k = 4")


def test_topk_wrong_dimension():
    msg = rejects(check_topk, topk_planted(dim=0), "top k along dim 0", "over the rows", "dim=-1")
    assert "row 0 of pre_acts: [" in msg                                    # the input row is shown


def test_topk_ties():
    def threshold(z, k):                                                      # keeps every value tied at the k-th
        return F.relu(z) * (z >= z.topk(k, dim=-1).values[..., -1:])
    rejects(check_topk, threshold, "ties at the k-th value", "5 pre-activations equal to its k-th largest value 2",
            "kept 5 latents where k = 3", "z >= (k-th value)")


def test_topk_negative_values_named_with_the_value():
    rejects(check_topk, lambda z, k: torch.zeros_like(z).scatter(-1, z.topk(k, -1).indices, z.topk(k, -1).values),
            "ReLU after the top k is missing", "row 0 keeps -0.31 at latent 4")


def test_jumprelu_gradient_paths():
    class ZeroTheta(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, theta, eps):
            ctx.save_for_backward(z, theta)
            return z * (z > theta).to(z.dtype)

        @staticmethod
        def backward(ctx, g):
            z, theta = ctx.saved_tensors
            return g * (z > theta).to(z.dtype), torch.zeros_like(theta), None
    rejects(check_jumprelu_ste, ZeroTheta, "the gradient wrt theta is 0 everywhere")
    rejects(check_jumprelu_ste, lambda z, theta, eps: jumprelu(z, theta.detach(), eps), "no gradient reaches theta")
    rejects(check_jumprelu_ste, lambda z, theta, eps: jumprelu(z.detach(), theta, eps), "wrong gradient wrt z",
            "no gradient reaches z")

    def z_grad(rule): return ste(z_rule=rule)   # the right theta-gradient, a planted z-gradient rule
    msg = rejects(check_jumprelu_ste, z_grad(lambda g, z, theta, eps, K: g * ((z > theta).to(z.dtype) + z / eps * K)),
                  "z gets a gradient it should not", "kernel window", "z.detach()")
    assert "where they differ" in msg and "theta = " in msg                   # the differing values are shown
    rejects(check_jumprelu_ste, z_grad(lambda g, z, theta, eps, K: g), "z gets a gradient where the latent is off")


def test_jumprelu_forward_mistakes_show_values():
    def undetached(z, theta, eps):                                           # a gradient-carrying term left in the value
        s = -(theta ** 2 / (2 * eps)) * rectangle((z - theta) / eps)
        return z * (z > theta).to(z.dtype) + s
    msg = rejects(check_jumprelu_ste, undetached, "only inside the kernel window", "s - s.detach()")
    assert "where they differ" in msg and "expected" in msg
    rejects(check_jumprelu_ste, lambda z, theta, eps: F.relu(z), "ReLU(z): the threshold is missing")
    rejects(check_jumprelu_ste, lambda z, theta, eps: (z - theta) * (z > theta), "shifted ReLU")


def test_auxk_normalisation_mistakes():
    from sae_nb.course import _auxk_variant
    rejects(check_auxk, _auxk_variant(norm="uncentred"), "centre e in the denominator")
    rejects(check_auxk, _auxk_variant(norm="x"), "variance of x")
    rejects(check_auxk, _auxk_variant(norm="per_row"), "ratio per row")
    def mean_over_sum(x, x_hat, pre_acts, W_dec, dead_mask, k_aux):
        return auxk_loss(x, x_hat, pre_acts, W_dec, dead_mask, k_aux) / x.shape[-1]
    rejects(check_auxk, mean_over_sum, "1/d of the expected one", "wrong normalisation")


def test_auxk_dead_mask_mistakes():
    from sae_nb.course import _auxk_variant
    rejects(check_auxk, auxk(all_latents=True), "ignores the dead mask")
    rejects(check_auxk, _auxk_variant(mask="alive"), "ALIVE latents")
    rejects(check_auxk, _auxk_variant(mask="after"), "dead mask after the TopK")
    def no_special_case(x, x_hat, pre_acts, W_dec, dead_mask, k_aux):              # forgets the no-dead-latent case
        e = (x - x_hat.detach()).reshape(-1, x.shape[-1])
        z = pre_acts.reshape(-1, pre_acts.shape[-1]).masked_fill(~dead_mask, float("-inf"))
        vals, idx = z.topk(min(k_aux, int(dead_mask.sum())), dim=-1)
        e_hat = torch.zeros_like(z).scatter(-1, idx, F.relu(vals)) @ W_dec
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    rejects(check_auxk, no_special_case, "no dead latent: the loss is 0", "nothing to reconstruct the error with")
