"Tests of sae_nb.inspect: the streaming top-k merge against a brute force, escaping, logit effects, the CLI's errors, and the dashboard page opened in headless Chromium."
import dataclasses
import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from sae_nb.data import hook_activations
from sae_nb.inspect import (byte_label, format_context, hist_bin, inspect_main, json_for_script, latent_activations,
                            latent_contexts, logit_effect, topk_merge, write_dashboard)
from sae_nb.lm import default_tokens, load_model
from sae_nb.sae import make_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("default", device="cpu")


@pytest.fixture(scope="module")
def small(model):
    "A random 48-latent TopK SAE on the default hook, 10 windows of 48 tokens, and the measured statistics."
    sae = make_sae("topk", d_in=128, d_sae=48, k=4, seed=1, hook_name=HOOK)
    tokens = default_tokens(10, 48, seed=3, split="val")
    stats = latent_activations(model, sae, HOOK, tokens, batch_size=3, n_top=6, before=5, after=2)
    latents = sae.encode(hook_activations(model, tokens, HOOK)).view(10, 48, 48)
    return sae, tokens, stats, latents


@pytest.mark.parametrize("n,m,batches", [(1, 1, 5), (4, 7, 6), (6, 3, 4), (8, 8, 1)])
def test_topk_merge_matches_brute_force(n, m, batches):
    "Merging per-batch candidates into n kept slots gives the top n of everything, with the right indices and extras."
    g = torch.Generator().manual_seed(n * 100 + m)
    d = 5
    values, index = torch.full((d, n), -math.inf), torch.full((d, n), -1)
    extra = torch.zeros(d, n, 2)
    seen_v, seen_i = [], []
    for b in range(batches):
        v = torch.randn(d, m, generator=g)
        i = torch.randint(0, 10**6, (d, m), generator=g)
        values, index, extra = topk_merge(values, index, v, i, extra, torch.stack([v, i.float()], -1))
        seen_v.append(v), seen_i.append(i)
    all_v, all_i = torch.cat(seen_v, 1), torch.cat(seen_i, 1)
    k = min(n, all_v.shape[1])
    top, where = all_v.topk(k, dim=1)
    assert torch.equal(values[:, :k], top)
    assert torch.equal(index[:, :k], all_i.gather(1, where))
    assert torch.equal(extra[:, :k, 0], top) and torch.equal(extra[:, :k, 1], all_i.gather(1, where).float())
    if n > k: assert torch.isinf(values[:, k:]).all()


def test_latent_activations_matches_brute_force(small):
    "Top values, their locations, firing counts, histogram counts and the stored windows agree with the dense latents."
    sae, tokens, stats, lat = small
    flat = lat.flatten(0, 1).T                                       # [d_sae, rows]
    fired = (flat > 0).sum(1)
    assert torch.equal(stats.fired, fired) and stats.n_tokens == 480
    assert torch.equal(stats.hist.sum(1), fired)
    assert torch.allclose(stats.density, fired.double() / 480)
    top = flat.topk(6, dim=1).values.clamp(min=0)
    assert torch.allclose(stats.values, top)
    for i in range(48):
        for j in range(6):
            if stats.values[i, j] == 0:
                assert stats.seq[i, j] == -1 and stats.pos[i, j] == -1
                continue
            s, p = int(stats.seq[i, j]), int(stats.pos[i, j])
            assert torch.isclose(lat[s, p, i], stats.values[i, j])
            for o in range(-5, 3):
                q = p + o
                w_tok, w_act = stats.window_tokens[i, j, o + 5], stats.window_acts[i, j, o + 5]
                if 0 <= q < 48:
                    assert w_tok == tokens[s, q] and torch.isclose(w_act, lat[s, q, i])
                else:
                    assert w_tok == -1 and torch.isnan(w_act)
    # the histogram of one latent against bins counted directly
    i = int(fired.argmax())
    nz = flat[i][flat[i] > 0]
    assert torch.equal(stats.hist[i], torch.bincount(hist_bin(nz), minlength=stats.hist.shape[1]))


def test_contexts(small):
    "A context's tokens are the window's bytes, its mark is the example, and it is cut at the window's edges."
    sae, tokens, stats, lat = small
    i = int(stats.fired.argmax())
    for c in latent_contexts(stats, i, 6):
        start = c["pos"] - c["mark"]
        assert c["tokens"] == tokens[c["seq"], start:start + len(c["tokens"])].tolist()
        assert math.isclose(c["acts"][c["mark"]], c["value"], rel_tol=1e-3)
        assert c["mark"] == min(5, c["pos"]) and len(c["tokens"]) == c["mark"] + 1 + min(2, 47 - c["pos"])
    assert format_context(dict(tokens=list(b'x"\n<'), mark=2, value=2.5)) == '  2.500  x"⟦⏎⟧<'
    with pytest.raises(ValueError, match="latent"): latent_contexts(stats, 48)


def test_byte_labels():
    assert [byte_label(b) for b in b" \n\t\r'a~"] == ["␣", "\\n", "\\t", "\\r", "'", "a", "~"]
    assert byte_label(0) == "\\x00" and byte_label(0xff) == "\\xff" and byte_label(127) == "\\x7f"
    with pytest.raises(ValueError): byte_label(256)


def test_json_for_script_escapes():
    "Nothing in the data can close the script element or start markup, and the JSON round-trips."
    obj = {"a": '</script><script>alert("x")</script>', "b": "&amp; <!-- \u2028\u2029 'q' \\ \n", "c": ["\"", None, 1.5]}
    s = json_for_script(obj)
    assert not set("<>&\u2028\u2029") & set(s)
    assert json.loads(s) == obj


def test_logit_effect_shape_and_order(model):
    "One value per token, the direct path by hand, the lists sorted and labelled."
    sae = make_sae("topk", d_in=128, d_sae=16, k=2, seed=0, act_scale=2.0)
    eff = logit_effect(model, sae, 5, k=7)
    assert eff["values"].shape == (256,)
    d = sae.W_dec[5].detach() / 2.0
    gamma = model.ln_final._original_component.weight.detach()
    expected = ((d - d.mean()) * gamma) @ model.W_U.detach()
    assert torch.allclose(eff["values"], expected, atol=1e-5)
    ups, downs = eff["promoted"], eff["suppressed"]
    assert len(ups) == len(downs) == 7
    assert [v for *_, v in ups] == sorted((v for *_, v in ups), reverse=True)
    assert [v for *_, v in downs] == sorted(v for *_, v in downs)
    assert ups[0][0] == int(expected.argmax()) and downs[0][0] == int(expected.argmin())
    assert all(lab == byte_label(t) for t, lab, _ in ups + downs)
    with pytest.raises(ValueError, match="latent"): logit_effect(model, sae, 16)
    with pytest.raises(ValueError, match="d_in=64"): logit_effect(model, make_sae("topk", d_in=64, d_sae=8, k=1), 0)


def test_cli_errors(tmp_path, model, capsys):
    "A missing directory, an unknown hook and a width mismatch are usage errors (exit 2) with a clear message."
    with pytest.raises(SystemExit) as e: inspect_main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "no such directory" in capsys.readouterr().err
    make_sae("topk", d_in=128, d_sae=8, k=1, seed=0).save(tmp_path / "sae")
    with pytest.raises(SystemExit) as e: inspect_main([str(tmp_path / "sae"), "--hook", "blocks.0.hook_resid_pots"])
    assert e.value.code == 2 and "nearest valid names" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: inspect_main([str(tmp_path / "sae"), "--hook", "blocks.0.mlp.hook_post"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "d_in=128" in err and "512 wide" in err
    make_sae("topk", d_in=512, d_sae=8, k=1, seed=0, hook_name="blocks.0.mlp.hook_post").save(tmp_path / "mlp")
    assert inspect_main([str(tmp_path / "mlp"), "--tokens", "128"]) == 0   # the hook comes from the SAE's config
    page = (tmp_path / "mlp" / "dashboard.html").read_text()
    assert "blocks.0.mlp.hook_post" in page and '"up"' not in page          # no logit effects for a 512-wide hook


def _chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _dump_dom(browser, path) -> str:
    cmd = [browser, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_dashboard_in_headless_chromium(tmp_path, model, small):
    "The page renders offline: latents listed, contexts and the histogram drawn for the selected one, no script error."
    browser = _chromium()
    if browser is None: pytest.skip("no chromium binary found (apt-get install -y chromium)")
    sae, tokens, stats, _ = small
    stats = dataclasses.replace(stats, window_tokens=stats.window_tokens.clone(), window_acts=stats.window_acts.clone())
    # the first latent shown (the largest max activation) gets a context full of markup and quotes: it must come out as text
    top = int(stats.max_act.argmax())
    stats.window_tokens[top, 0, :8] = torch.tensor(list(b'</b>"&\'\n'))
    stats.window_acts[top, 0, :8] = 1.0
    out = write_dashboard(sae, tmp_path / "page.html", model=model, hook_name=HOOK, stats=stats, name='a "name" <x>')
    page = out.read_text()
    assert not re.search(r'(src|href)\s*=|url\(|@import', page)
    assert not list(tmp_path.glob(".*.tmp"))                                # the temporary file was moved into place
    dom = _dump_dom(browser, out)
    errors = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert errors is not None and errors.group(1) == "", errors.group(1) if errors else dom[:500]
    assert 'data-ready="1"' in dom
    assert len(re.findall(r'class="latent-item', dom)) == 48
    assert len(re.findall(r'<div class="ctx"', dom)) == min(8, int((stats.values[top] > 0).sum()))
    assert "<rect" in dom and 'class="b mark"' in dom and "promoted" in dom
    main = dom.split('<div id="main">')[1].split('<script type="application/json"')[0]
    for byte_text in ("&lt;", "&gt;", "&amp;", '"', "'", "⏎"):     # one span per byte, drawn as text
        assert f">{byte_text}</span>" in main, byte_text
    assert "<b>" not in main and "</b>" not in main                     # the context's markup made no element
    # the onerror hook does report a failure: the same page with its data corrupted
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace('<script type="application/json" id="data">{', '<script type="application/json" id="data">{{'))
    dom = _dump_dom(browser, broken)
    assert "JS error" in re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S).group(1)


def test_sae_nb_inspect_subcommand(tmp_path):
    "`sae-nb inspect DIR` (the package's console entry point) writes the page for a saved SAE."
    from sae_nb.cli import main
    make_sae("topk", d_in=128, d_sae=8, k=1, seed=0, hook_name=HOOK).save(tmp_path / "sae")
    out = tmp_path / "page.html"
    assert main(["inspect", str(tmp_path / "sae"), "--tokens", "256", "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype html"), page[:80]
    import re
    assert HOOK in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", page)  # nothing fetched
