"""Block-at-a-time reconstruction (issue 14): two paused forward passes per sweep, one unit's data at a time,
memory-mapped from disk above the budget, a memory plan that refuses what cannot fit."""
import dataclasses
import os
import threading

import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms import memory_plan
from gaq_backend.algorithms.uniform import UniformConfig
from test_front_doors import CAL, sampling_loop, sd_unet


def _quantize(tmp_path, **algo):
    cfg = gaq.preset("W4A8", algorithm=UniformConfig(iters=3, act_iters=3, batch_size=4, cache_batch_size=4, **algo),
                     calibration=dataclasses.replace(CAL, cache_dir=str(tmp_path / "cache")), keep_fp=["conv_in", "conv_out"])
    return gaq.quantize(sd_unet(), cfg, forward_loop=sampling_loop("sd"), progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if v is not None}


def test_every_unit_runs_once_per_batch_in_each_of_the_two_passes(tmp_path, monkeypatch):
    """Linear in units x rows: re-running the model up to each unit would call the first unit once per unit."""
    calls: dict[str, int] = {}
    import gaq_backend.algorithms.reconstruction as recon

    real_sweep = recon.sweep

    def counting_sweep(model, config, calib, cfg, progress, units, plan, weight_fn=None):
        def count(name):
            def hook(m, args):
                if threading.current_thread() is not threading.main_thread():
                    calls[name] = calls.get(name, 0) + 1
            return hook
        handles = [u.module.register_forward_pre_hook(count(u.name)) for u in units]
        try:
            stats = real_sweep(model, config, calib, cfg, progress, units, plan, weight_fn)
        finally:
            for h in handles:
                h.remove()
        n_batches = len(list(calib.batches(cfg.cache_batch_size)))
        assert n_batches > 1
        assert [calls[u.name] for u in units] == [2 * n_batches] * len(units)
        return stats

    monkeypatch.setattr(recon, "sweep", counting_sweep)
    import gaq_backend.algorithms.uniform as uniform
    monkeypatch.setattr(uniform, "sweep", counting_sweep)
    _quantize(tmp_path)
    assert calls


def test_unit_cache_on_disk_gives_the_same_model_and_leaves_no_file(tmp_path):
    in_memory = _quantize(tmp_path)
    on_disk = _quantize(tmp_path, cache_memory_gib=1e-9)
    blocks = on_disk.gaq_info.stats.blocks
    assert all(b.on_disk for b in blocks.values()) and not any(b.on_disk for b in in_memory.gaq_info.stats.blocks.values())
    a, b = _state(in_memory), _state(on_disk)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(".tmp-gaq-")]


def test_fp_targets_recorded_to_disk_give_the_same_model_half_the_paused_passes_and_leave_no_file(tmp_path, monkeypatch):
    from gaq_backend.algorithms import fp_targets

    written = []
    real_record = fp_targets.RecordedTargets._record

    def record(self, *a, **k):
        real_record(self, *a, **k)
        written.append(self.disk_bytes())
    monkeypatch.setattr(fp_targets.RecordedTargets, "_record", record)
    paused = _quantize(tmp_path, fp_targets="pass")
    recorded = _quantize(tmp_path, fp_targets="disk")
    a, b = _state(paused), _state(recorded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    p, r = paused.gaq_info.stats.memory_plan, recorded.gaq_info.stats.memory_plan
    assert (p["fp_targets"], r["fp_targets"]) == ("pass", "disk") and 2 * r["paused_passes"] == p["paused_passes"]
    assert written == [r["fp_disk"]] and p["fp_disk"] == 0  # the plan's disk estimate is what was written
    assert not [f for f in os.listdir(tmp_path / "cache") if f.startswith(".tmp-gaq-")]


def test_fp_targets_go_to_disk_when_the_paused_passes_would_not_fit(tmp_path, monkeypatch):
    plan = _quantize(tmp_path).gaq_info.stats.memory_plan  # fp_targets: auto
    assert plan["fp_targets"] == "pass"
    # just enough for one stream's paused passes, the working set and the cache, not for two streams
    need = plan["paused_passes"] // 2 + plan["reconstruction"] + plan["unit_cache"]
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: int(need / 0.9) + 1)
    plan = _quantize(tmp_path).gaq_info.stats.memory_plan
    assert plan["fp_targets"] == "disk" and not plan["spills"]


def test_memory_plan_is_reported_and_refuses_what_cannot_fit(tmp_path, monkeypatch):
    plan = _quantize(tmp_path).gaq_info.stats.memory_plan
    assert plan["rows"] > 0 and plan["paused_passes"] > 0 and plan["unit_cache"] > 0 and plan["peak"] > plan["model"]
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"more than the 0\.0 GiB free; lower calibration\.n_per_step"):
        _quantize(tmp_path)


def test_an_error_mid_sweep_stops_every_paused_pass(tmp_path, monkeypatch):
    import gaq_backend.algorithms.reconstruction as recon

    before = threading.active_count()
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    real = recon.reconstruct_unit
    monkeypatch.setattr(recon, "reconstruct_unit", failing)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tmp_path)
    assert threading.active_count() == before


def test_dry_run_estimate_matches_the_plan_of_the_real_run(tmp_path):
    """The dry run probes one zero row shaped as the pipeline will record (latent size, prompt length, CFG rows)."""
    import json

    import yaml
    from conftest import make_tiny_sd_pipeline
    from gaq_backend.cli import main
    from gaq_backend.models.loading import load_model
    from gaq_backend.pipeline import print_memory_estimate
    from gaq_backend.recipe import load_recipe

    pipe_dir = make_tiny_sd_pipeline(str(tmp_path / "tiny-sd"))
    (tmp_path / "prompts.txt").write_text("a red cat\nthe blue sea\n")
    recipe = dict(model=pipe_dir, algorithm="uniform", sampler=dict(kind="pipeline", num_inference_steps=6),
                  calibration=dict(n_per_step=4, interval=2, n_groups=3, val_fraction=0.25, batch_size=4, prompts=str(tmp_path / "prompts.txt"),
                                   guidance_scale=5.0, cache_dir=str(tmp_path / "cache")),
                  quantization=dict(w_bits=4, a_bits=8, keep_fp=["conv_in", "conv_out"]),
                  settings=dict(iters=2, act_iters=2, batch_size=4),
                  report=dict(num_samples=2, grid=2, batch_size=2, sensitivity=False))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = load_recipe(str(tmp_path / "r.yaml"))
    lines = []
    plan = print_memory_estimate(r, load_model(r.model, r.model_options), torch.device("cpu"), lines.append)
    assert lines == [plan.summary()] and "for 24 calibration rows" in lines[0]  # 3 recorded steps x 4 images x 2 (CFG)
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    real = json.loads((out / "report.json").read_text())["algorithm_stats"]["memory_plan"]
    for key in ("rows", "model", "paused_passes", "unit_cache", "reconstruction", "largest_unit"):
        assert real[key] == getattr(plan, key), key
