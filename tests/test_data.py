"Tests of sae_nb.data: ToyFeatures and ActivationStore (tiny random model; a few seconds)."
import json

import pytest
import torch

from sae_nb.data import ActivationStore, ToyFeatures, firing_profile, random_correlation_matrix

torch.set_num_threads(1)
HOOK = "blocks.0.hook_resid_post"


# ---------------------------------------------------------------- ToyFeatures
def l0_true(f):
    return (f != 0).float().sum(1).mean().item()


@pytest.mark.parametrize("d_in,n_features", [(16, 64), (32, 20)])
def test_toy_unit_norm_rows(d_in, n_features):
    toy = ToyFeatures(d_in=d_in, n_features=n_features, mean_active=3, seed=0)
    assert toy.features.shape == (n_features, d_in)
    torch.testing.assert_close(toy.features.norm(dim=1), torch.ones(n_features))
    if n_features <= d_in:  # orthonormal by default when it fits
        torch.testing.assert_close(toy.features @ toy.features.T, torch.eye(n_features), atol=1e-5, rtol=0)


def test_toy_l0_and_shapes():
    toy = ToyFeatures(d_in=32, n_features=256, mean_active=6, seed=1)
    x, f = toy.sample(20_000)
    assert x.shape == (20_000, 32) and f.shape == (20_000, 256) and x.dtype == torch.float32
    assert (f >= 0).all()
    torch.testing.assert_close(x, f @ toy.features, atol=1e-4, rtol=1e-4)
    # L0 is a sum of Bernoullis: sd per sample <= sqrt(6); standard error over 20k samples ~ 0.017
    assert abs(l0_true(f) - 6) < 0.1
    assert toy.mean_active == pytest.approx(6)


@pytest.mark.parametrize("correlation", [0.0, 0.6, "matrix"])
def test_toy_marginal_firing_probs(correlation):
    if correlation == "matrix":
        correlation = random_correlation_matrix(50, strength=0.7, seed=3)
    toy = ToyFeatures(d_in=100, n_features=50, mean_active=11, frequency_profile="linear",
                      frequency_ratio=0.05 / 0.39, correlation=correlation, seed=2)
    torch.testing.assert_close(toy.firing_probs, torch.linspace(0.39, 0.05, 50), atol=1e-5, rtol=0)
    _, f = toy.sample(40_000)
    measured = (f != 0).float().mean(0)
    # binomial standard error <= 0.0025; with correlated firing effective n is smaller: allow 0.02
    assert (measured - toy.firing_probs).abs().max() < 0.02
    assert abs(l0_true(f) - 11) < 0.2
    fired = f[f != 0]
    assert abs(fired.mean().item() - 1) < 0.01 and abs(fired.std().item() - 0.15) < 0.01


def test_toy_correlation_makes_features_co_fire():
    base = dict(d_in=20, n_features=10, mean_active=2, seed=0)
    fires0 = ToyFeatures(**base).sample(20_000)[1] != 0
    fires1 = ToyFeatures(**base, correlation=0.8).sample(20_000)[1] != 0
    off = ~torch.eye(10, dtype=torch.bool)
    assert torch.corrcoef(fires0.float().T)[off].abs().mean() < 0.03
    assert torch.corrcoef(fires1.float().T)[off].mean() > 0.2


def test_toy_profiles_and_explicit_probs():
    p = firing_profile(100, 5.0, "zipf")
    assert p.sum().item() == pytest.approx(5.0, rel=1e-5) and (p[:-1] >= p[1:]).all()
    toy = ToyFeatures(d_in=8, n_features=4, firing_probs=[0.5, 0.25, 0.0, 1.0], seed=0)
    _, f = toy.sample(10_000)
    assert (f[:, 2] == 0).all() and (f[:, 3] != 0).all()
    assert abs((f[:, 0] != 0).float().mean().item() - 0.5) < 0.03


def test_toy_reproducible_for_seed():
    a, b, c = (ToyFeatures(d_in=16, n_features=40, mean_active=4, seed=s) for s in (7, 7, 8))
    xa, fa = a.sample(3000)
    xb, fb = b.sample(3000)
    assert torch.equal(xa, xb) and torch.equal(fa, fb) and torch.equal(a.features, b.features)
    assert not torch.equal(xa, c.sample(3000)[0])


def test_toy_exact_resume_mid_stream():
    kw = dict(d_in=16, n_features=40, mean_active=4, seed=3, correlation=0.3)
    full = ToyFeatures(**kw)
    gen = full.batches(300)
    first = [next(gen) for _ in range(5)]  # 1500 rows: crosses a chunk boundary mid-batch
    state = full.state_dict()
    assert state == {"position": 1500}
    rest = [next(gen) for _ in range(6)]
    resumed = ToyFeatures(**kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    gen2 = resumed.batches(300)
    for expected in rest:
        assert torch.equal(next(gen2), expected)
    # the stream does not depend on how it was cut into batches
    again = ToyFeatures(**kw)
    assert torch.equal(torch.cat([again.sample(1499)[0], again.sample(1801)[0]]), torch.cat(first + rest))


def test_toy_errors():
    with pytest.raises(ValueError, match="mean_active"):
        ToyFeatures(d_in=4, n_features=8, seed=0)
    with pytest.raises(ValueError, match="orthogonal"):
        ToyFeatures(d_in=4, n_features=8, mean_active=1, orthogonal=True)
    with pytest.raises(ValueError, match="firing_probs"):
        ToyFeatures(d_in=4, n_features=3, firing_probs=[0.5, 1.5, 0.1])
    with pytest.raises(ValueError, match="frequency_profile"):
        ToyFeatures(d_in=4, n_features=3, mean_active=1, frequency_profile="cubic")
    with pytest.raises(ValueError, match="positive semi-definite"):
        ToyFeatures(d_in=4, n_features=2, mean_active=1, correlation=[[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(TypeError, match="d_in"):
        ToyFeatures(d_in=4.0, n_features=2, mean_active=1)
    with pytest.raises(ValueError, match="position"):
        ToyFeatures(d_in=4, n_features=2, mean_active=1).load_state_dict({"pos": 3})


# ---------------------------------------------------------------- ActivationStore
@pytest.fixture(scope="module")
def model():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    cfg = TransformerBridgeConfig(d_model=16, d_head=4, n_heads=4, n_layers=2, n_ctx=32, d_vocab=50, d_mlp=64,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg, model_name="tiny-test").eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 50, (40, 16), generator=torch.Generator().manual_seed(0))


def make(model, tokens, **kw):
    base = dict(batch_size=64, buffer_tokens=256, n_norm_tokens=256, model_batch_size=8, progress=False, seed=0)
    return ActivationStore(model, HOOK, tokens, **{**base, **kw})


def take(store, n):
    return [store.next_batch() for _ in range(n)]


@pytest.fixture
def count_forwards(model, monkeypatch):
    calls = []
    original = model.run_with_cache
    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(model, "run_with_cache", counting)
    return calls


def test_store_shapes_and_iteration(model, tokens):
    store = make(model, tokens)
    assert store.d_in == 16 and store.block_tokens == 256 and store.seqs_per_block == 16
    batch = next(iter(store))
    assert batch.shape == (64, 16) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    assert store.state_dict()["position"] == 64


def test_store_act_scale_mean_sq_norm(model, tokens):
    store = make(model, tokens, n_norm_tokens=40 * 16)  # estimate on the whole epoch
    rows = torch.cat(take(store, 10))  # 640 rows of the 640-token epoch, reshuffled: the model's units
    assert store.act_scale == pytest.approx((16 / store.mean_sq_norm) ** 0.5)
    assert rows.pow(2).sum(1).mean().item() == pytest.approx(store.mean_sq_norm, rel=0.1)   # not rescaled
    assert abs((store.act_scale * rows).pow(2).sum(1).mean().item() / store.d_in - 1) < 0.1   # training units: d_in


def test_store_deterministic_for_seed(model, tokens):
    a, b, c = make(model, tokens), make(model, tokens), make(model, tokens, seed=1)
    ba, bb, bc = take(a, 6), take(b, 6), take(c, 6)
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert not torch.equal(ba[0], bc[0])


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5, 9, 13])  # round 0 = 2 batches, then 4 per round; 40 seqs cycle
def test_store_exact_resume(model, tokens, stop_after):
    full = make(model, tokens)
    expected = take(full, 16)
    first = make(model, tokens)
    take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make(model, tokens)
    resumed.load_state_dict(state)
    for b in expected[stop_after:]:
        assert torch.equal(resumed.next_batch(), b)


def test_store_resume_rejects_other_settings(model, tokens):
    state = make(model, tokens).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make(model, tokens, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="block_tokens"):
        make(model, tokens, buffer_tokens=512).load_state_dict(state)


def test_store_iterable_sources_match_tensor(model, tokens):
    expected = take(make(model, tokens), 12)  # crosses the end of the 40-sequence epoch
    as_list = make(model, [tokens[:24], tokens[24:]])
    assert all(torch.equal(as_list.next_batch(), b) for b in expected)
    once = make(model, (t for t in tokens.split(8)))  # one-shot generator: stream ends with the epoch
    got = list(once)
    assert len(got) <= 10 and all(torch.equal(g, b) for g, b in zip(got, expected[:2]))
    resumed = make(model, (t for t in tokens.split(8)))
    resumed.load_state_dict({"position": 3 * 64})
    assert torch.equal(resumed.next_batch(), got[3])


def test_store_disk_cache_round_trip(model, tokens, tmp_path, count_forwards):
    writer = make(model, tokens, cache_dir=tmp_path, shard_tokens=160)
    assert len(count_forwards) > 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["meta.json"] + [f"shard_{i:05d}.safetensors" for i in range(4)]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["hook_name"] == HOOK and meta["model_name"] == "tiny-test" and meta["n_tokens"] == 640
    assert meta["act_scale"] == pytest.approx(writer.act_scale)
    count_forwards.clear()
    reader = make(model, tokens, cache_dir=tmp_path, shard_tokens=160)
    batches_w, batches_r = take(writer, 14), take(reader, 14)
    assert count_forwards == [] and reader.n_model_batches == 0
    assert all(torch.equal(a, b) for a, b in zip(batches_w, batches_r))
    # resume from the cache
    resumed = make(model, tokens, cache_dir=tmp_path)
    resumed.load_state_dict(reader.state_dict())
    assert torch.equal(resumed.next_batch(), reader.next_batch())
    # same activations as the model path, up to float noise from the forward-pass batching
    direct = take(make(model, tokens), 2)
    torch.testing.assert_close(torch.cat(direct), torch.cat(batches_w[:2]), atol=1e-4, rtol=1e-4)


def test_store_interrupted_cache_is_redone(model, tokens, tmp_path, count_forwards):
    first = take(make(model, tokens, cache_dir=tmp_path), 3)
    (tmp_path / "meta.json").unlink()  # as if the fill had stopped before its last write
    (tmp_path / "shard_00000.safetensors").write_bytes(b"truncated")
    count_forwards.clear()
    again = make(model, tokens, cache_dir=tmp_path)
    assert len(count_forwards) > 0 and (tmp_path / "meta.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(first, take(again, 3)))


def test_store_cache_of_other_hook_is_refused(model, tokens, tmp_path):
    make(model, tokens, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="cache_dir"):
        ActivationStore(model, "blocks.1.hook_resid_post", tokens, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="cache_dir"):
        make(model, tokens[:20], cache_dir=tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cached", [False, True])
def test_store_non_finite_raises(model, tokens, tmp_path, bad, cached):
    calls = {"n": 0}
    def poison(act, hook):  # the third forward pass (sequences 16-23) gets a non-finite row
        calls["n"] += 1
        return act.index_fill(0, torch.tensor([4]), bad) if calls["n"] == 3 else act
    model.add_perma_hook(HOOK, poison)
    try:
        with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post.*model batch 2 \(sequences 16 to 23"):
            store = make(model, tokens, cache_dir=tmp_path if cached else None, n_norm_tokens=16 * 40)
            take(store, 10)
    finally:
        model.reset_hooks(including_permanent=True)
    if cached:
        assert not (tmp_path / "meta.json").exists()


def test_store_unknown_hook_lists_nearest(model, tokens):
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post"):
        ActivationStore(model, "blocks.0.hook_resid_pots", tokens, progress=False)


def test_store_argument_errors(model, tokens):
    with pytest.raises(ValueError, match="integer tensor"):
        ActivationStore(model, HOOK, tokens.float(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        ActivationStore(model, HOOK, tokens, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="tokens"):
        ActivationStore(model, HOOK, 12, progress=False)


def test_store_progress_bar(model, tokens, tmp_path, capsys):
    store = make(model, tokens, cache_dir=tmp_path, progress=True)
    take(store, 2)
    assert "caching" in capsys.readouterr().err
