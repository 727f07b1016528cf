"""SAELens's activation store on sae_nb's default model, timed (run by the peers' python): one JSON line on stdout.

Called by bench_store.py as `bench/.peers/venv/bin/python bench/peer_store.py --data FILE --workdir DIR ...`.
FILE (torch.save, written by bench_store.py) holds what both sides share: the token windows [n_seq, ctx],
the default model's config and weights (sae_nb's native parameter names), and sae_nb's activations at the
hook on a few of the windows. The model is rebuilt here as a TransformerLens 3 `HookedTransformer` with
those weights, and its activations are checked against sae_nb's (max abs difference <= --atol, or exit 1).
Then three stages, each SAELens's own code:
- cache write: `CacheActivationsRunner(cfg, override_dataset=tokens).run()`: model forwards, arrow
  shards written by HF `datasets`, consolidated into one dataset directory (its own `shuffle` included);
- cached read, shuffled: an `ActivationsStore` with `cached_activations_path` on that directory, batches
  pulled through its mixing buffer (a random permutation of the buffer at each refill, half kept);
- in-memory store: an `ActivationsStore` over the token dataset, no cache (model forwards + mixing buffer);
- model forward only: `run_with_cache` to the hook, as the store calls it, on the first windows (no store):
  how much of each store's time is its model's.
The buffer is given the same number of tokens as sae_nb's (`--buffer-tokens`), a shard the same number of
rows as sae_nb's cache shard (`--shard-tokens`), a model batch the same number of sequences.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

import harness

# HF datasets and the hub must not reach for the network (set before importing them); bench_store.py also points
# HF_HOME into the work dir, so that what datasets caches goes with it
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import datasets                                                                # noqa: E402
import sae_lens.cache_activations_runner as sl_cache                           # noqa: E402
from sae_lens.config import CacheActivationsRunnerConfig                       # noqa: E402
from sae_lens.training.activations_store import ActivationsStore               # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig        # noqa: E402

VERSIONS = {p: version(p) for p in ("torch", "sae-lens", "transformer-lens", "datasets")}
# sae_nb's model config fields that HookedTransformerConfig takes as they are
SAME_FIELDS = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "act_fn", "normalization_type",
               "positional_embedding_type", "eps")
# the fields of sae_nb's native model that HookedTransformer would compute differently if they were not these
NATIVE_DEFAULTS = dict(use_attn_scale=True, attn_scale=-1.0, attention_dir="causal", final_rms=False, gated_mlp=False,
                       attn_only=False, n_key_value_heads=None, attn_scores_soft_cap=-1.0, output_logits_soft_cap=-1.0)


# -- the model -------------------------------------------------------------------------------------
def hooked_transformer(config: dict, state: dict) -> HookedTransformer:
    """sae_nb's default model as a HookedTransformer: the same config, the native weights mapped onto TL's names.

    sae_nb's model (TransformerLens 4's native model behind a TransformerBridge) is a pre-LN GPT: token and learned
    position embeddings, per block LayerNorm -> attention (q, k, v, o Linear layers with biases, scores / sqrt(d_head),
    causal mask) -> residual, LayerNorm -> MLP (fc_in, exact GELU, fc_out) -> residual; final LayerNorm, an unembedding
    without bias. HookedTransformer computes the same with weights laid out per head; its unembedding bias b_U is set
    to zero."""
    odd = {k: config.get(k) for k, v in NATIVE_DEFAULTS.items() if config.get(k, v) != v}
    if odd:
        raise ValueError(f"sae_nb's model has settings this mapping does not cover: {odd}")
    if config.get("d_vocab_out", config["d_vocab"]) != config["d_vocab"]:
        raise ValueError("d_vocab_out != d_vocab is not covered")
    cfg = HookedTransformerConfig(**{k: config[k] for k in SAME_FIELDS}, default_prepend_bos=False,
                                  model_name=config.get("model_name", "sae_nb-default"), dtype=torch.float32,
                                  device="cpu", seed=0)
    model = HookedTransformer(cfg)
    H, dh, dm = cfg.n_heads, cfg.d_head, cfg.d_model
    state = dict(state)
    take = state.pop                                                     # each native tensor is mapped once
    per_head_in = lambda w: w.T.reshape(dm, H, dh).permute(1, 0, 2)      # Linear [H*dh, dm] -> W_Q [H, dm, dh]
    tl = {"embed.W_E": take("tok_embed.weight"), "pos_embed.W_pos": take("pos.weight"),
          "ln_final.w": take("ln_out.weight"), "ln_final.b": take("ln_out.bias"),
          "unembed.W_U": take("head.weight").T, "unembed.b_U": torch.zeros(cfg.d_vocab)}
    for i in range(cfg.n_layers):
        n, b = f"layers.{i}.", f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            tl[b + f"{ln}.w"], tl[b + f"{ln}.b"] = take(n + f"{ln}.weight"), take(n + f"{ln}.bias")
        for x in ("q", "k", "v"):
            tl[b + f"attn.W_{x.upper()}"] = per_head_in(take(n + f"attn.{x}.weight"))
            tl[b + f"attn.b_{x.upper()}"] = take(n + f"attn.{x}.bias").reshape(H, dh)
        tl[b + "attn.W_O"] = take(n + "attn.o.weight").T.reshape(H, dh, dm)   # Linear [dm, H*dh] -> W_O [H, dh, dm]
        tl[b + "attn.b_O"] = take(n + "attn.o.bias")
        tl[b + "mlp.W_in"], tl[b + "mlp.b_in"] = take(n + "mlp.fc_in.weight").T, take(n + "mlp.fc_in.bias")
        tl[b + "mlp.W_out"], tl[b + "mlp.b_out"] = take(n + "mlp.fc_out.weight").T, take(n + "mlp.fc_out.bias")
    params = dict(model.named_parameters())
    if set(params) != set(tl):
        raise ValueError(f"parameter names differ: HookedTransformer only {sorted(set(params) - set(tl))}, "
                         f"mapped only {sorted(set(tl) - set(params))}")
    if state:
        raise ValueError(f"native parameters left unmapped: {sorted(state)}")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != tl[k].shape: raise ValueError(f"{k}: shape {tuple(p.shape)} vs mapped {tuple(tl[k].shape)}")
            p.copy_(tl[k])
    model.eval()
    for p in model.parameters(): p.requires_grad_(False)
    return model


@torch.no_grad()
def hook_acts(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    "Activations at `hook` on `tokens`, [n * ctx, d_in] float32, as SAELens's ActivationsStore asks for them."
    stop = int(hook.split(".")[1]) + 1 if hook.startswith("blocks.") else None
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop, prepend_bos=False)
    act = cache[hook]
    return act.reshape(act.shape[0] * act.shape[1], -1).float()


@torch.no_grad()
def check_equivalence(model, data: dict, hook: str, atol: float) -> dict:
    """Max abs and relative difference of this model's activations (and logits) from sae_nb's on the same windows;
    exit 1 beyond atol at the hook (beyond 1e-3 of the largest logit for the logits)."""
    ours = hook_acts(model, data["check_tokens"], hook)
    ref = data["check_acts"]
    diff = (ours - ref).abs().max().item()
    logits_diff = (model(data["check_tokens"]) - data["check_logits"]).abs().max().item()
    out = {"max_abs_diff": diff, "max_abs_act": ref.abs().max().item(),
           "rel_diff": ((ours - ref).norm() / ref.norm()).item(), "n_tokens": ref.shape[0], "atol": atol,
           "logits_max_abs_diff": logits_diff, "max_abs_logit": data["check_logits"].abs().max().item()}
    if not diff <= atol:
        sys.exit(f"the HookedTransformer's activations at {hook} differ from sae_nb's by {diff:.3g} (> {atol}): {out}")
    if not logits_diff <= 1e-3 * max(1.0, out["max_abs_logit"]):
        sys.exit(f"the HookedTransformer's logits differ from sae_nb's by {logits_diff:.3g}: {out}")
    return out


# -- the stages ----------------------------------------------------------------------------------------
def token_dataset(tokens: torch.Tensor) -> datasets.Dataset:
    "The token windows as an in-memory HF Dataset with a `tokens` column (SAELens's pretokenized format)."
    return datasets.Dataset.from_dict({"tokens": tokens.tolist()})


def time_batches(store, n_batches: int) -> tuple[float, float]:
    "(seconds of the first batch: the first buffer fill, untimed in the rate; seconds of the next `n_batches`)."
    t0 = time.perf_counter()
    next(store)
    t1 = time.perf_counter()
    for _ in range(n_batches): next(store)
    return t1 - t0, time.perf_counter() - t1


def store_kwargs(args, ctx: int, d_in: int, n_tokens: int) -> dict:
    "ActivationsStore arguments shared by the cached read and the in-memory store."
    return dict(hook_name=args.hook, hook_head_index=None, context_size=ctx, d_in=d_in,
                n_batches_in_buffer=args.buffer_tokens // ctx,   # its mixing buffer holds n_batches_in_buffer * ctx tokens
                total_training_tokens=n_tokens, store_batch_size_prompts=args.model_batch_size,
                train_batch_size_tokens=args.batch, prepend_bos=False, normalize_activations="none",
                device=torch.device("cpu"), dtype="float32")


def cache_write(model, tokens, args, d_in: int, path: Path) -> dict:
    "CacheActivationsRunner over the token dataset into `path`: tokens/s of the whole run (forwards, shards, consolidation)."
    n_seq, ctx = tokens.shape
    bytes_per_token = d_in * 4
    cfg = CacheActivationsRunnerConfig(
        dataset_path="sae_nb-default-tokens", model_name=model.cfg.model_name, model_batch_size=args.model_batch_size,
        hook_name=args.hook, d_in=d_in, training_tokens=n_seq * ctx, context_size=ctx,
        new_cached_activations_path=str(path), dtype="float32", device="cpu", prepend_bos=False,
        buffer_size_gb=(args.shard_tokens * bytes_per_token + 0.5) / 1e9)   # one shard = shard_tokens rows, as sae_nb's
    if cfg.n_tokens_in_buffer != args.shard_tokens or (n_seq * ctx) % cfg.n_tokens_in_buffer:
        raise ValueError(f"shard of {cfg.n_tokens_in_buffer} tokens: --shard-tokens must be a multiple of "
                         f"model_batch_size * ctx and divide the {n_seq * ctx} tokens")
    ds = token_dataset(tokens)
    # CacheActivationsRunner loads its model by name (HookedTransformer.from_pretrained_no_processing); it is handed the
    # model built above instead, through the name its module calls. The rest of the run is SAELens's own code.
    real_load = sl_cache.load_model
    sl_cache.load_model = lambda **kw: model
    try:
        t0 = time.perf_counter()
        runner = sl_cache.CacheActivationsRunner(cfg, override_dataset=ds)
        cached = runner.run()
        seconds = time.perf_counter() - t0
    finally:
        sl_cache.load_model = real_load
    n_tokens = len(cached) * ctx
    return {"seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds, "n_shards": cfg.n_buffers,
            "bytes_on_disk": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}


def cached_read(model, args, ctx: int, d_in: int, n_tokens: int, path: Path) -> dict:
    "An ActivationsStore on the cache: batches pulled through its shuffling mixing buffer."
    t0 = time.perf_counter()
    store = ActivationsStore(model=model, dataset=None, streaming=False, cached_activations_path=str(path),
                             **store_kwargs(args, ctx, d_in, n_tokens))
    open_s = time.perf_counter() - t0
    first_s, seconds = time_batches(store, args.n_batches)
    return {"seconds": seconds, "tokens": args.n_batches * args.batch, "tokens_per_s": args.n_batches * args.batch / seconds,
            "open_s": open_s, "first_batch_s": first_s}


def in_memory(model, tokens, args, d_in: int) -> dict:
    "An ActivationsStore over the token dataset, no cache: model forwards, then its mixing buffer."
    n_seq, ctx = tokens.shape
    ds = token_dataset(tokens)
    t0 = time.perf_counter()
    store = ActivationsStore(model=model, dataset=ds, streaming=False, cached_activations_path=None,
                             **store_kwargs(args, ctx, d_in, n_seq * ctx))
    open_s = time.perf_counter() - t0
    first_s, seconds = time_batches(store, args.n_batches)
    return {"seconds": seconds, "tokens": args.n_batches * args.batch, "tokens_per_s": args.n_batches * args.batch / seconds,
            "open_s": open_s, "first_batch_s": first_s}


def forward_only(model, tokens, args) -> dict:
    "The model's forward to the hook (run_with_cache, as ActivationsStore.get_activations runs it) on the first windows."
    mbs = args.model_batch_size
    seqs = tokens[:args.forward_batches * mbs]
    hook_acts(model, seqs[:mbs], args.hook)                 # warm-up, not timed
    t0 = time.perf_counter()
    for a in range(0, len(seqs), mbs): hook_acts(model, seqs[a:a + mbs], args.hook)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": seqs.numel(), "tokens_per_s": seqs.numel() / seconds}


STAGES = ("cache_write", "cached_read", "in_memory", "forward")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="torch.save file written by bench_store.py")
    p.add_argument("--workdir", required=True, help="an empty directory for the cache (removed at the end)")
    p.add_argument("--hook", default="blocks.0.hook_resid_post")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--n-batches", type=int, default=48, help="batches timed after the first")
    p.add_argument("--buffer-tokens", type=int, default=16 * 4096)
    p.add_argument("--model-batch-size", type=int, default=32)
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--forward-batches", type=int, default=8, help="model batches of the forward-only stage")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed from sae_nb's activations")
    args = p.parse_args(argv)
    harness.setup("cpu")
    warnings.filterwarnings("ignore")          # SAELens warns that the dataset has fewer rows than tokens; it does
    datasets.disable_progress_bars()
    data = torch.load(args.data, weights_only=True)
    tokens = data["tokens"]
    t0 = time.perf_counter()
    model = hooked_transformer(data["config"], data["state"])
    build_s = time.perf_counter() - t0
    equivalence = check_equivalence(model, data, args.hook, args.atol)
    d_in = data["check_acts"].shape[1]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "saelens_cache"
    out = {}
    try:
        if "cache_write" in args.stages or "cached_read" in args.stages:
            out["cache_write"] = cache_write(model, tokens, args, d_in, cache)
        if "cached_read" in args.stages:
            out["cached_read"] = cached_read(model, args, tokens.shape[1], d_in, tokens.numel(), cache)
        if "in_memory" in args.stages:
            out["in_memory"] = in_memory(model, tokens, args, d_in)
        if "forward" in args.stages:
            out["forward"] = forward_only(model, tokens, args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(json.dumps({"impl": "saelens", "versions": VERSIONS, "model": "HookedTransformer (TransformerLens "
                      f"{VERSIONS['transformer-lens']}) with sae_nb's default weights", "model_build_s": build_s,
                      "equivalence": equivalence, "stages": {k: v for k, v in out.items() if k in args.stages}}))


if __name__ == "__main__":
    main()
