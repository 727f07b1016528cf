"Tests of sae_nb.lm: the embedded default model, tokens, hooks, splice and the offline HuggingFace path."
import os
import time
from types import SimpleNamespace

import pytest
import torch

from sae_nb.lm import (check_hook_name, decode_tokens, default_tokens, encode_text, hook_names, lm_loss,
                       load_model, run_with_activation, save_tiny_hf_model, splice, zero_ablate)

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def tokens():
    return default_tokens(4, ctx=64, seed=0, split="val")


class FixedSAE(torch.nn.Module):
    "A stand-in SAE whose reconstruction is `fn(x)`."
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return SimpleNamespace(x_hat=self.fn(x), latents=None)


def test_load_default_fast_offline_eval_frozen(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_model("default", device="cpu")  # warm the imports
    t0 = time.perf_counter()
    m = load_model("default", device="cpu")
    assert time.perf_counter() - t0 < 1.0
    assert not m.training
    assert not any(p.requires_grad for p in m.parameters())
    assert (m.cfg.d_model, m.cfg.d_vocab, m.cfg.n_layers, m.cfg.n_ctx) == (128, 256, 2, 128)


def test_default_model_deterministic_and_better_than_unigram(model, tokens):
    with torch.no_grad():
        a, b = model(tokens), load_model("default", device="cpu")(tokens)
        assert torch.equal(a, b)
        assert lm_loss(model, tokens).item() < 2.5  # unigram baseline is about 3.3+ nats/byte


def test_tokens_roundtrip_and_default_tokens():
    text = "for i in range(3):\n    print('é')"
    assert decode_tokens(encode_text(text)) == text
    t = default_tokens(5, ctx=32, seed=3, split="train")
    assert t.shape == (5, 32) and t.dtype == torch.long and 0 <= t.min() and t.max() < 256
    assert torch.equal(t, default_tokens(5, ctx=32, seed=3, split="train"))
    assert not torch.equal(t, default_tokens(5, ctx=32, seed=4, split="train"))
    assert not torch.equal(t, default_tokens(5, ctx=32, seed=3, split="val"))
    with pytest.raises(ValueError, match="split"):
        default_tokens(2, split="test")
    with pytest.raises(ValueError, match="n_seq"):
        default_tokens(0)


def test_splice_identity_is_clean_and_zero_is_zero_ablation(model, tokens):
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, FixedSAE(lambda x: x), HOOK):
            ident = model(tokens)
        with splice(model, FixedSAE(torch.zeros_like), HOOK):
            zeros = model(tokens)
        with zero_ablate(model, HOOK):
            ablated = model(tokens)
    torch.testing.assert_close(ident, clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zeros, ablated, atol=0, rtol=0)
    assert not torch.allclose(ablated, clean)


def test_splice_passes_model_units_and_the_sae_scales_inside(model, tokens):
    "The SAE sees the activation in the model's units; an SAE with act_scale s computes on s x and returns x_hat / s."
    from sae_nb.sae import make_sae
    seen = []
    def record(x):
        seen.append(x)
        return x
    with torch.no_grad():
        _, acts = run_with_activation(model, tokens, HOOK)
        with splice(model, FixedSAE(record), HOOK):
            model(tokens)
        torch.testing.assert_close(seen[0], acts)
        a, b = (make_sae("topk", d_in=128, d_sae=256, k=8, seed=0, act_scale=s) for s in (1.0, 4.0))
        torch.testing.assert_close(b(acts).x_hat, a(4.0 * acts).x_hat / 4.0)
        with splice(model, b, HOOK): spliced = model(tokens)
        with splice(model, FixedSAE(lambda x: a(4.0 * x).x_hat / 4.0), HOOK): expected = model(tokens)
    torch.testing.assert_close(spliced, expected)


def test_splice_with_real_sae_changes_logits_and_undoes(model, tokens):
    from sae_nb.sae import make_sae
    sae = make_sae("topk", d_in=128, d_sae=256, k=8, seed=0)
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, sae, HOOK):
            spliced = model(tokens)
        after = model(tokens)
    assert not torch.allclose(spliced, clean)
    assert torch.equal(after, clean)


def test_splice_undone_after_exception(model, tokens):
    with torch.no_grad():
        clean = model(tokens)
        with pytest.raises(RuntimeError, match="boom"):
            with splice(model, FixedSAE(torch.zeros_like), HOOK):
                raise RuntimeError("boom")
        assert torch.equal(model(tokens), clean)


def test_unknown_hook_lists_near_names(model):
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post") as e:
        with splice(model, FixedSAE(torch.zeros_like), "blocks.0.hook_resid_pots"):
            pass
    assert "nearest valid names" in str(e.value)
    with pytest.raises(ValueError, match="hook_name"):
        check_hook_name(model, "nope")
    with pytest.raises(TypeError, match="sae"):
        with splice(model, "not an sae", HOOK):
            pass


def test_hook_names_and_run_with_activation(model, tokens):
    names = hook_names(model)
    for l in (0, 1):
        for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out"):
            assert f"blocks.{l}.{h}" in names
    with torch.no_grad():
        logits, acts = run_with_activation(model, tokens, "blocks.1.mlp.hook_post")
        assert acts.shape == (4, 64, 512) and logits.shape == (4, 64, 256)
        torch.testing.assert_close(logits, model(tokens))


def test_hf_path_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = save_tiny_hf_model(tmp_path / "tiny_gpt2")
    m = load_model(str(path), device="cpu")
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    toks = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, acts = run_with_activation(m, toks, "blocks.1.hook_resid_post")
        assert logits.shape == (2, 10, 256) and acts.shape == (2, 10, 32)
        with splice(m, FixedSAE(lambda x: x), "blocks.1.hook_resid_post"):
            torch.testing.assert_close(m(toks), logits, atol=1e-5, rtol=1e-5)
        with zero_ablate(m, "blocks.1.hook_resid_post"):
            assert not torch.allclose(m(toks), logits)
