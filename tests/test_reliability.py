"""Bad input and faults never lose data or print a traceback (issue 12): output folders, the cache,
one-line errors, and a property-based fuzz of recipes and CLI arguments."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conftest import assert_one_error_line, quantize_tiny_folder
from gaq_backend.cli import main

import fuzz

QUANT_FILES = ["gaq-manifest.json", "held_out_inputs.safetensors", "inputs.json", "quantized_unet.safetensors", "recipe.yaml", "report.json", "samples.png",
               "scheduler_config.json", "unet_config.json"]


def _gaq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gaq_backend.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _gaq_in_process(*args):
    """``_gaq`` without the interpreter start (about 4 s a call): the same ``main``, its exit code and stderr."""
    import contextlib
    import io
    import types

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(list(args))
        except SystemExit as e:   # argparse exits
            rc = e.code
    return types.SimpleNamespace(returncode=rc, stderr=err.getvalue())


def _one_error_line(proc, *needles):
    return assert_one_error_line(proc.returncode, proc.stderr, *needles)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_dir):
    return quantize_tiny_folder(tmp_path_factory.mktemp("rel"), tiny_model_dir)


# ---------------------------------------------------------------------------------------------
# 1. --out never deletes what gaq did not write

@pytest.mark.parametrize("target,what", [(".", "the working directory"), ("..", "the working directory"),
                                         ("home", "the home folder"), ("model", "an input of this run"),
                                         ("cache", "an input of this run"), ("recipe_dir", "an input of this run")])
def test_out_refuses_protected_folders(quantized, tiny_model_dir, tmp_path, target, what):
    import shutil

    work, home, recipes = tmp_path / "work", tmp_path / "home", tmp_path / "recipes"
    for d in (work, home, recipes):
        d.mkdir()
    (work / "keep.txt").write_text("mine")
    recipe = recipes / "r.yaml"  # the recipe's folder holds neither the cache nor the model
    shutil.copy(quantized["recipe"], recipe)
    path = {".": ".", "..": "..", "home": str(home), "model": tiny_model_dir,
            "cache": str(quantized["root"] / "cache"), "recipe_dir": str(recipes)}[target]
    proc = subprocess.run([sys.executable, "-m", "gaq_backend.cli", "quantize", str(recipe), "--out", path, "--overwrite", "--quiet"],
                          capture_output=True, text=True, cwd=work, timeout=300, env={**os.environ, "HOME": str(home)})
    _one_error_line(proc, "which gaq never writes over", what)
    assert (work / "keep.txt").read_text() == "mine" and sorted(os.listdir(work)) == ["keep.txt"]


def test_out_refuses_a_foreign_folder_and_overwrite_keeps_its_files(quantized, tmp_path):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "x").write_text("mine too")
    proc = _gaq("quantize", quantized["recipe"], "--out", str(user), "--quiet")
    _one_error_line(proc, str(user), "--overwrite")
    assert sorted(os.listdir(user)) == ["notes.txt", "sub"]
    (user / "report.json").write_text("my report")  # same name as a gaq file: refused, even with --overwrite
    _one_error_line(_gaq("quantize", quantized["recipe"], "--out", str(user), "--quiet", "--overwrite"), "report.json", "did not write")
    (user / "report.json").unlink()
    assert main(["quantize", quantized["recipe"], "--out", str(user), "--quiet", "--overwrite"]) == 0
    assert sorted(os.listdir(user)) == sorted(QUANT_FILES + ["notes.txt", "sub"])
    assert (user / "notes.txt").read_text() == "mine" and (user / "sub" / "x").read_text() == "mine too"
    # once gaq's manifest is there, a rerun replaces gaq's files without --overwrite, and only those
    assert main(["quantize", quantized["recipe"], "--out", str(user), "--quiet"]) == 0
    assert (user / "notes.txt").read_text() == "mine"
    assert set(json.loads((user / "gaq-manifest.json").read_text())["files"]) == set(QUANT_FILES) - {"gaq-manifest.json"}


def test_rerun_replaces_only_gaq_files_and_drops_stale_ones(quantized, tmp_path):
    out = tmp_path / "o"
    assert main(["quantize", quantized["recipe"], "--out", str(out), "--quiet"]) == 0
    (out / "my-notes.md").write_text("user file inside an output")
    from gaq_backend.utils.io import add_to_output
    (out / "eval.json").write_text("{}")
    add_to_output(str(out), ["eval.json"])  # as gaq eval does
    assert main(["quantize", quantized["recipe"], "--out", str(out), "--quiet"]) == 0
    assert (out / "my-notes.md").exists() and not (out / "eval.json").exists()  # stale eval of the old model is gone
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-gaq")] == []


def test_file_where_folder_expected_and_reverse(quantized, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_error_line(_gaq("quantize", quantized["recipe"], "--out", str(f), "--quiet"), "is a file")
    _one_error_line(_gaq("quantize", quantized["recipe"], "--out", str(f / "below"), "--quiet"), "is a file, not a folder")
    _one_error_line(_gaq("export", str(quantized["out"]), "--out", str(f / "m.onnx")), "is a file, not a folder")
    _one_error_line(_gaq("export", str(quantized["out"]), "--out", str(tmp_path)), "is a folder")
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_interrupted_replacement_is_refused_by_readers_and_replaced_by_a_rerun(quantized, tmp_path, monkeypatch):
    import gaq_backend.utils.io as gio
    from gaq_backend import load_quantized

    out = tmp_path / "o"
    assert main(["quantize", quantized["recipe"], "--out", str(out), "--quiet"]) == 0
    real_replace = os.replace
    old_report = (out / "report.json").read_bytes()
    moved = []

    def dying_replace(src, dst):
        if os.path.basename(dst) == "recipe.yaml" and os.path.dirname(dst) == str(out):
            raise KeyboardInterrupt  # killed while the files move in (after those sorted before recipe.yaml)
        moved.append(os.path.basename(dst))
        return real_replace(src, dst)
    monkeypatch.setattr(gio.os, "replace", dying_replace)
    assert main(["quantize", quantized["recipe"], "--out", str(out), "--quiet", "--set", "report.seed=7"]) == 130
    monkeypatch.setattr(gio.os, "replace", real_replace)
    assert "quantized_unet.safetensors" in moved and (out / "report.json").read_bytes() == old_report
    assert json.loads((out / "gaq-manifest.json").read_text())["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        load_quantized(str(out))
    assert main(["quantize", quantized["recipe"], "--out", str(out), "--quiet"]) == 0
    load_quantized(str(out))


def test_export_refuses_to_replace_a_foreign_file_but_replaces_its_own(quantized, tmp_path):
    user = tmp_path / "model.onnx"
    user.write_text("someone's model")
    _one_error_line(_gaq("export", str(quantized["out"]), "--out", str(user), "--check-samples", "4"), "--overwrite")
    assert user.read_text() == "someone's model"
    out = tmp_path / "q.onnx"
    for _ in range(2):  # the second export replaces the first: it is gaq's
        assert main(["export", str(quantized["out"]), "--out", str(out), "--check-samples", "4", "--quiet"]) == 0


# ---------------------------------------------------------------------------------------------
# 2. The cache heals itself

def test_corrupt_calibration_cache_is_reported_removed_and_recomputed(quantized, tmp_path, capsys):
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.models import load_unet
    from gaq_backend.recipe import load_recipe

    r = load_recipe(quantized["recipe"], [f"calibration.cache_dir={tmp_path}"])
    unet = load_unet(r.model)
    sched = json.load(open(os.path.join(r.model, "scheduler_config.json")))
    first, cached = capture_calibration(unet, sched, r.sampler, r.calibration, progress=False)
    (entry,) = tmp_path.glob("calib-*.safetensors")
    for damage in (lambda b: b[: len(b) // 2], lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b"junk"):
        entry.write_bytes(damage(entry.read_bytes()) if entry.exists() else b"junk")
        capsys.readouterr()
        again, cached = capture_calibration(unet, sched, r.sampler, r.calibration, progress=False)
        err = capsys.readouterr().err
        assert not cached and torch.equal(again.x, first.x)
        assert err.count("\n") == 1 and str(entry) in err and "removing it and recomputing" in err
    assert capture_calibration(unet, sched, r.sampler, r.calibration, progress=False)[1]  # healed: a hit again


def test_stale_temporaries_of_dead_runs_are_cleaned_live_ones_kept(tmp_path):
    from gaq_backend.utils.cache import prepare_cache_dir
    from gaq_backend.utils.io import _host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    host = _host_tag()
    try:
        (tmp_path / f".tmp-gaq-{host}.{dead.pid}-calib-x").write_text("partial")
        (tmp_path / f".tmp-gaq-{host}.{dead.pid}-out-y").mkdir()
        keep = [f".tmp-gaq-{host}.{live.pid}-calib-z", f".tmp-gaq-0other0.{dead.pid}-calib-w", ".tmp-user-file"]
        for name in keep:  # a live writer's, another machine's (its pids mean nothing here), not gaq's
            (tmp_path / name).write_text("keep")
        prepare_cache_dir(str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    finally:
        live.kill()


def test_nan_model_is_refused_before_anything_is_cached(tiny_model_dir, tmp_path):
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.models import load_unet

    unet = load_unet(tiny_model_dir)
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    sched = json.load(open(os.path.join(tiny_model_dir, "scheduler_config.json")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        capture_calibration(unet, sched, SamplerConfig(num_inference_steps=4), CalibrationConfig(n_per_step=4, interval=1, n_groups=2,
                            val_fraction=0.25, cache_dir=str(tmp_path)), progress=False)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 3. Every bad input is one line, before any long work

@pytest.mark.parametrize("text,needle", [
    ("a: &x [*x]\n", "aliases"),
    ("model: embedded\nmodel: embedded\nalgorithm: minmax\n", "duplicate key 'model'"),
    ("a: " + "[" * 300 + "]" * 300 + "\n", "nested deeper"),
    (b"model: embedded\nalgorithm: minmax\nname: \xff\n", "not UTF-8"),
    ("model: embedded\nalgorithm: uniform\nsettings: {lr: .inf}\n", "settings.lr must be a number > 0; got inf"),
    ("model: embedded\nalgorithm: uniform\nsettings: {reg_weight: -1}\n", "settings.reg_weight must be a number >= 0"),
    ("model: embedded\nalgorithm: uniform\nsettings: {beta_start: 0}\n", "settings.beta_start must be a number > 0"),
    ("model: embedded\nalgorithm: uniform\nsettings: {iters: -5}\n", "settings.iters must be an integer >= 0"),
    ("model: embedded\nalgorithm: gradient_aligned\nsettings: {init_logit: .nan}\n", "settings.init_logit must be a finite number"),
    ("model: embedded\nalgorithm: minmax\ncalibration: {cache_dir: ''}\n", "calibration.cache_dir must name a folder"),
    ("model: embedded\nalgorithm: minmax\nname: a/b\n", "name must be a plain name"),
    ("model: embedded\nalgorithm: minmax\ncalibration: {seed: 5000000000}\n", "calibration.seed must be an integer in [0, 4294967295]"),
    ("model: embedded\nalgorithm: minmax\ncalibration: {n_per_step: 2, val_fraction: 0.9}\n", "leaves no training sample"),
    ("model: embedded\nalgorithm: minmax\ncalibration: {n_groups: 20}\n", "calibration.n_groups=20 exceeds the 10 recorded steps"),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, needle):
    p = tmp_path / "r.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    _one_error_line(_gaq("quantize", str(p), "--out", str(tmp_path / "o"), "--quiet"), needle)
    assert not (tmp_path / "o").exists()


def test_bad_inputs_that_need_the_model_or_files(quantized, tmp_path):
    q = str(quantized["out"])
    _one_error_line(_gaq_in_process("quantize", quantized["recipe"], "--set", "quantization.keep_fp=[conv_ina]", "--out", str(tmp_path / "o")),
                    "keep_fp entry 'conv_ina' matches no layer", "closest: conv_in")
    _one_error_line(_gaq_in_process("quantize", quantized["recipe"], "--set", "settings=[1", "--out", str(tmp_path / "o")), "--set settings: not valid YAML")
    (tmp_path / "cachefile").write_text("x")
    _one_error_line(_gaq_in_process("quantize", quantized["recipe"], "--set", f"calibration.cache_dir={tmp_path / 'cachefile'}", "--out",
                         str(tmp_path / "o")), "cache_dir", "is a file")
    _one_error_line(_gaq_in_process("quantize", quantized["recipe"], "--set", "report.num_samples=2000000000", "--out", str(tmp_path / "o")),
                    "report.num_samples", "free memory")
    # broken quantized folders given to export / eval
    import shutil
    for name, damage, needle in (("trunc", "truncate", "not a readable safetensors file"), ("mism", "mismatch", "does not fit the model")):
        d = tmp_path / name
        shutil.copytree(q, d)
        if damage == "truncate":
            w = d / "quantized_unet.safetensors"
            w.write_bytes(w.read_bytes()[:100])
        else:
            cfg = json.loads((d / "unet_config.json").read_text())
            cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
            (d / "unet_config.json").write_text(json.dumps(cfg))
        _one_error_line(_gaq_in_process("export", str(d), "--out", str(tmp_path / "m.onnx")), needle)
        _one_error_line(_gaq_in_process("eval", str(d), "--num-samples", "4"), needle)
    (tmp_path / "g.onnx").write_bytes(b"\x00garbage" * 20)
    _one_error_line(_gaq_in_process("sample", "--onnx", str(tmp_path / "g.onnx"), "--out", str(tmp_path / "s.png")), "not a loadable ONNX model")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.onnx").exists() and not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("args,needle", [
    (["sample", "--onnx", "x.onnx", "--steps", "0"], "--steps: must be an integer in [1, 1000]; got 0"),
    (["sample", "--onnx", "x.onnx", "--eta", "nan"], "--eta: must be a number in [0, 1]; got nan"),
    (["sample", "--onnx", "x.onnx", "--seed", str(2**64)], "--seed: must be an integer in [0, 4294967295]"),
    (["eval", "d", "--num-samples", "3"], "--num-samples: must be an integer in [4,"),
    (["train", "--lr", "inf"], "--lr: must be a number"),
])
def test_bad_arguments_are_one_line_errors(args, needle, tmp_path):
    _one_error_line(_gaq(*args, cwd=tmp_path), needle)


def test_a_bug_inside_gaq_is_one_line_with_the_debug_hint(quantized, tmp_path, monkeypatch, capsys):
    import gaq_backend.pipeline as pipeline

    def bug(*a, **k):
        raise KeyError("a bug")
    monkeypatch.setattr(pipeline, "noise_mse", bug)
    assert main(["quantize", quantized["recipe"], "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: KeyError" in err[0] and "--debug" in err[0]
    with pytest.raises(KeyError):
        main(["quantize", quantized["recipe"], "--out", str(tmp_path / "o"), "--quiet", "--debug"])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# 4. Property-based: mutated recipes and CLI arguments

FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))


def test_fuzz_recipes_and_every_subcommand(quantized, tiny_model_dir, tmp_path):
    import fuzz_inputs

    env = fuzz.Env.create(str(tmp_path), tiny_model_dir)
    onnx_path = str(tmp_path / "tiny.onnx")
    assert main(["export", str(quantized["out"]), "--out", onnx_path, "--check-samples", "4", "--quiet"]) == 0
    inputs = fuzz_inputs.make_inputs(env.root, str(quantized["out"]), onnx_path)
    optimum = fuzz_inputs.make_optimum_dirs(env.root, str(quantized["out"]))
    skipped = fuzz.mount_faulty_folders(env)  # a full and a read-only filesystem, where this process may mount
    budget = [3]

    @given(case=fuzz.recipe_cases())
    def recipes(case):
        fuzz.check_recipe_case(env, case, budget)

    pools = fuzz.cli_pools(env, inputs, optimum, slow=False)
    try:
        settings(FUZZ, max_examples=int(os.environ.get("GAQ_FUZZ_RECIPES", 60)))(recipes)()
        fuzz.fuzz_every_subcommand(env, pools, int(os.environ.get("GAQ_FUZZ_CLI", 15)), FUZZ)
    finally:
        fuzz.unmount_faulty_folders(env)
    print(f"fuzz: {env.n_cases} cases, {env.n_ok} exit 0 ({env.n_complete} complete outputs checked), "
          f"{env.n_rejected} rejected, {len(env.failures)} failures; per command {env.per_command}; not mounted: {skipped}")
    assert env.failures == [], json.dumps(env.failures[:3], indent=1)
    assert env.n_rejected > 0 and env.n_ok > 0 and env.n_complete > 0
    assert set(env.per_command) == {"quantize", "export", "sample", "eval", "bench", "train"}
