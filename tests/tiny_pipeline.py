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


def _tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                         **extra)


def _tiny_t5(vocab_size: int, d_model: int = 16):
    """A one-layer random T5 encoder (relative positions: no length limit, so the pipelines' long T5 padding works)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                                   pad_token_id=2, eos_token_id=1, decoder_start_token_id=0))


def make_tiny_dit_pipeline(path: str) -> str:
    """A tiny DiTPipeline folder: a two-layer DiTTransformer2DModel (its label table has 1000 entries, as the pipeline's
    null class is 1000), a one-level VAE, DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    DiTPipeline(transformer=tr, vae=_tiny_vae(), scheduler=DDIMScheduler()).save_pretrained(path)
    return path


def make_tiny_pixart_pipeline(path: str) -> str:
    """A tiny PixArtAlphaPipeline folder: a random one-layer T5 encoder behind the character tokenizer (a CLIP
    tokenizer class: building a T5 sentencepiece model needs a download), a two-layer ``ada_norm_single``
    PixArtTransformer2DModel, a one-level VAE, DPM-Solver++. Sample it with ``use_resolution_binning=False`` or at
    a binned size: PixArt's bins exist only for sample sizes 32 to 256."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    tr = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                  sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=16,
                                  norm_type="ada_norm_single", use_additional_conditions=False)
    PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=_tiny_t5(len(vocab)), vae=_tiny_vae(), transformer=tr,
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return path


def make_tiny_sd3_pipeline(path: str) -> str:
    """A tiny StableDiffusion3Pipeline folder: two random projected CLIP text models and a one-layer T5 (all behind
    the character tokenizer), a two-layer SD3Transformer2DModel, a one-level VAE, flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    clip = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1,
                vocab_size=len(vocab), max_position_embeddings=16, hidden_size=8, projection_dim=8)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                               pos_embed_max_size=16)
    StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(shift_factor=0.0),
                             text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=tokenizer,
                             text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=tokenizer,
                             text_encoder_3=_tiny_t5(len(vocab)), tokenizer_3=tokenizer).save_pretrained(path)
    return path


def make_tiny_flux_pipeline(path: str) -> str:
    """A tiny FluxPipeline folder: a random CLIP text model and a one-layer T5 behind the character tokenizer, a
    FluxTransformer2DModel with one double- and one single-stream block and guidance embedding, a one-level VAE
    with one latent channel (Flux packs 2x2 latent patches into 4 token channels), flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, intermediate_size=16, num_attention_heads=2,
                          num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=16, hidden_size=16, projection_dim=16)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
                                axes_dims_rope=[2, 2, 4])
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(latent_channels=1, shift_factor=0.0),
                 text_encoder=CLIPTextModel(clip), tokenizer=tokenizer, text_encoder_2=_tiny_t5(len(vocab)), tokenizer_2=tokenizer,
                 transformer=tr).save_pretrained(path)
    return path


def make_tiny_clip(path: str) -> str:
    """A tiny random CLIPModel folder (16-pixel images, the character tokenizer, a CLIPImageProcessor) for CLIP scores."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab = char_tokenizer(path)
    torch.manual_seed(0)
    text = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                num_hidden_layers=1, vocab_size=len(vocab), max_position_embeddings=16)
    vision = dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, image_size=16, patch_size=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path
