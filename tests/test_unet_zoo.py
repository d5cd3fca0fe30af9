"""Generated UNets (tests/unet_zoo.py) through quantize, save/load and export with onnxruntime parity.

A seeded sample of the zoo (benchmarks/unet_zoo.py runs hundreds): every seed runs W8A8 minmax with the
int8 export and one config cycling through W4A8 minmax / int4, W4A8 uniform / int4 and W8A8 uniform / int8.
Some seeds once failed for their own reason and keep the fix:
seed 2: GaussianFourierProjection (a vector-only module) refused instead of kept in float;
seed 4: UNet2DModel's class_embed_type="timestep" broke the float64 parity reference;
seed 5: SimpleCrossAttn blocks (AttnAddedKVProcessor) refused instead of quantized;
seeds 19, 39: a diverging random trajectory spans 100x in range over the timesteps, and W8A8 minmax lost 5.7% / 1.5%
until minmax's automatic per-timestep ranges (exported as timestep tables).
The rest cover the four architecture classes and the three cycled configs at the lowest run time.
"""
import pytest

from unet_zoo import configs_for, generate, run_case

SEEDS = [2, 4, 5, 19, 39, 14, 17, 34, 72]


@pytest.mark.parametrize("seed,config", [(s, c) for s in SEEDS for c in configs_for(s)],
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_generated_unet_quantizes_reloads_and_exports(tmp_path, seed, config):
    case = generate(seed)
    algorithm, w, a, export = config
    res = run_case(case, str(tmp_path), algorithm, w, a, export)
    # W8A8: the goal (<= 1% relative MSE); W4A8: the worst seen over the benchmark's 300 configs, with room
    assert res["rel_error"] < (0.01 if w == 8 else 0.1), (case.describe(), res)
    assert res["reload_rel_error"] == pytest.approx(res["rel_error"], rel=1e-4, abs=1e-9)
    assert res["parity"]["mean_steps"] < 0.5, res


def test_the_sample_covers_every_class_and_config():
    from unet_zoo import CYCLE, FAMILIES

    assert {generate(s).family for s in SEEDS} == set(FAMILIES)
    assert {c for s in SEEDS for c in configs_for(s)} == {("minmax", 8, 8, "int8"), *CYCLE}
