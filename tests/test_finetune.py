"Tests of sae_nb.finetune: KL fine-tuning lowers the spliced KL, leaves the model untouched, restores modes, refuses bad arguments."
import copy

import pytest
import torch

from sae_nb.finetune import FinetuneResult, e2e_train, kl_finetune, kl_loss
from sae_nb.lm import build_default_model, default_tokens, splice
from sae_nb.losses import kl_div
from sae_nb.sae import VARIANTS, make_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    "The default architecture with random weights (parameters left trainable, as build_default_model gives them)."
    return build_default_model(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return default_tokens(32, ctx=32, seed=0)


def _act_scale(model, tokens):
    from sae_nb.data import act_scale_from_mean_sq_norm, hook_activations
    x = hook_activations(model, tokens, HOOK)
    return x, act_scale_from_mean_sq_norm(x.pow(2).sum(1).mean().item(), x.shape[1])


@pytest.fixture(scope="module")
def mse_sae(model, tokens):
    "A TopK SAE trained for 60 Adam steps on MSE on the hook's activations (computing in its training units)."
    torch.manual_seed(0)
    x, scale = _act_scale(model, tokens)          # x in the model's units: the SAE scales it inside
    sae = make_sae("topk", d_in=x.shape[1], d_sae=256, k=8, seed=0, act_scale=scale, hook_name=HOOK)
    sae.init_b_dec(x)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for i in range(60):
        xb = x[torch.randint(0, len(x), (256,))]
        opt.zero_grad(); sae.training_loss(xb).loss.backward(); opt.step(); sae.set_decoder_norm_to_unit_norm()
    sae.zero_grad(set_to_none=True)
    return sae


def spliced_kl(sae, model, tokens):
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, sae, HOOK): patched = model(tokens)
    return kl_div(clean, patched).item()


def test_kl_finetune_reduces_spliced_kl(model, tokens, mse_sae):
    before = spliced_kl(mse_sae, model, tokens)
    res = kl_finetune(mse_sae, model, HOOK, tokens, steps=30, lr=2e-3, batch_seqs=8, log_every=5)
    assert isinstance(res, FinetuneResult)
    after = spliced_kl(res.sae, model, tokens)
    assert after < 0.8 * before, (before, after)
    assert [h["step"] for h in res.history] == [5, 10, 15, 20, 25, 30]
    assert {"kl", "fvu", "mse", "l0", "loss", "anchor", "lr"} <= set(res.history[0])
    assert all(h["l0"] == 8 for h in res.history)            # TopK keeps L0 = k
    assert res.history[-1]["lr"] < res.history[0]["lr"]      # the lr decays at the end


def test_model_untouched_and_without_grad(model, tokens, mse_sae):
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    kl_finetune(mse_sae, model, HOOK, tokens, steps=3, lr=1e-3, batch_seqs=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags          # restored (trainable here)
    assert model.training                                                   # its mode too
    model.eval()


def test_frozen_model_stays_frozen(model, tokens, mse_sae):
    for p in model.parameters(): p.requires_grad_(False)
    try:
        kl_finetune(mse_sae, model, HOOK, tokens, steps=2, batch_seqs=4)
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.grad is None for p in model.parameters())
    finally:
        for p in model.parameters(): p.requires_grad_(True)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sae_mode_restored_copy_and_inplace(model, tokens, mse_sae, mode):
    sae = copy.deepcopy(mse_sae).train(mode == "train")
    w = sae.W_enc.detach().clone()
    res = kl_finetune(sae, model, HOOK, tokens, steps=2, lr=1e-3, batch_seqs=4)
    assert res.sae is not sae and torch.equal(sae.W_enc, w)                 # default: a trained copy
    assert res.sae.training == sae.training == (mode == "train")
    res2 = kl_finetune(sae, model, HOOK, tokens, steps=2, lr=1e-3, batch_seqs=4, inplace=True)
    assert res2.sae is sae and not torch.equal(sae.W_enc, w)
    assert sae.training == (mode == "train")
    assert all(p.grad is None for p in sae.parameters())


def test_kl_loss_matches_splice_and_formula(model, tokens, mse_sae):
    toks = tokens[:4]
    out = kl_loss(mse_sae, model, HOOK, toks, mse_coefficient=1.0)
    assert out.terms["kl"].item() == pytest.approx(spliced_kl(mse_sae, model, toks), rel=1e-5)
    # TopK with lambda = 1 and no AuxK: the anchor is the FVU
    assert out.terms["anchor"].item() == pytest.approx(out.terms["fvu"].item(), rel=1e-4)
    out2 = kl_loss(mse_sae, model, HOOK, toks, mse_coefficient=2.5)
    assert out2.terms["anchor"].item() == pytest.approx(2.5 * out.terms["fvu"].item(), rel=1e-4)
    assert kl_loss(mse_sae, model, HOOK, toks, mse_coefficient=0.0).terms["anchor"].item() == 0.0
    assert out.loss.item() == pytest.approx((out.terms["kl"] + out.terms["anchor"]).item(), rel=1e-6)


def test_kl_coefficient_weights_the_kl(model, tokens, mse_sae):
    "loss = kl_coefficient * KL + anchor; at 0 the gradient is the SAE objective's alone (the KL is still measured)."
    from sae_nb.data import hook_activations
    toks = tokens[:4]
    for p in model.parameters(): p.requires_grad_(False)
    try:
        out1 = kl_loss(mse_sae, model, HOOK, toks)
        out2 = kl_loss(mse_sae, model, HOOK, toks, kl_coefficient=2.0)
        assert out2.loss.item() == pytest.approx((2 * out1.terms["kl"] + out1.terms["anchor"]).item(), rel=1e-5)
        sae = copy.deepcopy(mse_sae)
        out0 = kl_loss(sae, model, HOOK, toks, kl_coefficient=0.0)
        assert out0.loss.item() == pytest.approx(out0.terms["anchor"].item(), rel=1e-6) and out0.terms["kl"] > 0
        out0.loss.backward()
        ref = copy.deepcopy(mse_sae)                    # the same objective computed without the model downstream
        x = hook_activations(model, toks, HOOK)
        xs = ref.normalise(x)
        (ref.training_loss(x).loss / (xs - xs.mean(0)).pow(2).sum(-1).mean()).backward()
    finally:
        for p in model.parameters(): p.requires_grad_(True)
    for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
        if q.grad is not None: assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    res = kl_finetune(mse_sae, model, HOOK, tokens, steps=4, lr=1e-3, batch_seqs=4, log_every=2, kl_coefficient=0.0)
    assert all(h["loss"] == pytest.approx(h["anchor"], rel=1e-6) and h["kl"] > 0 for h in res.history)
    assert not torch.equal(res.sae.W_enc, mse_sae.W_enc)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_gets_a_gradient(model, tokens, variant):
    kw = {"k": 8} if VARIANTS[variant].uses_k else {}
    sae = make_sae(variant, d_in=model.cfg.d_model, d_sae=64, seed=0, act_scale=0.5, **kw)
    for p in model.parameters(): p.requires_grad_(False)     # kl_loss expects a frozen model (kl_finetune freezes it)
    try:
        out = kl_loss(sae, model, HOOK, tokens[:2], mse_coefficient=0.5)
        out.loss.backward()
    finally:
        for p in model.parameters(): p.requires_grad_(True)
    assert torch.isfinite(out.loss) and sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    sigma2 = out.terms["sigma2"]
    if variant != "matryoshka":   # anchor = (0.5 mse + sparsity + aux) / sigma^2
        expect = (0.5 * out.terms["mse"] + out.terms["sparsity"] + out.terms["aux"]) / sigma2
        assert out.terms["anchor"].item() == pytest.approx(expect.item(), rel=1e-4)


def test_e2e_train_lowers_kl(model, tokens):
    res = e2e_train(model, HOOK, tokens, d_sae=128, k=8, steps=20, lr=3e-3, batch_seqs=8, log_every=5,
                    mse_coefficient=0.1, dead_tokens_threshold=2048)
    assert res.history[-1]["kl"] < res.history[0]["kl"]
    assert res.sae.cfg.hook_name == HOOK and res.sae.cfg.k == 8 and res.sae.cfg.act_scale > 0
    assert "dead_fraction" in res.history[-1]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"mse_coefficient": -1.0}, "mse_coefficient"), ({"kl_coefficient": -1.0}, "kl_coefficient"),
    ({"kl_coefficient": float("inf")}, "kl_coefficient"), ({"batch_seqs": 0}, "batch_seqs"), ({"batch_seqs": 33}, "batch_seqs"),
    ({"lr_decay": 1.5}, "lr_decay"), ({"grad_clip": 0}, "grad_clip"), ({"log_every": 0}, "log_every"),
    ({"dead_tokens_threshold": 0}, "dead_tokens_threshold"), ({"inplace": 1}, "inplace"),
])
def test_bad_args(model, tokens, mse_sae, kw, match):
    w = mse_sae.W_enc.detach().clone()
    with pytest.raises((ValueError, TypeError), match=match):
        kl_finetune(mse_sae, model, HOOK, tokens, **kw)
    assert torch.equal(mse_sae.W_enc, w)


def test_bad_inputs(model, tokens, mse_sae):
    with pytest.raises(ValueError, match="tokens"): kl_finetune(mse_sae, model, HOOK, tokens.float())
    with pytest.raises(ValueError, match="tokens"): kl_finetune(mse_sae, model, HOOK, tokens[0])
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"): kl_finetune(mse_sae, model, "blocks.0.hook_resid_pots", tokens)
    with pytest.raises(TypeError, match="sae"): kl_finetune("sae", model, HOOK, tokens)
    with pytest.raises(TypeError, match="model"): kl_finetune(mse_sae, "model", HOOK, tokens)
    with pytest.raises(ValueError, match="hook_name"):
        kl_finetune(make_sae("topk", d_in=128, d_sae=64, k=4), model, None, tokens)
    with pytest.raises(ValueError, match="variant"): e2e_train(model, HOOK, tokens, variant="nope")
