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
        report=dict(num_samples=4, grid=4, batch_size=4),
    )
    for k, v in overrides.items():
        recipe[k] = v
    return recipe


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir):
    import yaml

    def write(**overrides) -> str:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, str(tmp_path / "cache"), **overrides)))
        return str(path)
    return write


def make_tiny_sd_pipeline(path: str) -> str:
    """A tiny StableDiffusionPipeline folder written by the test: random CLIP text model, a 55-token
    character tokenizer, a two-level UNet2DConditionModel, a one-level VAE, the Euler scheduler."""
    import json
    import os
    import shutil

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 3 + i, 29 + i
    tok_dir = os.path.join(path + "-tokenizer-src")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=8, pad_token="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=12, intermediate_size=16,
                                                num_attention_heads=2, num_hidden_layers=1, vocab_size=len(vocab),
                                                max_position_embeddings=8, projection_dim=12))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    shutil.rmtree(tok_dir)
    return path
