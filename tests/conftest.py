import pytest
import torch

import gaq_backend  # noqa: F401  (quiets torchao logging before diffusers imports it)

TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=8, norm_num_groups=4)


def make_tiny_model_dir(path: str, seed: int = 0) -> str:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET)
    unet.save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny-unet")))


def tiny_recipe(model_dir: str, cache_dir: str, **overrides) -> dict:
    recipe = dict(
        model=model_dir, algorithm="minmax",
        sampler=dict(num_inference_steps=10),
        calibration=dict(n_per_step=8, interval=2, n_groups=5, val_fraction=0.25, cache_dir=cache_dir, batch_size=8),
        quantization=dict(w_bits=4, a_bits=8),
        settings=dict(batch_size=16),
        # the sensitivity report is measured where a test asks for it (tests/test_cli.py): it is most of a tiny run's time
        report=dict(num_samples=4, grid=4, batch_size=4, sensitivity=False),
    )
    for k, v in overrides.items():
        recipe[k] = v
    return recipe


def quantize_tiny_folder(root, model_dir: str) -> dict:
    """``gaq quantize`` of the tiny model into ``root/q`` with the tiny recipe (its cache in ``root/cache``)."""
    import yaml

    from gaq_backend.cli import main

    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model_dir, str(root / "cache"))))
    out = root / "q"
    assert main(["quantize", str(recipe), "--out", str(out), "--quiet"]) == 0
    return dict(root=root, recipe=str(recipe), out=out)


def assert_one_error_line(rc: int, stderr: str, *needles: str) -> str:
    """The CLI's contract for bad input: exit 2 and one ``gaq: error:`` line (warnings aside) holding ``needles``."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("gaq: warning")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("gaq: error:") and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir):
    import yaml

    def write(**overrides) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, str(tmp_path / "cache"), **overrides)))
        return str(path)
    return write


from tiny_pipeline import make_tiny_sd_pipeline  # noqa: E402,F401  (re-exported for the tests)
