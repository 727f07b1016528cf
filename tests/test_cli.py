"""The `sae-nb` command: a tiny sweep writes the report, bad options exit 2, `eval` reads a saved SAE back.

The default model's weights may be absent (while they are being trained); the sweep then runs on an
untrained model of the same architecture, which exercises the same code path."""
import dataclasses
import json
import subprocess
import sys

import pytest

import sae_nb.sweep
from sae_nb.cli import TRAIN_SET_BY_CLI, field_comments, main
from sae_nb.train import TrainConfig, lr_factor
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


def test_train_help_lists_every_field(capsys, monkeypatch):
    "`sae-nb train --help`: an option for every TrainConfig field, with its comment and default; the rest named as set by the command."
    monkeypatch.setenv("COLUMNS", "1000")          # one line per option: comments are not wrapped
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines, key = {}, None                          # option -> its help entry (an entry may go on over two lines)
    for line in text.splitlines():
        if line.strip().startswith("--"): key = line.split()[0]
        elif not line.startswith("      "): key = None
        if key: lines[key] = " ".join([lines.get(key, ""), line.strip()])
    comments, _ = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAIN_SET_BY_CLI:
            assert f.name in text.split("Not options:")[1], f.name
            continue
        line = lines[f"--{f.name.replace('_', '-')}"] if f.type != "bool" else lines[f"--{f.name.replace('_', '-')},"]
        assert comments[f.name] and comments[f.name] in line and "(default: " in line, (f.name, line)   # every field commented
    assert "--tokens" in lines["--total-tokens"] and "--l0" in lines["--target-l0"] and "--l1" in lines["--l1-coefficient"]


def test_train_sets_fields_without_a_flag_before(report, tmp_path):
    "Fields `sae-nb train` did not reach before (lr_decay, adam_betas, converge_tol, log_every, history_path, the SAE's threshold_momentum) take effect."
    out, history = tmp_path / "run", tmp_path / "history.jsonl"
    assert main(["train", "--variant", "topk", "--k", "4", "--tokens", "4096", "--batch-size", "256", "--d-sae", "128",
                 "--lr-decay", "0.3", "--adam-betas", "0.8", "0.99", "--converge-tol", "0.05", "--log-every", "1",
                 "--no-stop-when-converged",
                 "--history-path", str(history), "--threshold-momentum", "0.5",
                 "--cache", str(report / "activations"), "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "train_config.json").read_text())
    assert (cfg["lr_decay"], cfg["adam_betas"], cfg["converge_tol"], cfg["log_every"], cfg["stop_when_converged"]) == \
        (0.3, [0.8, 0.99], 0.05, 1, False)
    assert cfg["d_in"] > 0 and cfg["d_sae"] == 128 and cfg["k"] == 4 and cfg["progress"] is False
    sae_cfg = json.loads((out / "config.json").read_text())      # SAE fields and provenance reach the SAE at construction
    assert sae_cfg["threshold_momentum"] == 0.5 and sae_cfg["hook_name"] == sae_nb.sweep.DEFAULT_HOOK
    lrs = [json.loads(line)["lr"] for line in history.read_text().splitlines()]
    steps = 4096 // 256
    assert len(lrs) == steps and lrs[0] == pytest.approx(3e-3)           # one entry per step
    assert lrs == pytest.approx([3e-3 * lr_factor(s, steps, 0, 0.3) for s in range(steps)])   # decays over 30% of the run
    assert lrs != pytest.approx([3e-3 * lr_factor(s, steps, 0, 0.2) for s in range(steps)])   # not the default 20%


def test_train_help_lists_every_saeconfig_field(capsys, monkeypatch):
    "TrainConfig is built on SAEConfig: every SAEConfig field is a `sae-nb train` option with SAEConfig's comment, but d_in and the provenance."
    from sae_nb.sae import SAEConfig
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flags = {line.split()[0].rstrip(",") for line in out.splitlines() if line.strip().startswith("--")}
    text = " ".join(out.split())                    # the help, its line breaks undone
    sae_comments = field_comments(SAEConfig)[0]
    for f in dataclasses.fields(SAEConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("d_in", "hook_name", "model_name"): assert flag not in flags, flag
        else:
            assert flag in flags, flag
            after = text[text.index(flag + " "):]
            assert sae_comments[f.name] in after[:60 + len(sae_comments[f.name])], flag   # its help: SAEConfig's comment


def test_d_sae_default_comment_help_and_code_agree(report, tmp_path, capsys, monkeypatch):
    "TrainConfig.d_sae None is DEFAULT_D_SAE_FACTOR x d_in, as its comment and help say; `sae-nb train` without --d-sae takes the sweep's width."
    from sae_nb.train import DEFAULT_D_SAE_FACTOR
    _, sections = field_comments(TrainConfig)
    assert f"d_sae None: {DEFAULT_D_SAE_FACTOR} d_in" in sections["target_l0"]   # TrainConfig's note on the SAE fields above
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--d-sae"))
    assert f"default: {sae_nb.sweep.D_SAE_FACTOR} x d_in" in help_line and f"none: {DEFAULT_D_SAE_FACTOR} x d_in" in help_line
    widths = {}
    for name, extra in (("absent", []), ("none", ["--d-sae", "none"])):
        out = tmp_path / name
        assert main(["train", "--variant", "topk", "--k", "4", "--tokens", "512", "--batch-size", "256", *extra,
                     "--cache", str(report / "activations"), "--out", str(out), "--no-progress"]) == 0
        cfg = json.loads((out / "train_config.json").read_text())
        widths[name] = cfg["d_sae"] / cfg["d_in"]
    assert widths == {"absent": sae_nb.sweep.D_SAE_FACTOR, "none": DEFAULT_D_SAE_FACTOR}


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--variants", "relu,topkk"], "unknown variant"),
    (["sweep", "--hook", "blocks.7.hook_resid_post"], "hook_name"),
    (["sweep", "--model", "./no/such/model"], "model"),
    (["train", "--variant", "nope"], "unknown variant"),
    (["train", "--variant", "topk", "--l0", "7.5"], "integer"),
    (["train", "--lr-decay", "1.5"], "--lr-decay (TrainConfig.lr_decay): expected a fraction of the run in [0, 1), got 1.5"),
    (["train", "--converge-tol", "abc"], "argument --converge-tol: expected a float, got 'abc'"),
    (["train", "--adam-betas", "0.9"], "argument --adam-betas: expected 2 arguments"),
    (["train", "--adam-betas", "0.9", "1.5"], "--adam-betas (TrainConfig.adam_betas): expected two numbers in [0, 1)"),
    (["train", "--threshold-init", "-1"], "--threshold-init (TrainConfig.threshold_init): expected a finite number > 0"),
    (["train", "--variant", "matryoshka", "--d-sae", "64", "--matryoshka-prefixes", "8", "32"],
     "--matryoshka-prefixes (TrainConfig.matryoshka_prefixes): expected strictly increasing sizes ending at d_sae=64"),
    (["train", "--dtype", "int8"], "--dtype (TrainConfig.dtype): expected a floating torch dtype name"),
    (["train", "--variant", "relu", "--aux-k", "0"], "--aux-k (TrainConfig.aux_k): expected an int >= 1"),
    (["train", "--variant", "topk", "--k", "4", "--l0", "8"], "give one of them"),
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
