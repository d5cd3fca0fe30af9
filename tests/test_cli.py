import json
import os
import subprocess
import sys

import pytest

from gaq_backend import load_quantized
from gaq_backend.cli import main

REPORT_KEYS = {"algorithm", "w_bits", "a_bits", "metrics", "timings"}


def _gaq(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gaq_backend.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_quantize_end_to_end_writes_a_reloadable_folder(write_recipe, tmp_path):
    recipe = write_recipe(report=dict(num_samples=4, grid=4, batch_size=4))  # the defaults: sensitivity measured
    out = tmp_path / "out"
    assert main(["quantize", recipe, "--out", str(out), "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["gaq-manifest.json", "held_out_inputs.safetensors", "inputs.json", "quantized_unet.safetensors", "recipe.yaml", "report.json", "samples.png",
                                      "scheduler_config.json", "unet_config.json"]
    rep = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(rep) and rep["algorithm"] == "minmax" and (rep["w_bits"], rep["a_bits"]) == (4, 8)
    m = rep["metrics"]
    assert m["noise_mse"] > 0 and m["sample_mse_vs_fp"] > 0 and len(m["noise_mse_per_group"]) == 5
    assert {"capture", "calibration", "total"} <= set(rep["timings"])
    assert rep["timings"]["total"] >= rep["timings"]["capture"] + rep["timings"]["calibration"]
    sens = rep["sensitivity"]  # one row per quantized layer and attention module, largest share first
    assert len(sens["layers"]) == len(rep["layers"]["wrapped"]) + len(rep["layers"]["attention"])
    shares = [s["share"] for s in sens["layers"]]
    assert shares == sorted(shares, reverse=True) and sens["error"] > 0
    assert sens["reached"] == (sens["error_with_suggestion"] <= sens["target"])

    # reload: same noise predictions as the model that was measured, and same noise_mse
    model, sched, r = load_quantized(str(out))
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.evaluation import noise_mse
    from gaq_backend.models import load_unet
    calib, cached = capture_calibration(load_unet(r.model), sched, r.sampler, r.calibration, progress=False)
    assert cached
    assert noise_mse(model, calib.val)[0] == pytest.approx(m["noise_mse"], rel=1e-5)
    assert model.down_blocks[0].resnets[0].conv1.weight_int.abs().max() <= 8


def test_set_override_changes_bits(write_recipe, tmp_path):
    out = tmp_path / "o8"
    assert main(["quantize", write_recipe(), "--out", str(out), "--quiet", "--set", "quantization.w_bits=8", "--set", "quantization.a_bits=32",
                 "--set", "report.sensitivity=true"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert (rep["w_bits"], rep["a_bits"]) == (8, 32)
    layers = rep["sensitivity"]["layers"]  # W8A32: no activation quantizer; the top 10 say what their weights cost
    assert all(s["act_alone"] is None for s in layers) and all(s["weight_alone"] is not None for s in layers[:10])


@pytest.mark.parametrize("overrides,message", [
    (["algorithm=nope"], "unknown algorithm 'nope'"),
    (["quantization.w_bits=3.5"], "quantization.w_bits must be an integer from 2 to 8; got 3.5"),
    (["model=/does/not/exist"], "model /does/not/exist does not exist"),
])
def test_bad_input_one_line_error_nonzero_exit_no_output(write_recipe, tmp_path, overrides, message):
    out = tmp_path / "out"
    args = ["quantize", write_recipe(), "--out", str(out), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    proc = _gaq(*args)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("gaq:")]
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-out")]


def test_missing_key_in_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: embedded\n")
    proc = _gaq("quantize", str(p), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "missing required key 'algorithm'" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_no_output_and_keeps_previous(write_recipe, tmp_path, monkeypatch):
    import gaq_backend.pipeline as pipeline

    out = tmp_path / "out"
    recipe = write_recipe()
    assert main(["quantize", recipe, "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(pipeline, "save_grid", boom)
    assert main(["quantize", recipe, "--out", str(out), "--quiet", "--set", "quantization.w_bits=8"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
