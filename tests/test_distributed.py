"""Data-parallel calibration with torch.distributed (Gloo, 2 processes on this CPU): the same model as one process."""
import os

import pytest
import torch

import gaq_backend as gaq
from conftest import make_tiny_model_dir

# minmax has no iterations to split: every rank computes it alike
# temporal runs the same sharded sweep after its time path (computed alike on every rank): measured equal too
# (noise_mse within 0.3% in float64), left out of the suite for time
ALGOS = {"uniform": lambda: gaq.UniformConfig(iters=24, act_iters=12, batch_size=8, seed=3)}


def _calibration(model_dir: str, cache: str):
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.models.loading import load_model

    loaded = load_model(model_dir)
    cfg = CalibrationConfig(n_per_step=6, interval=2, n_groups=2, val_fraction=0.25, cache_dir=cache)
    return loaded.unet, capture_calibration(loaded.unet, loaded.scheduler_config, SamplerConfig(num_inference_steps=6), cfg, False)[0]


def _quantize(model_dir: str, cache: str, algorithm: str):
    # in float64: what one process and two compute differently (batch sizes, the order of the gradient sums) is
    # then far below anything a rounding decision or a step size can see; in float32 the same difference is
    # already what two cache batch sizes of one process make (8 of 43k integer weights, noise_mse 5% apart here)
    unet, calib = _calibration(model_dir, cache)
    unet, calib = unet.double(), calib.stored_as(torch.float64)
    cfg = gaq.QuantConfig(w_bits=4, a_bits=8, algorithm=ALGOS[algorithm](), keep_fp=["conv_in", "conv_out"])
    q = gaq.quantize(unet, cfg, calib, progress=False)
    ints = {n: m.weight_int.clone() for n, m in q.named_modules() if getattr(m, "weight_int", None) is not None}
    return q, calib, ints


def _worker(rank: int, world: int, init_file: str, model_dir: str, cache: str, out: str) -> None:
    from safetensors.torch import save_file

    from gaq_backend.evaluation import noise_mse

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for algorithm in ALGOS:
            q, calib, ints = _quantize(model_dir, cache, algorithm)
            mse = torch.tensor(noise_mse(q, calib.val)[0], dtype=torch.float64)
            if rank == 0:
                save_file({**ints, "noise_mse": mse}, f"{out}-{algorithm}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_models(tmp_path_factory):
    """The tiny UNet (captured once: the ranks read the cache), quantized by two Gloo processes with each algorithm."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = make_tiny_model_dir(str(root / "unet"), seed=5)
    _calibration(model_dir, str(root / "cache"))
    torch.multiprocessing.spawn(_worker, args=(2, str(root / "init"), model_dir, str(root / "cache"), str(root / "q")), nprocs=2)
    return model_dir, str(root / "cache"), root


@pytest.mark.parametrize("algorithm", sorted(ALGOS))
def test_two_processes_give_the_single_process_model(two_process_models, algorithm):
    """Each rank holds half of every unit's rows and computes its half of each batch; the gradients are summed.
    Integer weights match one process's except a handful (at most 1 in 2000): Adam's step has the sign of the
    gradient whatever its size, so where a weight's gradient is float noise around 0, the two runs step apart and
    a rounding variable near 0 may flip (measured: 4 of 43k in float64). noise_mse within 1%."""
    from safetensors.torch import load_file

    from gaq_backend.evaluation import noise_mse

    model_dir, cache, root = two_process_models
    q, calib, ints = _quantize(model_dir, cache, algorithm)
    got = load_file(str(root / f"q-{algorithm}.safetensors"))
    total = sum(v.numel() for v in ints.values())
    flips = sum(int((got[k] != v).sum()) for k, v in ints.items())
    assert set(got) - {"noise_mse"} == set(ints) and flips <= total // 2000, (flips, total)
    single = noise_mse(q, calib.val)[0]
    assert abs(float(got["noise_mse"]) - single) <= 0.01 * single


def test_torchrun_quantize_writes_one_folder_from_rank_0(tmp_path, tiny_model_dir):
    """torchrun --nproc-per-node 2 -m gaq_backend.cli quantize: both processes calibrate (Gloo), rank 0 prints and
    writes the folder, the report names 2 processes; the folder loads like any other."""
    import json
    import subprocess
    import sys

    import yaml
    from conftest import tiny_recipe

    recipe = tiny_recipe(tiny_model_dir, str(tmp_path / "cache"), algorithm="uniform",
                         settings=dict(iters=8, act_iters=4, batch_size=8))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", GAQ_DIST_TIMEOUT="120")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gaq_backend.cli", "quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote ") == 1 and "(per rank, 2 processes)" in run.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["environment"]["processes"] == 2 and rep["algorithm"] == "uniform"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "r.yaml"]
    gaq.load_quantized(str(out))


def _check_same_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from gaq_backend import distributed

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        distributed.check_same("recipe A", "recipe")   # agree: nothing happens
        distributed.check_same(f"recipe {'B' if rank == 1 else 'A'}", "recipe")
    except ValueError as e:
        with open(f"{out}-{rank}", "w") as f:
            f.write(str(e))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_with_different_recipes_are_refused_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_check_same_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "err")), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"err-{rank}").read_text() == ("ranks differ in their recipe (rank 0 vs rank 1); every rank must "
                                                          "run the same recipe")
