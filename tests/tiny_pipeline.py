"""The tiny StableDiffusionPipeline the tests build (random weights, nothing downloaded).

It imports only torch, diffusers and transformers, so that benchmarks/optimum_check.sh can build it in
Optimum's deployment environment too (transformers 4.57 cannot read a CLIP model saved by transformers 5).
"""
import torch


def char_tokenizer(path: str):
    """(a 55-token character CLIPTokenizer with 16 positions, its vocabulary); its source files are written beside
    ``path`` and removed once it is built."""
    import json
    import os
    import shutil

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 3 + i, 29 + i
    tok_dir = os.path.join(path + "-tokenizer-src")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"), model_max_length=16, pad_token="!")
    shutil.rmtree(tok_dir)
    return tokenizer, vocab


def make_tiny_sd_pipeline(path: str) -> str:
    """A tiny StableDiffusionPipeline folder written by the test: random CLIP text model (16 positions, as Optimum's
    export traces the text encoder at sequence length 16), a 55-token
    character tokenizer, a two-level UNet2DConditionModel, a one-level VAE, the Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=12, intermediate_size=16,
                                                num_attention_heads=2, num_hidden_layers=1, vocab_size=len(vocab),
                                                max_position_embeddings=16, projection_dim=12))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl_pipeline(path: str) -> str:
    """A tiny StableDiffusionXLPipeline folder: two random CLIP text models (the second with a projection, whose
    pooled output is SDXL's ``text_embeds``) sharing the character tokenizer above, a two-level ``text_time``
    UNet2DConditionModel reading both encoders' hidden states, a one-level VAE, the Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    clip = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                vocab_size=len(vocab), max_position_embeddings=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, projection_dim=8, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, projection_dim=8, **clip))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(path)
    return path
