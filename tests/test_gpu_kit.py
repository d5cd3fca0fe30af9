"""benchmarks/gpu_kit.sh (issue 15): its dry run checks the plumbing on this CPU; without CUDA the real run
refuses in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_kit_dry_run_times_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "kit"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_kit.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    kit = json.loads((out / "kit.json").read_text())
    assert kit["dry_run"] is True and set(kit["quantize_seconds"]) == {"embedded w8a8", "embedded w4a8", "sd w8a8", "sd w4a8"}
    ok = [r for r in kit["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"torch cpu", "CPUExecutionProvider"}  # what ran, named
    names = {r["row"] for r in ok}
    for want in ("embedded torch eager fp32", "embedded fp32 / cpu", "embedded gaq w8a8 / cpu", "embedded gaq w4a8 / cpu",
                 "tiny-sd gaq w8a8 / cpu"):
        assert want in names
    assert {(r["row"], r["batch"]) for r in ok} >= {("embedded gaq w8a8 / cpu", 1), ("embedded gaq w8a8 / cpu", 8), ("tiny-sd fp32 / cpu", 2)}
    assert "| embedded gaq w4a8 / cpu | CPUExecutionProvider | 8 |" in (out / "kit.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_kit_without_cuda_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_kit.py"), "--out", str(tmp_path / "k")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not (tmp_path / "k").exists()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("gpu_kit:")]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
