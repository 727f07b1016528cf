"Behaviour of sae_nb.course: the checkers accept correct solutions and reject known mistakes with a hint naming them."
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import sae_nb.course as course
from sae_nb import solutions
from sae_nb.course import (ExerciseError, attempt, check_auxk, check_batch_threshold, check_batchtopk,
                           check_ce_recovered, check_fvu, check_gated_loss, check_jumprelu_ste, check_l1,
                           check_matryoshka, check_mse, check_topk, check_train_loop)
from sae_nb.losses import auxk_loss, fvu, l1, mse
from sae_nb.ste import JumpReLUFn, jumprelu, rectangle
from sae_nb.variants import batchtopk_activation, gated_aux, gated_l1, topk_activation

NBS = Path(__file__).resolve().parents[1] / "nbs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def code_cells(name: str) -> list[str]:
    "The source of every code cell of the notebook `name`."
    return ["".join(c["source"]) for c in json.loads((NBS / name).read_text())["cells"] if c["cell_type"] == "code"]


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


SOLVED = [(check_mse, solutions.mse), (check_fvu, solutions.fvu), (check_l1, solutions.l1),
          (check_topk, solutions.topk), (check_batchtopk, solutions.batchtopk),
          (check_batch_threshold, solutions.batch_threshold), (check_jumprelu_ste, solutions.JumpReLU),
          (check_gated_loss, solutions.gated_loss), (check_auxk, solutions.auxk),
          (check_matryoshka, solutions.matryoshka_loss), (check_ce_recovered, solutions.ce_recovered),
          (check_train_loop, solutions.train_loop)]


def test_every_checker_is_exercised_and_passes_its_solution(capsys):
    checkers = {n for n in course.__all__ if n.startswith("check_")}
    assert checkers == {c.__name__ for c, _ in SOLVED}
    for check, solution in SOLVED:
        check(solution)
    out = capsys.readouterr().out
    assert out.count("cases pass") == len(SOLVED) - 1 and "steps match the reference" in out


def test_new_checkers_agree_with_the_package():
    def package_batchtopk(z, k, threshold=None):                            # the SAE's activation, rows flattened
        sae = SimpleNamespace(training=threshold is None, cfg=SimpleNamespace(k=k),
                              threshold=torch.tensor(-1.0 if threshold is None else float(threshold)))
        return batchtopk_activation(sae, z.reshape(-1, z.shape[-1])).reshape(z.shape)
    check_batchtopk(package_batchtopk)

    def package_gated(x, x_hat, pi, W_dec, b_dec, c):                        # the Gated variant's own terms
        sae = SimpleNamespace(W_dec=W_dec, b_dec=b_dec)
        rows = lambda t: t.reshape(-1, t.shape[-1])
        return mse(x_hat, x) + c * gated_l1(sae, rows(pi), None) + gated_aux(sae, rows(x), None, rows(pi), None, None)
    check_gated_loss(package_gated)


def test_exercises_come_before_answers():
    cells = code_cells("09a_exercises.ipynb")
    skeletons = [c for c in cells if c.startswith(("def my_", "class My"))]
    assert len(skeletons) == 10
    ns = {"torch": torch, "F": F}
    for src in skeletons:
        exec(src, ns)
        assert "NotImplementedError" in src
        for answer in (".scatter(", "sum_to_size", "masked_fill", "cross_entropy(", ".detach()", "zero_grad()"):
            assert answer not in src, (answer, src)
    assert "solutions" not in "".join(c for c in cells if not c.startswith(("attempt(", "from sae_nb import solutions")))
    used = " ".join(c for c in cells if c.startswith("attempt("))
    assert all(name in used for name in course.__all__ if name.startswith("check_") and name != "check_mse")
    for name in ("00_losses.ipynb", "01_sae.ipynb", "01c_ste.ipynb", "01d_variants.ipynb"):                          # no hidden answers in the chapters
        assert not any("Reference solution" in c or "def my_" in c for c in code_cells(name))


def test_attempt_checks_the_solution_until_yours_is_written(capsys):
    def unwritten(x_hat, x, mean=None):
        raise NotImplementedError("write my_fvu")
    attempt(check_fvu, unwritten, solutions.fvu)
    out = capsys.readouterr().out
    assert "not written yet" in out and "check_fvu: all 6 cases pass" in out
    with pytest.raises(ExerciseError, match="NotImplementedError"):          # without a solution: the error stands
        attempt(check_fvu, unwritten)
    with pytest.raises(ExerciseError, match="explained variance"):           # a real mistake is never replaced
        attempt(check_fvu, lambda x_hat, x, mean=None: 1 - fvu(x_hat, x, mean), solutions.fvu)
    class Unwritten(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, theta, bandwidth):
            raise NotImplementedError
    attempt(check_jumprelu_ste, Unwritten, solutions.JumpReLU)
    assert "check_jumprelu_ste: all 5 cases pass" in capsys.readouterr().out


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


# ---- the checkers added with the exercise page ------------------------------------------------------------

def batchtopk(k_delta=0, relu=True, n_rows="all", at=">", threshold_used=True, detach=False):
    "A BatchTopK with planted mistakes: k_delta per row, no ReLU, n from the first dim, >= at inference, ..."
    def fn(z, k, threshold=None):
        if threshold is not None and threshold_used:
            return z * ((z >= threshold) if at == ">=" else (z > threshold))
        n = z.shape[0] if n_rows == "first" else z.reshape(-1, z.shape[-1]).shape[0]
        flat = (F.relu(z) if relu else z).flatten()
        vals, idx = flat.topk((k + k_delta) * n)
        out = torch.zeros_like(flat).scatter(0, idx, vals).view_as(z)
        return out.detach() if detach else out
    return fn


def test_batchtopk_mistakes():
    check_batchtopk(batchtopk())
    rejects(check_batchtopk, batchtopk(k_delta=1), "you kept (k+1) * n = 32 values where k * n = 3 * 8 = 24")
    rejects(check_batchtopk, batchtopk(k_delta=-1), "(k-1) * n = 16")
    rejects(check_batchtopk, batchtopk(relu=False), "ReLU the values")
    rejects(check_batchtopk, batchtopk(n_rows="first"), "first dim only", "here 8")
    rejects(check_batchtopk, batchtopk(at=">="), "exactly at the threshold 0.5 is kept", "strictly")
    rejects(check_batchtopk, batchtopk(threshold_used=False), "ignored `threshold`")
    rejects(check_batchtopk, lambda z, k, threshold=None: course._reference_topk(z, k), "TopK per row")
    rejects(check_batchtopk, lambda z, k, threshold=None: batchtopk()(z, k, threshold) * 2, "differs from its pre-activation")
    rejects(check_batchtopk, batchtopk(detach=True), "wrong gradient wrt `pre_acts`", "not detached")
    def ties(z, k, threshold=None):                                          # keeps every value tied at the cut
        if threshold is not None:
            return z * (z > threshold)
        r = F.relu(z)
        return r * (r >= r.flatten().topk(k * r.reshape(-1, r.shape[-1]).shape[0]).values[-1])
    msg = rejects(check_batchtopk, ties, "ties at the batch's cut", "kept 10 values where k * n = 8")
    assert "row 0 of pre_acts: [" in msg and "expected non-zeros of row" in msg   # the input and the values are shown


def test_batch_threshold_mistakes():
    check_batch_threshold(lambda a: a.detach()[a.detach() > 0].min())
    rejects(check_batch_threshold, lambda a: a.min(), "zeros of the latents not kept give 0", "smallest positive values")
    rejects(check_batch_threshold, lambda a: a.max(), "largest kept value")
    rejects(check_batch_threshold, lambda a: a[a > 0].mean().detach(), "mean of the kept values")
    rejects(check_batch_threshold, lambda a: a.reshape(-1, a.shape[-1]).max(-1).values, "one value per row")
    rejects(check_batch_threshold, lambda a: a[a > 0].min(), "carries a gradient", "detach")


def gated(aux=True, weighted=True, gate="relu", bias=True, detach_W=True, detach_b=True, detach_pi=False, per_d=False):
    "A Gated loss with planted mistakes."
    def fn(x, x_hat, pi, W_dec, b_dec, c):
        m = F.mse_loss if per_d else mse
        g = (F.relu(pi) if gate == "relu" else pi.abs())
        g = g.detach() if detach_pi else g
        W = W_dec.detach() if detach_W else W_dec
        b = b_dec.detach() if detach_b else b_dec
        sparsity = l1(g, W) if weighted else g.sum(-1).mean()
        out = m(x_hat, x) + c * sparsity
        if aux:
            out = out + m(F.relu(pi if not detach_pi else pi.detach()) @ W + (b if bias else 0), x)
        return out
    return fn


def test_gated_loss_mistakes():
    check_gated_loss(gated())
    msg = rejects(check_gated_loss, gated(aux=False), "auxiliary term is missing", "a small input on which yours differs")
    assert "W_dec = [[3, 4], [1, 0], [0, 0.5]]" in msg
    rejects(check_gated_loss, gated(weighted=False), "not weighted by the decoder norms")
    rejects(check_gated_loss, gated(gate="abs"), "|pi_gate|")
    rejects(check_gated_loss, gated(bias=False), "leaves out b_dec")
    rejects(check_gated_loss, gated(per_d=True), "F.mse_loss")
    msg = rejects(check_gated_loss, gated(detach_W=False), "wrong gradient wrt `W_dec`", "W_dec.detach()")
    assert "where they differ" in msg and "expected 0, got" in msg
    rejects(check_gated_loss, gated(detach_b=False), "wrong gradient wrt `b_dec`", "b_dec.detach()")
    rejects(check_gated_loss, gated(detach_pi=True), "no gradient reaches pi_gate")
    rejects(check_gated_loss, lambda *a: gated()(*a) * a[0].shape[0], "take means over rows")


def matryoshka(shift=0, reduce="sum", nested=True, bias=True, detach=None):
    "A Matryoshka loss with planted mistakes."
    def fn(x, a, W_dec, b_dec, prefixes):
        if detach == "latents": a = a.detach()
        if detach == "W_dec": W_dec = W_dec.detach()
        x, a = x.reshape(-1, x.shape[-1]), a.reshape(-1, a.shape[-1])
        parts, start = [], 0
        for m in prefixes:
            lo = 0 if nested else start
            parts.append(mse(a[:, lo:m + shift] @ W_dec[lo:m + shift] + (b_dec if bias else 0), x))
            start = m
        parts = torch.stack(parts)
        return parts.sum() if reduce == "sum" else parts.mean()
    return fn


def test_matryoshka_mistakes():
    check_matryoshka(matryoshka())
    msg = rejects(check_matryoshka, matryoshka(reduce="mean"), "mean over the prefixes", "a small input on which yours differs")
    assert "prefixes = (1, 3)" in msg
    rejects(check_matryoshka, matryoshka(shift=-1), "you kept m-1")
    rejects(check_matryoshka, matryoshka(shift=1), "you kept m+1")
    rejects(check_matryoshka, matryoshka(nested=False), "each group decodes alone")
    rejects(check_matryoshka, matryoshka(bias=False), "b_dec is missing")
    rejects(check_matryoshka, lambda x, a, W, b, p: mse(a @ W + b, x), "only the full dictionary")
    rejects(check_matryoshka, matryoshka(detach="latents"), "no gradient reaches latents")
    rejects(check_matryoshka, matryoshka(detach="W_dec"), "no gradient reaches W_dec")


def ce_recovered(shift="next", form="recovered", softmax=False, per_sequence=False):
    "CE loss recovered with planted mistakes."
    def ce(logits, tokens):
        if softmax: logits = logits.softmax(-1)
        l, t = {"next": (logits[:, :-1], tokens[:, 1:]), "none": (logits, tokens),
                "back": (logits[:, 1:], tokens[:, :-1])}[shift]
        return F.cross_entropy(l.reshape(-1, l.shape[-1]), t.reshape(-1))
    def fn(c, s, z, t):
        if per_sequence:
            return sum(fn.__wrapped__(c[i:i + 1], s[i:i + 1], z[i:i + 1], t[i:i + 1]) for i in range(len(t))) / len(t)
        return fn.__wrapped__(c, s, z, t)
    def one(c, s, z, t):
        cc, cs, cz = ce(c, t), ce(s, t), ce(z, t)
        return {"recovered": (cz - cs) / (cz - cc), "lost": (cs - cc) / (cz - cc), "upside": (cz - cc) / (cz - cs)}[form]
    fn.__wrapped__ = one
    return fn


def test_ce_recovered_mistakes():
    check_ce_recovered(ce_recovered())
    check_ce_recovered(lambda *a: float(ce_recovered()(*a)))                   # a float is fine
    msg = rejects(check_ce_recovered, ce_recovered(shift="none"), "no shift", "tokens = [[0, 2, 1]]")
    assert "expected" in msg and "got" in msg
    rejects(check_ce_recovered, ce_recovered(shift="back"), "shifted the wrong way")
    rejects(check_ce_recovered, ce_recovered(form="lost"), "fraction LOST")
    rejects(check_ce_recovered, ce_recovered(form="upside"), "upside down")
    rejects(check_ce_recovered, ce_recovered(softmax=True), "softmax before F.cross_entropy")
    rejects(check_ce_recovered, ce_recovered(per_sequence=True), "ratio per sequence")


def test_train_loop_mistakes():
    loop = course._loop_variant
    check_train_loop(loop())
    rejects(check_train_loop, loop(zero_grad=False), "never zeroed", "opt.zero_grad()", "losses: expected")
    rejects(check_train_loop, loop(project=False), "remove_gradient_parallel_to_decoder_directions()")
    rejects(check_train_loop, loop(renorm=False), "norms", "set_decoder_norm_to_unit_norm()")
    rejects(check_train_loop, loop(step=False), "did not change", "opt.step()")
    rejects(check_train_loop, loop(sgd=True), "torch.optim.Adam")
    def graphs(sae, batches, lr):                                            # keeps the loss tensors
        opt, out = torch.optim.Adam(sae.parameters(), lr=lr), []
        for x in batches:
            loss = sae.training_loss(x).loss
            opt.zero_grad(); loss.backward(); opt.step(); sae.set_decoder_norm_to_unit_norm()
            out.append(loss)
        return out
    rejects(check_train_loop, graphs, "hold their graphs", ".item()")
    rejects(check_train_loop, lambda sae, b, lr: solutions.train_loop(sae, b, lr)[1:], "one loss per batch")
    rejects(check_train_loop, lambda sae, b, lr: [v + 1 for v in solutions.train_loop(sae, b, lr)], "losses you return differ")

