"""The `sae-nb` command: a tiny sweep writes the report, bad options exit 2, `eval` reads a saved SAE back.

The default model's weights may be absent (while they are being trained); the sweep then runs on an
untrained model of the same architecture, which exercises the same code path."""
import json
import subprocess
import sys

import pytest

import sae_nb.sweep
from sae_nb.cli import main
from sae_nb.lm import WEIGHTS_DIR, build_default_model

TINY = ["--l0", "8", "--tokens", "2048", "--d-sae", "256", "--fast", "--no-progress"]


@pytest.fixture(scope="module")
def default_model():
    if (WEIGHTS_DIR / "default.safetensors").is_file():
        yield None
        return
    mp = pytest.MonkeyPatch()
    model = build_default_model(seed=0)
    mp.setattr(sae_nb.sweep, "load_model", lambda name, device=None: model if name == "default" else sae_nb.lm.load_model(name, device))
    yield model
    mp.undo()


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_model):
    out = tmp_path_factory.mktemp("cli") / "report"
    assert main(["sweep", "--variants", "topk,relu", *TINY, "--out", str(out)]) == 0
    return out


def test_sweep_writes_report(report):
    for f in ("report.md", "metrics.json", "pareto_fvu_l0.png", "pareto_delta_ce_l0.png"):
        assert (report / f).is_file(), f
    runs = json.loads((report / "metrics.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["topk_l0_8_seed0", "relu_l0_8_seed0"]
    assert all(0 <= r["fvu"] and r["l0"] > 0 for r in runs)
    for r in runs:
        assert (report / "saes" / r["name"] / "model.safetensors").is_file()
        assert (report / "saes" / r["name"] / "config.json").is_file()
    text = (report / "report.md").read_text()
    assert "![FVU vs L0](pareto_fvu_l0.png)" in text
    assert text.startswith("# SMOKE TEST") and "numbers without meaning" in text        # --fast says what it is
    for column in ("l0_target", "fvu", "delta_ce", "converged", "flags"):                # every column explained
        assert f"- `{column}`:" in text, column


def test_eval_saved_sae(report, capsys):
    assert main(["eval", str(report / "saes" / "topk_l0_8_seed0"), "--eval-seq", "2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["variant"] == "topk" and m["l0"] <= 8 + 1e-9 and "delta_ce" in m


def test_train_on_cache(report, tmp_path, capsys):
    out = tmp_path / "one"
    assert main(["train", "--variant", "topk", "--k", "4", "--tokens", "2048", "--d-sae", "128", "--cache",
                 str(report / "activations"), "--out", str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "metrics.json").read_text())["l0"] <= 4 + 1e-9


def test_sweep_seeds_and_lr_grid(tmp_path, default_model):
    out = tmp_path / "report"
    assert main(["sweep", "--variants", "topk", "--seeds", "2", "--lr", "3e-3,1e-2", *TINY, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in metrics["runs"]] == ["topk_l0_8_seed0", "topk_l0_8_seed1"]
    assert [p["lr"] for p in metrics["lr_pick"]] == [3e-3, 1e-2] and sum(p["picked"] for p in metrics["lr_pick"]) == 1
    assert len({r["lr"] for r in metrics["runs"]}) == 1


def test_train_steers_a_coefficient_variant_to_l0(report, tmp_path):
    out = tmp_path / "relu"
    assert main(["train", "--variant", "relu", "--l0", "6", "--tokens", "2048", "--batch-size", "256", "--d-sae", "128",
                 "--cache", str(report / "activations"), "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["variant"] == "relu" and m["converged"] in (True, False)
    assert json.loads((out / "config.json").read_text())["l1_coefficient"] != 2.0   # steered away from the default


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--variants", "relu,topkk"], "unknown variant"),
    (["sweep", "--hook", "blocks.7.hook_resid_post"], "hook_name"),
    (["sweep", "--model", "./no/such/model"], "model"),
    (["train", "--variant", "nope"], "unknown variant"),
    (["train", "--variant", "topk", "--l0", "7.5"], "integer"),
    (["sweep", "--seeds", "0"], "--seeds"),
    (["eval", "/no/such/sae"], "no saved SAE"),
])
def test_bad_options_exit_2(argv, message, default_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, *(["--out", str(tmp_path / "x")] if argv[0] != "eval" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sae-nb ") and message in err
    assert not (tmp_path / "x").exists()


def test_console_script_bad_variant():
    "The installed `sae-nb` entry point itself: stderr message and exit code 2."
    r = subprocess.run([sys.executable, "-c", "import sys; from sae_nb.cli import main; sys.exit(main())", "sweep",
                        "--variants", "bogus"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown variant" in r.stderr
