"""The training loop on a CUDA GPU with bf16 autocast (the path `train` takes there): every variant trains, the
sparse step gives the dense formulas' loss and gradients, resume continues the run, DDP over two GPUs.

Marked `cuda` and skipped on a machine without a GPU; `bash bench/gpu_check.sh` runs them on one
(or `pytest -m cuda tests/test_cuda.py`). Each check is a function of the device and the autocast mode, and the
training and sparse-vs-dense checks also run here on the CPU under bf16 autocast (not marked: they need no GPU),
with every custom autograd Function's gradients checked to come back in the dtype of its input.

Tolerances. bf16 keeps 8 bits of mantissa (a relative rounding step of 2**-8 = 0.4%), so where the sparse and
dense steps differ only by the order of bf16 products and sums, whole tensors are compared by their norm:
|a - b| <= 2% |b| + 1e-4 (about five bf16 steps; a wrong formula is off by O(1)). The norm, not each element,
because a pre-activation that rounds onto a tie can flip one top-k choice, which moves a few entries and not the
whole tensor. Resume is compared element by element, rtol 1e-3 and atol 1e-4: on CUDA two unbroken runs are
not bitwise equal (float atomics in `index_add_`, cuBLAS's choice of kernel), but they differ by far less,
while a lost or repeated Adam step moves every parameter by about lr = 3e-3.
"""
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sae_nb
import sae_nb.sparse as sparse_mod
import sae_nb.ste as ste_mod
import sae_nb.variants as variants_mod
import sae_nb.train as train_module
from sae_nb.data import ToyFeatures
from sae_nb.sae import SAE, VARIANTS, make_sae
from sae_nb.train import TrainConfig, load_checkpoint, train
from test_train import StopAfter   # the clean Ctrl-C of the CPU resume tests

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

REPO = Path(sae_nb.__file__).resolve().parents[1]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
SMALL = dict(d_in=16, d_sae=32, k=2, batch_size=64, lr=3e-3, progress=False, log_every=5)
BF16_NORM = dict(rtol=2e-2, atol=1e-4)     # sparse vs dense under bf16 autocast, on whole tensors
RESUME = dict(rtol=1e-3, atol=1e-4)        # resumed vs unbroken run, element by element


def toy():
    return ToyFeatures(d_in=16, n_features=32, mean_active=2, seed=0)


def toy_batches(n, batch_size=64):
    t = toy()
    return [t.sample(batch_size)[0] for _ in range(n)]


def bf16_autocast(device: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def assert_norm_close(a, b, rtol, atol, msg=""):
    "|a - b| <= rtol |b| + atol in the 2-norm over the whole tensor (fp32)."
    a, b = a.detach().float(), b.detach().float()
    assert a.shape == b.shape, f"{msg}: shapes {a.shape} and {b.shape}"
    err, ref = torch.linalg.vector_norm(a - b).item(), torch.linalg.vector_norm(b).item()
    assert err <= rtol * ref + atol, f"{msg}: |a - b| = {err:.3g} against |b| = {ref:.3g} (rtol {rtol}, atol {atol})"


# Autograd casts a gradient a Function returns in another dtype than its input's, silently; the precision rule of
# sae_nb.sparse returns each in its input's dtype, which the CPU tests check on every Function.
CUSTOM_FUNCTIONS = (sparse_mod.GatherPreActs, sparse_mod.DecodeActive, sparse_mod.ScatterActive, sparse_mod.GatherColumns,
                    sparse_mod.EncoderPreActs, sparse_mod.ReusePreActs, ste_mod.JumpReLUFn, ste_mod.StepFn,
                    ste_mod.JumpReLUL0Fn, variants_mod.GatedFn)


def record_gradient_dtypes(monkeypatch) -> tuple[list, set]:
    "Wrap the custom Functions: (gradients returned in another dtype than their input's, names of the Functions whose backward ran)."
    wrong, ran = [], set()
    for cls in CUSTOM_FUNCTIONS:
        def forward(ctx, *args, _fwd=cls.forward):
            ctx.input_dtypes = [a.dtype if isinstance(a, torch.Tensor) else None for a in args]
            return _fwd(ctx, *args)
        def backward(ctx, *grads, _bwd=cls.backward, _name=cls.__name__):
            out = _bwd(ctx, *grads)
            ran.add(_name)
            for i, (g, d) in enumerate(zip(out if isinstance(out, tuple) else (out,), ctx.input_dtypes)):
                if g is not None and g.dtype != d:
                    wrong.append(f"{_name}, input {i}: gradient {g.dtype} for a {d} input")
            return out
        monkeypatch.setattr(cls, "forward", staticmethod(forward))
        monkeypatch.setattr(cls, "backward", staticmethod(backward))
    return wrong, ran


# -- every variant trains under bf16 autocast ------------------------------------------------------------------

def check_trains(variant: str, device: str = "cuda", autocast: str = "auto", monkeypatch=None):
    "20 steps on the toy data: the SAE on the device, the forward under bf16 autocast, every logged value finite, loss and FVU falling."
    seen = []
    if monkeypatch is not None:   # record the autocast state the training forward runs under
        forward = train_module.TrainingLoss.forward
        def spy(self, *a, **kw):
            kind = torch.device(device).type
            seen.append((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)))
            return forward(self, *a, **kw)
        monkeypatch.setattr(train_module.TrainingLoss, "forward", spy)
    cfg = TrainConfig(**{**SMALL, "variant": variant}, total_tokens=20 * 64, l1_coefficient=0.1, l0_coefficient=0.01,
                      dead_tokens_threshold=256, device=device, autocast=autocast)
    result = train(cfg, toy())
    h = result.history
    assert [r["step"] for r in h] == [5, 10, 15, 20]
    assert result.sae.W_enc.device.type == torch.device(device).type
    for key in ("loss", "mse", "fvu", "l0", "sparsity", "aux", "grad_norm", "dead_fraction"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in h), key
    assert h[-1]["loss"] < h[0]["loss"], [r["loss"] for r in h]
    assert h[-1]["fvu"] < h[0]["fvu"], [r["fvu"] for r in h]
    if monkeypatch is not None:
        assert len(seen) == 20 and all(seen_i == (True, torch.bfloat16) for seen_i in seen), seen[:3]
    return result


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_on_cuda_with_bf16_autocast(variant, monkeypatch):
    check_trains(variant, "cuda", "auto", monkeypatch)


# The same path on the CPU (TrainConfig(autocast="bfloat16")), no GPU needed: the custom autograd Functions of
# sae_nb.sparse and the fused nodes of sae_nb.sae get bf16 products and gradients next to fp32 parameters there, as
# on CUDA, and hand every gradient back in its input's dtype.
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_training_on_cpu(variant, monkeypatch):
    wrong, ran = record_gradient_dtypes(monkeypatch)
    check_trains(variant, "cpu", "bfloat16", monkeypatch)
    assert ran and not wrong, wrong


# -- the sparse step against the dense formulas, under autocast ------------------------------------------------

LADDER_STEP = 0.05   # pre-activation levels this far apart: more than 3 bf16 rounding steps below |pre| = 6.4


def ladder_pair(name: str, device: str, d: int = 128, n: int = 64, k: int = 4):
    """Two SAEs (sparse step, dense formulas) with W_enc = I, b_enc = b_dec = 0, and rows x that are permutations of
    a ladder of levels LADDER_STEP apart: the pre-activations are x itself, so bf16 rounding cannot reorder them
    and both paths select the same latents (top k, batch top k, AuxK's dead top aux_k, ReLU's positives, JumpReLU's
    window). The TopK family's ladder is centred (k of 128 on top); the others' leaves 4 positive levels a row."""
    kw = dict(l1_coefficient=0.3, l0_coefficient=0.5, bandwidth=0.05, aux_k=2 * k)
    sparse = make_sae(name, d_in=d, d_sae=d, k=k, seed=0, **kw)
    with torch.no_grad():
        sparse.W_enc.copy_(torch.eye(d))
        sparse.b_enc.zero_(); sparse.b_dec.zero_()
        if name == "jumprelu":      # threshold between the levels 0.075 and 0.125; its window (0.06, 0.11) holds 0.075
            sparse.log_threshold.fill_(torch.tensor(0.085).log().item())
    dense = make_sae(name, d_in=d, d_sae=d, k=k, seed=0, sparse_step=False, **kw)
    dense.load_state_dict(sparse.state_dict())
    offset = d / 2 if name in TOPK_FAMILY else d - 4.5
    levels = LADDER_STEP * (torch.arange(d, dtype=torch.float32) - offset)
    g = torch.Generator().manual_seed(0)
    x = torch.stack([levels[torch.randperm(d, generator=g)] for _ in range(n)])
    return sparse.to(device), dense.to(device), x.to(device)


def step(sae, x, dead_mask, autocast):
    "One training_loss under autocast, backward outside it (as `train_step` does); the output and the gradients."
    sae.zero_grad(set_to_none=True)
    with autocast:
        out = sae.training_loss(x, dead_mask=dead_mask)
    out.loss.backward()
    return out, {n: p.grad for n, p in sae.named_parameters()}


def check_sparse_matches_dense(name: str, device: str = "cuda", tol=BF16_NORM):
    "Loss, terms, x_hat, latents, buffers and every gradient of the sparse step against the dense formulas, bf16 autocast."
    sparse, dense, x = ladder_pair(name, device)
    d_sae = sparse.cfg.d_sae
    dead = None
    if name in TOPK_FAMILY:   # a tenth of the latents dead: AuxK too
        dead = (torch.rand(d_sae, generator=torch.Generator().manual_seed(2)) < 0.1).to(device)
    taken = []
    real = variants_mod.pattern_above
    variants_mod.pattern_above = lambda *a: taken.append(real(*a)) or taken[-1]
    try:
        assert sparse._takes_sparse_step(x) and not dense._takes_sparse_step(x)
        out_s, g_s = step(sparse, x, dead, bf16_autocast(device))
        out_d, g_d = step(dense, x, dead, bf16_autocast(device))
    finally:
        variants_mod.pattern_above = real
    if name not in TOPK_FAMILY:
        assert taken and taken[0] is not None, "the sparse step fell back to the dense formulas"
    assert_norm_close(out_s.loss, out_d.loss, **tol, msg="loss")
    assert out_s.terms.keys() == out_d.terms.keys()
    for term in out_d.terms:
        assert_norm_close(out_s.terms[term], out_d.terms[term], **tol, msg=term)
    if dead is not None: assert out_s.terms["aux"] > 0
    assert_norm_close(out_s.x_hat, out_d.x_hat, **tol, msg="x_hat")
    assert_norm_close(out_s.latents, out_d.latents, **tol, msg="latents")
    for pname in g_d:
        if g_d[pname] is None:
            assert g_s[pname] is None, pname
            continue
        assert g_s[pname] is not None, pname
        assert_norm_close(g_s[pname], g_d[pname], **tol, msg=f"grad {pname}")
    buffers = dict(sparse.named_buffers())
    for bname, buf in dense.named_buffers():
        assert_norm_close(buffers[bname], buf, **tol, msg=bname)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_step_matches_dense_on_cuda_under_bf16_autocast(name):
    check_sparse_matches_dense(name, "cuda")


# The same comparison on the CPU under bf16 autocast, with AuxK's two paths (the dead block, the sparse pattern)
# forced in turn for the TopK family (as tests/test_sparse.py does in fp32).
CPU_CASES = [(name, "block") for name in VARIANTS] + [(name, "pattern") for name in TOPK_FAMILY]


@pytest.mark.parametrize("name,aux_path", CPU_CASES)
def test_sparse_step_matches_dense_on_cpu_under_bf16_autocast(name, aux_path, monkeypatch):
    monkeypatch.setattr(sparse_mod, "AUXK_BLOCK_DENSITY", 0.0 if aux_path == "block" else 2.0)
    wrong, ran = record_gradient_dtypes(monkeypatch)
    check_sparse_matches_dense(name, "cpu")
    assert not wrong, wrong
    if name in TOPK_FAMILY:
        assert ("GatherColumns" in ran) == (aux_path == "block"), ran


@pytest.mark.parametrize("name", list(VARIANTS))
def test_latents_carry_gradient_on_cpu_under_bf16_autocast(name, monkeypatch):
    "A penalty on the latents `training_loss` returns trains the encoder through the sparse step's scatter, as densely."
    wrong, ran = record_gradient_dtypes(monkeypatch)
    sparse, dense, x = ladder_pair(name, "cpu")
    grads = []
    for sae in (sparse, dense):
        with bf16_autocast("cpu"):
            out = sae.training_loss(x)
        (out.loss + out.latents.float().pow(2).mean()).backward()
        grads.append({n: p.grad for n, p in sae.named_parameters()})
    assert "ScatterActive" in ran and not wrong, (ran, wrong)
    for pname, g in grads[1].items():
        assert_norm_close(grads[0][pname], g, **BF16_NORM, msg=f"grad {pname}")


# -- resume on the GPU -----------------------------------------------------------------------------------------


def max_abs_diff(a: SAE, b: SAE) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[n].float() - sb[n].float()).abs().max().item() for n in sa)


def check_resume(variant: str, directory: Path, device: str = "cuda", autocast: str = "auto", tol=RESUME):
    "Interrupt at step 17 (checkpoint at 14), resume: the SAE and the history equal an unbroken run's within `tol`."
    batches = toy_batches(30)
    cfg = TrainConfig(**{**SMALL, "variant": variant}, total_tokens=30 * 64, checkpoint_dir=str(directory),
                      checkpoint_every=7, dead_tokens_threshold=256, lr_warmup_steps=3, l1_coefficient=0.1,
                      l0_coefficient=0.01, device=device, autocast=autocast)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, StopAfter(batches, 17))
    assert load_checkpoint(directory)["step"] == 14
    resumed = train(cfg, batches)
    unbroken = dataclasses.replace(cfg, checkpoint_dir=None)
    straight, again = train(unbroken, batches), train(unbroken, batches)
    noise = max_abs_diff(straight.sae, again.sae)   # two unbroken runs on this device: the floor, for the message
    sr, ss = resumed.sae.state_dict(), straight.sae.state_dict()
    assert sr.keys() == ss.keys()
    for name in ss:
        assert sr[name].device.type == torch.device(device).type
        torch.testing.assert_close(sr[name], ss[name], **tol,
                                   msg=lambda m, name=name: f"{variant} {name} (two unbroken runs differ by up to {noise:.3g}): {m}")
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    for r, s in zip(resumed.history, straight.history):
        assert r.keys() == s.keys()
        for key in ("loss", "fvu", "l0", "lr"):
            torch.testing.assert_close(torch.tensor(float(r[key])), torch.tensor(float(s[key])), **tol, msg=key)
    state = load_checkpoint(directory)
    assert state["done"] and state["step"] == 30


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_on_cuda_matches_an_unbroken_run(variant, tmp_path):
    check_resume(variant, tmp_path, "cuda", "auto")


# -- DDP over two GPUs -----------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from sae_nb.data import ToyFeatures
    from sae_nb.train import TrainConfig, train
    for variant in ("topk", "relu"):
        cfg = TrainConfig(variant=variant, d_in=16, d_sae=32, k=2, l1_coefficient=0.3, total_tokens=30 * 64,
                          batch_size=64, lr=3e-3, dead_tokens_threshold=10**9, progress=False, log_every=5,
                          device="cuda")
        result = train(cfg, ToyFeatures(d_in=16, n_features=32, mean_active=2, seed=0))
        if int(os.environ["RANK"]) == 0:
            result.sae.save(os.path.join(sys.argv[1], variant))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
""")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP on CUDA needs at least 2 GPUs")
def test_ddp_two_gpus_match_one(tmp_path):
    "torchrun with 2 NCCL processes, one GPU each, trains the SAE of 1 process with the same global batch (bf16 tolerance)."
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for variant in ("topk", "relu"):
        cfg = TrainConfig(variant=variant, d_in=16, d_sae=32, k=2, l1_coefficient=0.3, total_tokens=30 * 64,
                          batch_size=64, lr=3e-3, dead_tokens_threshold=10**9, progress=False, log_every=5,
                          device="cuda")
        single = train(cfg, toy()).sae.state_dict()
        both = SAE.load(tmp_path / variant).state_dict()
        for name in single:
            assert_norm_close(both[name].to(single[name].device), single[name], **BF16_NORM, msg=f"{variant} {name}")
