"Behaviour of sae_nb.interop: SAELens directories written and read, exact round trips, and SAELens itself reading ours."
import json
import subprocess
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sae_nb.interop import (SAELENS_CFG, SAELENS_WEIGHTS, from_saelens, is_saelens_dir, load_saelens, save_saelens,
                            to_saelens)
from sae_nb.sae import SAE, VARIANTS, make_sae

D_IN, D_SAE, K = 16, 64, 4
ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / "bench" / ".peers" / "venv" / "bin" / "python"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: one thread is fastest


def rows(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(n, 32, generator=g) - 1) @ torch.randn(32, D_IN, generator=g) / 4


def trained_like(variant, seed=0, **kw):
    "An SAE whose parameters are all moved off their init, with its BatchTopK threshold set, in eval mode."
    sae = make_sae(variant, d_in=D_IN, d_sae=D_SAE, k=K, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    sae.training_loss(rows())
    return sae.eval()


def write_saelens_dir(path, config, state):
    "Write a directory the way SAELens's save_model does: json.dump of the config, safetensors of the state."
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / SAELENS_WEIGHTS))
    (path / SAELENS_CFG).write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_every_variant_exact(variant, tmp_path):
    sae, x = trained_like(variant), rows()
    save_saelens(sae, tmp_path)
    assert is_saelens_dir(tmp_path)
    back = load_saelens(tmp_path).eval()
    assert asdict(back.cfg) == asdict(sae.cfg)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x).x_hat, sae(x).x_hat)
    arch = json.loads((tmp_path / SAELENS_CFG).read_text())["architecture"]
    assert arch == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                    "batchtopk": "jumprelu", "matryoshka": "jumprelu"}[variant]


def test_sae_save_format_and_load_detection(tmp_path):
    sae, x = trained_like("jumprelu"), rows()
    sae.save(tmp_path / "a", format="saelens")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [SAELENS_CFG, SAELENS_WEIGHTS]
    assert torch.equal(SAE.load(tmp_path / "a")(x).x_hat, sae(x).x_hat)
    sae.save(tmp_path / "b")                                                 # the default stays our own format
    assert (tmp_path / "b" / "config.json").is_file() and not is_saelens_dir(tmp_path / "b")
    with pytest.raises(ValueError, match="format"):
        sae.save(tmp_path / "c", format="pickle")
    assert not (tmp_path / "c").exists()                                     # checked before anything is written


def test_unset_batchtopk_threshold_is_saved_as_topk(tmp_path):
    sae, x = make_sae("batchtopk", d_in=D_IN, d_sae=D_SAE, k=K, seed=0).eval(), rows()
    config, state = to_saelens(sae)
    assert config["architecture"] == "topk" and config["k"] == K and "threshold" not in state
    save_saelens(sae, tmp_path)
    back = load_saelens(tmp_path).eval()
    assert back.cfg.variant == "batchtopk" and back.threshold.item() == -1
    assert torch.equal(back(x).x_hat, sae(x).x_hat)


def test_act_scale_folded_and_unfolded(tmp_path):
    s = 0.37
    sae, x = trained_like("topk", act_scale=s), rows()
    config, state = to_saelens(sae)
    assert config["normalize_activations"] == "none" and config["metadata"]["sae_nb"]["act_scale_folded"]
    foreign = from_saelens({**config, "metadata": {}}, state).eval()       # read as SAELens would: the scale folded in
    assert foreign.cfg.act_scale == 1.0
    assert torch.allclose(foreign.encode(x), sae.encode(x), atol=1e-5)     # both read and write the model's units
    assert torch.allclose(foreign(x).x_hat, sae(x).x_hat, atol=1e-5)
    save_saelens(sae, tmp_path)
    back = load_saelens(tmp_path).eval()
    assert back.cfg.act_scale == s and torch.allclose(back(x).x_hat, sae(x).x_hat, atol=1e-6)
    config, state = to_saelens(sae, fold_act_scale=False)
    assert config["normalize_activations"] == "expected_average_only_in" and torch.equal(state["W_enc"], sae.W_enc)


def saelens_encode(arch, state, x, k=K, apply_b_dec=True):
    "SAELens's inference encoder for `arch`, written out from its formulas."
    sae_in = x - state["b_dec"] * apply_b_dec
    if arch == "gated":
        gate = (sae_in @ state["W_enc"] + state["b_gate"] > 0).to(x.dtype)
        return gate * F.relu(sae_in @ (state["W_enc"] * state["r_mag"].exp()) + state["b_mag"])
    z = sae_in @ state["W_enc"] + state["b_enc"]
    if arch == "topk":
        vals, idx = z.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(z).scatter(-1, idx, vals.relu())
    if arch == "jumprelu":
        return F.relu(z) * (z > state["threshold"]).to(x.dtype)
    return F.relu(z)


def foreign_state(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s
    state = {"W_enc": r(D_IN, D_SAE, s=0.5), "W_dec": r(D_SAE, D_IN, s=0.3), "b_dec": r(D_IN)}
    if arch == "gated":
        state.update(b_gate=r(D_SAE), b_mag=r(D_SAE), r_mag=r(D_SAE))
    else:
        state["b_enc"] = r(D_SAE)
    if arch == "jumprelu":
        state["threshold"] = torch.rand(D_SAE, generator=g) * 0.2
    return state


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_hand_written_saelens_dir_loads(arch, tmp_path):
    "A directory laid out as SAELens writes it (no sae_nb metadata) gives SAELens's outputs."
    state, x = foreign_state(arch), rows()
    config = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                           "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}
    if arch == "topk":
        config.update(k=K, rescale_acts_by_decoder_norm=False)
    sae = SAE.load(write_saelens_dir(tmp_path, config, state))
    assert sae.cfg.variant == {"standard": "relu", "gated": "gated", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.model_name == "gpt2"
    f = saelens_encode(arch, state, x)
    x_hat = f @ state["W_dec"] + state["b_dec"]
    if arch == "gated":                      # the magnitude path multiplies in another order: equal up to rounding
        assert torch.allclose(sae.encode(x), f, atol=1e-6) and torch.allclose(sae(x).x_hat, x_hat, atol=1e-6)
    else:
        assert torch.equal(sae.encode(x), f) and torch.equal(sae(x).x_hat, x_hat)
    if arch in ("topk", "jumprelu"):         # decoder rows are not unit norm: training must not renormalise them
        assert sae.unit_norm_decoder is False


@pytest.mark.parametrize("arch", ["standard", "gated", "topk"])
def test_saelens_options_are_folded(arch, tmp_path):
    "apply_b_dec_to_input=False and topk's rescale_acts_by_decoder_norm=True are folded into the weights."
    state, x = foreign_state(arch, seed=1), rows()
    config = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": False,
              "k": K, "rescale_acts_by_decoder_norm": arch == "topk", "metadata": {"sae_lens_version": "6.54.12"}}
    sae = from_saelens(config, state)
    if arch == "topk":
        n = state["W_dec"].norm(dim=1)
        z = x @ state["W_enc"] + state["b_enc"]
        vals, idx = (z * n).topk(K, dim=-1)
        x_hat = (torch.zeros_like(z).scatter(-1, idx, vals.relu()) / n) @ state["W_dec"] + state["b_dec"]
    else:
        x_hat = saelens_encode(arch, state, x, apply_b_dec=False) @ state["W_dec"] + state["b_dec"]
    assert torch.allclose(sae(x).x_hat, x_hat, atol=1e-5)


def test_bad_saelens_input_is_refused(tmp_path):
    state = foreign_state("standard")
    config = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "metadata": {}}
    with pytest.raises(ValueError, match="architecture"):
        from_saelens({**config, "architecture": "transcoder"}, state)
    with pytest.raises(ValueError, match="normalize_activations"):
        from_saelens({**config, "normalize_activations": "layer_norm"}, state)
    with pytest.raises(ValueError, match="missing"):
        from_saelens(config, {k: v for k, v in state.items() if k != "b_enc"})
    with pytest.raises(ValueError, match="W_enc"):
        from_saelens({**config, "d_in": D_IN + 1}, state)
    with pytest.raises(FileNotFoundError, match=SAELENS_WEIGHTS):
        (tmp_path / SAELENS_CFG).write_text(json.dumps(config))
        load_saelens(tmp_path)
    with pytest.raises(TypeError, match="sae"):
        to_saelens("not an sae")
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        from_saelens({**config, "normalize_activations": "expected_average_only_in"}, state)


PEER_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save_file
    import sae_lens
    from sae_lens import (SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                          StandardSAEConfig, TopKSAE, TopKSAEConfig)
    root = Path(sys.argv[1])
    x = load_file(str(root / "x.safetensors"))["x"]
    with torch.no_grad():
        for d in sorted((root / "ours").iterdir()):          # our files, read by SAELens
            sae = SAE.load_from_disk(str(d))
            f = sae.encode(x)
            save_file({"latents": f.contiguous(), "x_hat": sae.decode(f).contiguous()}, str(d / "out.safetensors"))
            (d / "arch.txt").write_text(sae.cfg.architecture())
        torch.manual_seed(0)
        made = {"standard": (StandardSAE, StandardSAEConfig, {}), "topk": (TopKSAE, TopKSAEConfig, {"k": 4}),
                "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}), "gated": (GatedSAE, GatedSAEConfig, {})}
        for arch, (cls, cfg_cls, kw) in made.items():          # SAELens's files, read by us
            sae = cls(cfg_cls(d_in=x.shape[-1], d_sae=64, **kw))
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if arch == "jumprelu":
                sae.threshold.copy_(sae.threshold.abs() + 0.02)
            out = root / "theirs" / arch
            sae.save_model(str(out))
            f = sae.encode(x)
            save_file({"latents": f.contiguous(), "x_hat": sae.decode(f).contiguous()}, str(out.parent / (arch + ".out.safetensors")))
    print("sae_lens", sae_lens.__version__)
''')


@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason="needs SAELens in bench/.peers/venv (bash bench/setup_peers.sh)")
def test_saelens_itself_reads_ours_and_we_read_theirs(tmp_path):
    "Runs SAELens in its own venv (it needs transformer-lens < 4): its import alone takes ~15 s, hence > 20 s."
    x = rows(48, seed=3)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    ours = {v: trained_like(v, seed=2) for v in VARIANTS}
    ours["topk_scaled"] = trained_like("topk", seed=2, act_scale=0.5)
    for name, sae in ours.items():
        save_saelens(sae, tmp_path / "ours" / name)
    run = subprocess.run([str(PEERS_PYTHON), "-c", PEER_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name, sae in ours.items():
        out = load_file(str(tmp_path / "ours" / name / "out.safetensors"))
        f, x_hat = sae.encode(x), sae(x).x_hat                  # both read the model's units (the scale folded in)
        exact = name in ("relu", "topk", "jumprelu", "batchtopk", "matryoshka")
        assert torch.equal(out["latents"], f) if exact else torch.allclose(out["latents"], f, atol=1e-5), name
        assert torch.equal(out["x_hat"], x_hat) if exact else torch.allclose(out["x_hat"], x_hat, atol=1e-5), name
    for arch in ("standard", "topk", "jumprelu", "gated"):
        out = load_file(str(tmp_path / "theirs" / f"{arch}.out.safetensors"))
        sae = SAE.load(tmp_path / "theirs" / arch).eval()
        assert sae.cfg.variant == {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}[arch]
        exact = arch != "gated"
        got_f, got_x_hat = sae.encode(x), sae(x).x_hat
        assert torch.equal(got_f, out["latents"]) if exact else torch.allclose(got_f, out["latents"], atol=1e-5), arch
        assert torch.equal(got_x_hat, out["x_hat"]) if exact else torch.allclose(got_x_hat, out["x_hat"], atol=1e-5), arch
