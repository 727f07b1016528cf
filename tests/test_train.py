"Tests of sae_nb.train: config checks, every variant, history, checkpoints, resume after SIGKILL, DDP."
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sae_nb
import sae_nb.train as train_module
from sae_nb.data import ToyFeatures
from sae_nb.losses import CROSS_SAMPLE_PENALTIES
from sae_nb.sae import SAE, VARIANTS
from sae_nb.train import CHECKPOINT_FILE, STEER_HOLD_LR, TrainConfig, load_checkpoint, train

torch.set_num_threads(1)  # tiny shapes; also keeps in-process and subprocess runs on the same kernels
REPO = Path(sae_nb.__file__).resolve().parents[1]
SMALL = dict(d_in=16, d_sae=32, k=2, batch_size=64, lr=3e-3, progress=False, log_every=5)


def toy():
    return ToyFeatures(d_in=16, n_features=32, mean_active=2, seed=0)


def toy_batches(n, batch_size=64):
    t = toy()
    return [t.sample(batch_size)[0] for _ in range(n)]


def assert_same_sae(a: SAE, b: SAE):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


# -- configuration and inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, error", [
    ("variant", "sparse", ValueError), ("d_sae", 0, ValueError), ("k", -1, ValueError), ("l1_coefficient", -1.0, ValueError),
    ("total_tokens", 10, ValueError), ("batch_size", 0, ValueError), ("lr", 0.0, ValueError), ("lr", float("nan"), ValueError),
    ("lr_decay", 1.5, ValueError), ("adam_betas", (0.9, 1.0), ValueError), ("grad_clip", 0.0, ValueError),
    ("b_dec_init", "median", ValueError), ("dead_tokens_threshold", 0, ValueError), ("cross_sample_penalty", "l2", ValueError),
    ("cross_sample_coefficient", -1.0, ValueError), ("device", "gpu7", ValueError), ("autocast", "float16", ValueError),
    ("checkpoint_every", 0, ValueError), ("log_every", 0, ValueError), ("sparsity_warmup_steps", -1, ValueError),
    ("seed", -1, ValueError), ("bandwidth", 0.0, ValueError), ("aux_k", 0, ValueError),
    # a wrong type is a TypeError, whether TrainConfig checks the field or SAEConfig does
    ("progress", "yes", TypeError), ("hook_name", 3, TypeError), ("lr", "0.1", TypeError), ("k", 2.0, TypeError),
    ("d_sae", 32.0, TypeError), ("seed", 1.5, TypeError), ("l1_coefficient", "1", TypeError), ("batch_size", 64.0, TypeError),
    ("adam_betas", 0.9, TypeError), ("grad_clip", True, TypeError), ("checkpoint_dir", 3, TypeError), ("aux_k", True, TypeError),
])
def test_config_validation_names_the_field(field, value, error, tmp_path):
    cfg = dataclasses.replace(TrainConfig(**SMALL, checkpoint_dir=str(tmp_path / "ckpt")), **{field: value})
    with pytest.raises(error, match=rf"^TrainConfig\.{field}: expected"):
        train(cfg, toy())
    assert not (tmp_path / "ckpt").exists()  # nothing written before the check


@pytest.mark.parametrize("fields, error, match", [
    ({"threshold_init": 0.0}, ValueError, r"^TrainConfig\.threshold_init: expected a finite number > 0"),
    ({"threshold_momentum": "0.5"}, TypeError, r"^TrainConfig\.threshold_momentum: expected"),
    ({"dtype": "int8"}, ValueError, r"^TrainConfig\.dtype: expected"),
    ({"dtype": 8}, TypeError, r"^TrainConfig\.dtype: expected"),
    ({"variant": "matryoshka", "matryoshka_prefixes": 8}, TypeError, r"^TrainConfig\.matryoshka_prefixes: expected a tuple"),
    ({"variant": "matryoshka", "matryoshka_prefixes": (8, 16)}, ValueError, r"^TrainConfig\.matryoshka_prefixes: expected strictly increasing"),
])
def test_sae_fields_are_checked_by_saeconfig(fields, error, match):
    "Every SAEConfig field is a TrainConfig field, checked by SAEConfig and named as the TrainConfig field."
    with pytest.raises(error, match=match):
        train(TrainConfig(**{**SMALL, **fields}, total_tokens=640), toy())


def test_trainconfig_is_built_on_saeconfig():
    "TrainConfig's SAE fields are SAEConfig's (declared once, there), in its order, with TrainConfig's defaults."
    from sae_nb.sae import SAEConfig
    from sae_nb.train import SAE_FIELDS, TRAIN_SAE_DEFAULTS
    sae_names = [f.name for f in dataclasses.fields(SAEConfig)]
    assert [f.name for f in dataclasses.fields(TrainConfig)][:len(sae_names)] == sae_names == list(SAE_FIELDS)
    cfg = TrainConfig()
    assert all(getattr(cfg, n) == TRAIN_SAE_DEFAULTS.get(n) for n in sae_names)   # None: SAEConfig's default
    with pytest.raises(TypeError): TrainConfig(sae_kwargs={})                      # one way to set an SAE field


def test_sae_config_is_the_one_place_the_sae_config_is_built():
    "The SAE `train` returns has the config `sae_config` builds (with the run's act_scale and a steered coefficient's end value)."
    from sae_nb.sae import SAEConfig
    cfg = TrainConfig(**{**SMALL, "variant": "relu"}, total_tokens=640, l1_coefficient=0.5, bandwidth=0.1,
                      hook_name="blocks.0.hook_resid_post", model_name="toy", threshold_momentum=0.5)
    sae_cfg = cfg.sae_config()
    assert isinstance(sae_cfg, SAEConfig) and sae_cfg.l1_coefficient == 0.5 and sae_cfg.bandwidth == 0.1
    assert (sae_cfg.hook_name, sae_cfg.model_name, sae_cfg.threshold_momentum, sae_cfg.seed) == ("blocks.0.hook_resid_post", "toy", 0.5, 0)
    assert sae_cfg.aux_coefficient == SAEConfig("relu", 16, 32).aux_coefficient          # None: SAEConfig's default
    result = train(cfg, toy())
    assert dataclasses.asdict(result.sae.cfg) == dataclasses.asdict(cfg.sae_config(act_scale=result.sae.cfg.act_scale))
    assert TrainConfig(variant="topk", target_l0=5).sae_config(16).k == 5                # the TopK family: the target is k
    assert TrainConfig(variant="relu").sae_config(16).d_sae == train_module.DEFAULT_D_SAE_FACTOR * 16
    with pytest.raises(ValueError, match="d_in"):
        TrainConfig().sae_config()


def test_k_larger_than_d_sae():
    with pytest.raises(ValueError, match="TrainConfig.k"):
        train(TrainConfig(**{**SMALL, "k": 33}), toy())


def test_wrong_width_names_expected_and_got():
    with pytest.raises(ValueError, match=r"\[batch, 16\].*\(64, 5\)"):
        train(TrainConfig(**SMALL, total_tokens=640), [torch.zeros(64, 5)])
    with pytest.raises(ValueError, match="d_in=16.*d_in=8"):
        train(TrainConfig(**SMALL, total_tokens=640), ToyFeatures(d_in=8, n_features=8, mean_active=1))


def test_source_type_error():
    with pytest.raises(TypeError, match="source"):
        train(TrainConfig(**SMALL, total_tokens=640), 3)


def test_tensor_source_and_rebatching():
    "A tensor and an iterable of odd-sized batches give the same run as the same rows in batches of 64."
    rows = torch.cat(toy_batches(10))
    cfg = TrainConfig(**SMALL, total_tokens=640)
    a = train(cfg, rows)
    b = train(cfg, list(rows.split(48)))
    assert_same_sae(a.sae, b.sae)


# -- every variant, the penalties, the history ------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains(variant):
    cfg = TrainConfig(**{**SMALL, "variant": variant}, total_tokens=20 * 64, sparsity_warmup_steps=5,
                      l1_coefficient=0.1, l0_coefficient=0.01, dead_tokens_threshold=256)
    result = train(cfg, toy())
    h = result.history
    assert [r["step"] for r in h] == [5, 10, 15, 20]
    for key in ("loss", "mse", "fvu", "l0", "sparsity", "aux", "lr", "dead_fraction", "dense_fraction", "tokens"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in h), key
    assert h[-1]["fvu"] < h[0]["fvu"] and result.sae.cfg.variant == variant


@pytest.mark.parametrize("penalty", list(CROSS_SAMPLE_PENALTIES))
def test_cross_sample_penalties(penalty):
    cfg = TrainConfig(**SMALL, total_tokens=10 * 64, cross_sample_penalty=penalty, cross_sample_coefficient=0.5)
    h = train(cfg, toy()).history
    assert all("cross_sample" in r and r["cross_sample"] >= 0 for r in h)
    assert h[-1]["loss"] >= h[-1]["fidelity"] + h[-1]["cross_sample"] - 1e-5


def test_history_written_as_json_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    result = train(TrainConfig(**SMALL, total_tokens=12 * 64, history_path=str(path)), toy())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == result.history and [r["step"] for r in lines] == [5, 10, 12]


def test_act_scale_copied_from_source():
    class Scaled(list):
        act_scale = 0.25
    result = train(TrainConfig(**SMALL, total_tokens=128), Scaled(toy_batches(2)))
    assert result.sae.cfg.act_scale == 0.25


# -- checkpoints and resume ---------------------------------------------------------------------------------

class StopAfter:
    "The batches, then KeyboardInterrupt after `n` of them (a clean Ctrl-C)."
    def __init__(self, batches, n): self.batches, self.n = batches, n
    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.n: raise KeyboardInterrupt
            yield b


def test_resume_after_interruption_is_exact(tmp_path):
    batches = toy_batches(30)
    cfg = TrainConfig(**SMALL, total_tokens=30 * 64, checkpoint_dir=str(tmp_path), checkpoint_every=7,
                      dead_tokens_threshold=256, lr_warmup_steps=3, history_path=str(tmp_path / "h.jsonl"))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, StopAfter(batches, 17))
    assert load_checkpoint(tmp_path)["step"] == 14
    resumed = train(cfg, batches)
    straight = train(dataclasses.replace(cfg, checkpoint_dir=None, history_path=None), batches)
    assert_same_sae(resumed.sae, straight.sae)
    assert resumed.history == straight.history
    assert [json.loads(l) for l in (tmp_path / "h.jsonl").read_text().splitlines()] == straight.history
    state = load_checkpoint(tmp_path)
    assert state["done"] and state["step"] == 30
    again = train(cfg, StopAfter(batches, 0))  # finished: nothing is read from the source
    assert_same_sae(again.sae, straight.sae)
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(cfg, lr=1e-2), batches)  # another run in the same directory is refused


class StoreLike:
    "Stateful like ActivationStore: its own iterator, `position` state, batches of 48 rows (not the 64 trained on)."
    d_in, act_scale = 16, 0.5
    def __init__(self, stop_at=None):
        self.rows, self.position, self.stop_at = torch.cat(toy_batches(40)), 0, stop_at
    def __iter__(self): return self
    def __next__(self):
        if self.position == self.stop_at: raise KeyboardInterrupt
        if self.position + 48 > len(self.rows): raise StopIteration
        self.position += 48
        return self.rows[self.position - 48:self.position]
    def state_dict(self): return {"position": self.position}
    def load_state_dict(self, state): self.position = state["position"]


def test_resume_with_stateful_source_and_pending_rows(tmp_path):
    cfg = TrainConfig(**SMALL, total_tokens=25 * 64, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, StoreLike(stop_at=48 * 18))
    state = load_checkpoint(tmp_path)
    assert state["step"] == 10 and len(state["stream"]["pending"]) == 48 * 14 - 64 * 10   # rows pulled, not yet used
    resumed = train(cfg, StoreLike())
    straight = train(dataclasses.replace(cfg, checkpoint_dir=None), StoreLike())
    assert_same_sae(resumed.sae, straight.sae)
    assert resumed.sae.cfg.act_scale == 0.5


def test_crash_while_committing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    "os.replace failing (a crash mid-commit) leaves the previous checkpoint loadable, and resuming is exact."
    cfg = TrainConfig(**SMALL, total_tokens=20 * 64, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2: raise OSError("simulated crash during os.replace")
        return real_replace(src, dst)
    monkeypatch.setattr(train_module.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, toy())
    monkeypatch.setattr(train_module.os, "replace", real_replace)
    assert load_checkpoint(tmp_path)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temp file left behind
    resumed = train(cfg, toy())
    assert_same_sae(resumed.sae, train(dataclasses.replace(cfg, checkpoint_dir=None), toy()).sae)


def test_nonfinite_input_stops_and_keeps_checkpoint(tmp_path):
    batches = toy_batches(20)
    batches[12] = batches[12].clone()
    batches[12][5, 3] = float("inf")
    cfg = TrainConfig(**SMALL, total_tokens=20 * 64, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    with pytest.raises(ValueError, match="step 13"):
        train(cfg, batches)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 10 and not state["done"]
    assert all(torch.isfinite(t).all() for t in state["sae"].values())


def test_nonfinite_loss_stops_with_step(tmp_path):
    batches = toy_batches(20)
    batches[7] = batches[7] * 1e30   # finite input whose squared error overflows
    cfg = TrainConfig(**SMALL, total_tokens=20 * 64, checkpoint_dir=str(tmp_path), checkpoint_every=5)
    with pytest.raises(FloatingPointError, match="step 8"):
        train(cfg, batches)
    assert load_checkpoint(tmp_path)["step"] == 5


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from sae_nb.data import ToyFeatures
    from sae_nb.train import TrainConfig, train

    class SlowToy(ToyFeatures):  # the same stream, slower, so that the kill lands mid-run
        def sample(self, n):
            time.sleep(0.01)
            return super().sample(n)

    cfg = TrainConfig(d_in=16, d_sae=32, k=2, batch_size=64, lr=3e-3, total_tokens=300 * 64, dead_tokens_threshold=640,
                      checkpoint_dir=sys.argv[1], checkpoint_every=3, log_every=5, lr_warmup_steps=10, progress=False)
    train(cfg, SlowToy(d_in=16, n_features=32, mean_active=2, seed=0))
""")


def test_resume_after_sigkill_is_exact(tmp_path):
    "Kill -9 a training process at a random moment after its first checkpoint; resuming equals an unbroken run (~15 s)."
    script, ckpt = tmp_path / "run.py", tmp_path / "ckpt"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not (ckpt / CHECKPOINT_FILE).exists():
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.05, 0.3))   # then somewhere mid-run, maybe mid-write
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    state = load_checkpoint(ckpt)
    assert not state["done"] and 0 < state["step"] < 300
    cfg = TrainConfig(d_in=16, d_sae=32, k=2, batch_size=64, lr=3e-3, total_tokens=300 * 64, dead_tokens_threshold=640,
                      checkpoint_every=3, log_every=5, lr_warmup_steps=10, progress=False)
    resumed = train(dataclasses.replace(cfg, checkpoint_dir=str(ckpt)), toy())
    straight = train(cfg, toy())
    assert_same_sae(resumed.sae, straight.sae)
    assert resumed.history == straight.history


# -- DDP -------------------------------------------------------------------------------------------------------

# What a DDP run must equal: one process whose loss is the mean of the W shards' losses (`train` slices each global
# batch into W contiguous shards). Losses that are means over rows then match a 1-process run over the whole batch;
# batch-level terms (BatchTopK's and Matryoshka's top-k, AuxK's normalisation) are taken per shard, and the running
# statistics (BatchTopK's threshold) are updated per shard and averaged over the ranks.
DDP_RUNS = {   # name: TrainConfig fields beyond DDP_BASE
    "topk": dict(variant="topk", dead_tokens_threshold=10**9),
    "relu": dict(variant="relu", l1_coefficient=0.3, dead_tokens_threshold=10**9),
    "topk-auxk": dict(variant="topk", dead_tokens_threshold=128),   # dead after 2 steps unfired: AuxK active
    "batchtopk": dict(variant="batchtopk", dead_tokens_threshold=128),
    "matryoshka": dict(variant="matryoshka", matryoshka_prefixes=(8, 32), dead_tokens_threshold=10**9),
}
DDP_BASE = dict(d_in=16, d_sae=32, k=2, total_tokens=30 * 64, batch_size=64, lr=3e-3, progress=False, log_every=5)

DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    from sae_nb.data import ToyFeatures
    from sae_nb.train import TrainConfig, train
    runs, base = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    for name, fields in runs.items():
        result = train(TrainConfig(**base, **fields), ToyFeatures(d_in=16, n_features=32, mean_active=2, seed=0))
        out = os.path.join(sys.argv[1], name)
        if rank == 0:
            result.sae.save(out)
            with open(out + ".history.json", "w") as f: json.dump(result.history, f)
        torch.distributed.barrier()
        if rank == 1: torch.save(dict(result.sae.named_buffers()), out + ".rank1_buffers.pt")
    torch.distributed.barrier()   # tear down together: a rank leaving early can abort in gloo's threads
    torch.distributed.destroy_process_group()
""")


class ShardMean(torch.nn.Module):
    "What W DDP ranks compute, in one process: each shard's loss from the same SAE and buffers; the mean loss, the summed firings, the mean buffers."
    def __init__(self, inner, world: int):
        super().__init__()
        self.inner, self.world = inner, world

    @property
    def sae(self): return self.inner.sae

    def forward(self, x, dead_mask, sparsity_scale, cross_scale=None):
        buffers = list(self.sae.buffers())
        start, ends, outs = [b.clone() for b in buffers], [], []
        for shard in x.chunk(self.world):
            for b, s in zip(buffers, start): b.copy_(s)
            outs.append(self.inner(shard, dead_mask, sparsity_scale, cross_scale))
            ends.append([b.clone() for b in buffers])
        for i, b in enumerate(buffers): b.copy_(sum(e[i] for e in ends) / self.world)
        terms = {k: sum(o[1][k] for o in outs) / self.world for k in outs[0][1]}
        return sum(o[0] for o in outs) / self.world, terms, sum(o[2] for o in outs)


def test_ddp_two_processes_match_the_mean_of_their_shards(tmp_path, monkeypatch):
    "torchrun with 2 gloo processes on the CPU trains the SAE that 1 process trains on the mean of the 2 shards' losses, for every kind of batch-level term (15 s)."
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path), json.dumps(DDP_RUNS), json.dumps(DDP_BASE)],
                          env=subprocess_env(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    build_run = train_module.build_run
    for name, fields in DDP_RUNS.items():
        cfg = TrainConfig(**DDP_BASE, **fields)
        both = SAE.load(tmp_path / name)
        history = json.loads((tmp_path / f"{name}.history.json").read_text())
        if name in ("topk", "relu"):   # per-row losses only: the 2-process run is the 1-process run on the whole batch
            single = train(cfg, toy()).sae
            for key, value in single.state_dict().items():
                torch.testing.assert_close(both.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        def shard_mean_run(*args):
            run = build_run(*args)
            return run._replace(loss=ShardMean(run.loss, 2))
        with monkeypatch.context() as m:
            m.setattr(train_module, "build_run", shard_mean_run)
            ref = train(cfg, toy())
        for key, value in ref.sae.state_dict().items():
            torch.testing.assert_close(both.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
        for row, ref_row in zip(history, ref.history, strict=True):   # logged terms: averaged over the ranks
            for key in ("loss", "fvu", "l0", "aux", "dead_fraction"):
                assert row[key] == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), (name, row["step"], key)
        rank1 = torch.load(tmp_path / f"{name}.rank1_buffers.pt")
        for key, value in rank1.items():   # the ranks end with the same running statistics
            torch.testing.assert_close(value, both.state_dict()[key], rtol=0, atol=0, msg=f"{name} {key}")
        if name == "topk-auxk": assert max(r["aux"] for r in history) > 0 and max(r["dead_fraction"] for r in history) > 0
        if name in ("batchtopk", "matryoshka"):
            assert both.threshold.item() > 0
            assert all(r["l0"] <= cfg.k for r in history)   # each shard keeps at most (batch / 2) * k activations


@pytest.mark.parametrize("variant", ["relu", "topk"])
def test_fused_adam_step_matches_foreach_whatever_the_layouts(variant):
    # PyTorch's fused CPU Adam walks param, grad and moments in memory order, and W_enc is stored transposed:
    # a resumed optimizer (contiguous moments from the checkpoint) must get its moments back in W_enc's layout.
    from sae_nb.sae import make_sae
    from sae_nb.train import TrainingLoss, make_optimizer, match_state_layout, train_step
    cfg = TrainConfig(**{**SMALL, "variant": variant, "lr": 1e-2})
    batches, dead = toy_batches(6), torch.zeros(32, dtype=torch.bool)
    runs = {}
    for kind in ("fused", "foreach", "fused-resumed"):
        sae = make_sae(variant, d_in=16, d_sae=32, k=2, seed=0)
        opt = (torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas)) if kind == "foreach"
               else make_optimizer(sae, cfg.lr, cfg.adam_betas))
        assert bool(opt.param_groups[0]["fused"]) == (kind != "foreach")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model = TrainingLoss(sae, None, 0.0)
        for i, xb in enumerate(batches):
            if kind == "fused-resumed" and i == 3:   # a checkpoint's moments come back contiguous
                state = opt.state_dict()
                for s in state["state"].values():
                    for k, v in s.items(): s[k] = v.contiguous()
                opt = make_optimizer(sae, cfg.lr, cfg.adam_betas); opt.load_state_dict(state); match_state_layout(opt)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
            train_step(model, opt, sched, xb, dead)
        runs[kind] = sae.state_dict()
    for kind in ("fused", "fused-resumed"):
        for name, v in runs["foreach"].items():
            torch.testing.assert_close(runs[kind][name], v, rtol=1e-5, atol=1e-6, msg=f"{kind} {name}")


def test_retain_freed_memory_keeps_large_blocks_in_the_process():
    probe = textwrap.dedent("""
        import sys, torch
        from sae_nb.train import retain_freed_memory
        rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
        if sys.argv[1] == "retain": assert retain_freed_memory()
        before = rss()
        t = torch.ones(64, 2**20)     # 256 MB, touched
        del t
        print(rss() - before)         # MB still resident after the free
    """)
    kept = {mode: int(subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True,
                                     env=subprocess_env()).stdout)
            for mode in ("default", "retain")}
    assert kept["default"] < 64 and kept["retain"] > 200, kept


def test_retain_cpu_memory_is_checked_and_does_not_block_resume():
    with pytest.raises(TypeError, match="retain_cpu_memory"):
        train(TrainConfig(**SMALL, retain_cpu_memory="yes"), toy())
    assert "retain_cpu_memory" in train_module.RESUME_FREE_FIELDS


# -- the training scale, target L0, convergence -------------------------------------------------------------

def test_normalise_makes_the_run_scale_free_and_the_sae_reads_model_units():
    "Training on 7 x the data gives the same SAE in training units; it reads and writes the model's units."
    rows = torch.cat(toy_batches(10))
    cfg = TrainConfig(**{**SMALL, "variant": "relu"}, total_tokens=640)
    a, b = train(cfg, rows), train(cfg, 7 * rows)
    expected = (16 / rows[:64].pow(2).sum(-1).mean()).sqrt().item()     # mean squared norm d_in on the first batch
    assert a.sae.cfg.act_scale == pytest.approx(expected, rel=1e-5)
    assert b.sae.cfg.act_scale == pytest.approx(expected / 7, rel=1e-5)
    for name, t in a.sae.state_dict().items():
        torch.testing.assert_close(b.sae.state_dict()[name], t, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(b.sae(7 * rows).x_hat, 7 * a.sae(rows).x_hat, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b.sae(7 * rows).latents, a.sae(rows).latents, rtol=1e-3, atol=1e-3)
    assert train(dataclasses.replace(cfg, normalise=False), rows).sae.cfg.act_scale == 1.0
    assert train(dataclasses.replace(cfg, act_scale=3.0), rows).sae.cfg.act_scale == 3.0


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "matryoshka"])
def test_target_l0_is_k_for_the_topk_family(variant):
    result = train(TrainConfig(**{**SMALL, "variant": variant}, total_tokens=5 * 64, target_l0=3), toy())
    assert result.sae.cfg.k == 3
    with pytest.raises(ValueError, match="TrainConfig.target_l0"):
        train(TrainConfig(**{**SMALL, "variant": variant}, total_tokens=5 * 64, target_l0=2.5), toy())


def heldout(n=4096):
    "Rows of the toy data far from anything the training stream reaches."
    t = toy()
    t.load_state_dict({"position": 10**9})
    return t.sample(n)[0]


def replay_controller(h, target=4, gain=0.05):
    "Check each logged step against the controller: log c_{t+1} = log c_t + g clip(log(L0_t / target), -1, 1)."
    for a, b in zip(h, h[1:]):
        error = max(-1.0, min(1.0, math.log(a["l0"] / target)))
        assert math.log(b["sparsity_scale"]) == pytest.approx(math.log(a["sparsity_scale"]) + gain * error, abs=1e-9), a


def check_steering(result, lr, variant):
    "Steered while the lr is above a quarter of its peak, then held at the running mean of its log factor to the end; the held-out L0 ends within 10% of 4."
    h, field = result.history, {"relu": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}[variant]
    assert [r["step"] for r in h] == list(range(1, result.steps + 1))
    assert abs(result.evals[-1]["l0"] / 4 - 1) <= 0.1, result.evals[-1]
    first_held = next(i for i, r in enumerate(h) if r["lr"] < STEER_HOLD_LR * lr and r["step"] > 10)
    assert h[first_held - 1]["lr"] >= STEER_HOLD_LR * lr > h[first_held]["lr"] > 0
    replay_controller(h[:first_held + 1])                                  # steered up to there (its step still steers)
    held = [r["sparsity_coefficient"] for r in h[first_held + 1:]]
    assert len(held) >= 10 and len(set(held)) == 1 and getattr(result.sae.cfg, field) == pytest.approx(held[0])
    mean = math.log(h[0]["sparsity_scale"])                                # held at the running mean of the log factor
    for r in h[1:first_held + 1]: mean += 0.05 * (math.log(r["sparsity_scale"]) - mean)
    assert math.log(h[first_held + 1]["sparsity_scale"]) == pytest.approx(mean, abs=1e-9)
    assert h[first_held + 1]["sparsity_scale"] != h[first_held]["sparsity_scale"]   # not the last step's factor
    coefficients = [r["sparsity_coefficient"] for r in h]
    assert max(coefficients) / min(coefficients) > 2                       # it moved before that


@pytest.mark.parametrize("variant", ["relu", "gated", "jumprelu"])
def test_steering_reaches_the_target_l0_in_a_converged_run(variant):
    cfg = TrainConfig(variant=variant, d_in=16, d_sae=64, batch_size=256, lr=1e-2, target_l0=4, total_tokens=3000 * 256,
                      eval_every=25, log_every=1, progress=False)
    result = train(cfg, toy(), held_out=heldout())
    assert result.converged is True and result.steps < 3000
    check_steering(result, 1e-2, variant)


@pytest.mark.parametrize("variant", ["relu", "gated", "jumprelu"])
def test_steering_reaches_the_target_l0_in_a_run_that_did_not_converge(variant):
    "No early stop: the decay starts at 80% of the budget; the coefficient an L1 SAE needs still drifts there."
    cfg = TrainConfig(variant=variant, d_in=16, d_sae=64, batch_size=256, lr=3e-3, target_l0=4, total_tokens=500 * 256,
                      eval_every=20, log_every=1, progress=False, stop_when_converged=False)
    result = train(cfg, toy(), held_out=heldout())
    assert result.steps == 500 and result.converged is False
    check_steering(result, 3e-3, variant)


def test_jumprelu_thresholds_start_where_the_data_put_them():
    from sae_nb.sae import make_sae
    from sae_nb.variants import init_jumprelu_thresholds
    x = toy().sample(2048)[0]
    sae = make_sae("jumprelu", d_in=16, d_sae=64, seed=0)
    init_jumprelu_thresholds(sae, x, 8)
    fired = (sae.encode(x) != 0).float()
    assert fired.sum(-1).mean().item() == pytest.approx(8, rel=0.05)
    assert fired.mean(0).min().item() > 0.08 and fired.mean(0).max().item() < 0.17   # each latent at its own quantile


def test_steer_is_a_clipped_pi_controller():
    from sae_nb.train import steer
    assert steer(0.0, 100.0, 4.0, 0.05) == pytest.approx((0.05, 0.05))        # default K = 0: the integral part alone
    assert steer(0.0, 100.0, 4.0, 0.05, damping=1.0) == pytest.approx((0.05, 1.05))   # far above: one full step up, +K
    assert steer(0.2, 4.0 * 1.1, 4.0, 0.05, damping=2.0) == pytest.approx((0.2 + 0.05 * math.log(1.1),
                                                                          0.2 + 2.05 * math.log(1.1)))
    assert steer(0.0, 0.0, 4.0, 0.05, damping=1.0) == pytest.approx((-0.05, -1.05))   # nothing fires: one full step down
    assert steer(30.0, 100.0, 4.0, 0.05)[0] == 30.0                          # bounded


def test_schedule_decay_can_start_early():
    from sae_nb.train import LRSchedule
    s = LRSchedule(total_steps=100, warmup_steps=0, decay=0.2)
    assert s.decay_start == 80 and s(79) == 1.0 and s(99) == pytest.approx(0.05)
    s.start_decay(40)                     # converged after 40 steps: the run ends at 50, the last 10 decaying
    assert s.end == 50 and s.decay_start == 40 and s(39) == 1.0 and s(49) == pytest.approx(0.1)
    s.start_decay(90)                     # never later than the budget
    assert s.end == 50


def test_converged_run_stops_early_and_marks_it():
    cfg = TrainConfig(**SMALL, total_tokens=2000 * 64, eval_every=10, converge_tol=0.02)
    result = train(cfg, toy(), held_out=heldout())
    assert result.converged is True and result.steps < 2000
    assert result.steps == result.history[-1]["step"] and result.evals[-1]["step"] == result.steps
    assert "heldout_fvu" in result.history[-1] and result.history[-1]["lr"] < cfg.lr / 4   # ended in the decay
    short = train(dataclasses.replace(cfg, total_tokens=20 * 64), toy(), held_out=heldout())
    assert short.converged is False and short.steps == 20
    assert train(dataclasses.replace(cfg, total_tokens=20 * 64), toy()).converged is None   # no held-out data


def test_held_out_is_checked():
    cfg = TrainConfig(**SMALL, total_tokens=640)
    with pytest.raises(ValueError, match="held_out"):
        train(cfg, toy(), held_out=torch.zeros(10, 5))
    with pytest.raises(ValueError, match="held_out.*NaN"):
        train(cfg, toy(), held_out=torch.full((10, 16), float("nan")))
    with pytest.raises(TypeError, match="held_out"):
        train(cfg, toy(), held_out=[[0.0] * 16])


def test_result_unpacks_as_sae_and_history():
    sae, history = train(TrainConfig(**SMALL, total_tokens=5 * 64), toy())
    assert isinstance(sae, SAE) and history[-1]["step"] == 5


def test_resume_of_a_steered_converging_run_is_exact(tmp_path):
    "Steering state, held-out evaluations and an early decay survive a checkpoint: resuming ends as a straight run."
    batches = toy_batches(300)
    cfg = TrainConfig(**{**SMALL, "variant": "relu"}, target_l0=3, total_tokens=300 * 64, eval_every=10,
                      checkpoint_dir=str(tmp_path), checkpoint_every=15, converge_tol=0.05)
    x_val = heldout(1024)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, StopAfter(batches, 100), held_out=x_val)
    resumed = train(cfg, batches, held_out=x_val)
    straight = train(dataclasses.replace(cfg, checkpoint_dir=None), batches, held_out=x_val)
    assert_same_sae(resumed.sae, straight.sae)
    assert resumed.history == straight.history and resumed.evals == straight.evals
    assert (resumed.converged, resumed.steps) == (straight.converged, straight.steps)
    assert resumed.sae.cfg.l1_coefficient == straight.sae.cfg.l1_coefficient
