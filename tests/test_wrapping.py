import pytest
import torch
from torch import nn

from gaq_backend.config import DEFAULT_KEEP_FP
from gaq_backend.wrapping import QuantAttnProcessor, QuantLayerMixin, UnsupportedLayerError, is_kept, wrap_unet

UNET2D_CONFIGS = [
    dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
         down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
         attention_head_dim=8, norm_num_groups=4),
    dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2,
         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
         attention_head_dim=4, norm_num_groups=4),
    dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 8), layers_per_block=1,
         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
         mid_block_type=None),
]
COND_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)


def _models():
    from diffusers import UNet2DConditionModel, UNet2DModel

    for cfg in UNET2D_CONFIGS:
        torch.manual_seed(0)
        yield UNet2DModel(**cfg), {}
    torch.manual_seed(0)
    yield UNet2DConditionModel(**COND_CONFIG), {"encoder_hidden_states": torch.randn(2, 5, 12)}


def _fp_layer_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("idx", range(len(UNET2D_CONFIGS) + 1))
@pytest.mark.parametrize("keep", [[], DEFAULT_KEEP_FP])
def test_every_conv_and_linear_wrapped_or_kept_exactly_once(idx, keep):
    model, _ = list(_models())[idx]
    names = _fp_layer_names(model)
    attn_names = {n for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    report = wrap_unet(model, 4, 8, keep)
    wrapped, kept = report.wrapped, [k for k in report.kept if not k.endswith(".matmuls")]
    assert len(wrapped) == len(set(wrapped)) and len(kept) == len(set(kept))
    assert set(wrapped) | set(kept) == names and not set(wrapped) & set(kept)
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)} == set(wrapped)
    assert set(report.attention) | {k[: -len(".matmuls")] for k in report.kept if k.endswith(".matmuls")} == attn_names
    assert all(isinstance(model.get_submodule(a).processor, QuantAttnProcessor) for a in report.attention)
    if not keep:
        assert kept == [] and len(report.attention) == len(attn_names) > 0 or not attn_names


@pytest.mark.parametrize("idx", range(len(UNET2D_CONFIGS) + 1))
def test_unquantized_wrapping_reproduces_fp_output(idx):
    model, cond = list(_models())[idx]
    c = model.config
    x, t = torch.randn(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t, **cond).sample
        wrap_unet(model, 4, 32, [])
        for m in model.modules():
            if isinstance(m, QuantLayerMixin):
                m.use_weight_quant = False
        out = model(x, t, **cond).sample
    assert torch.allclose(out, ref, atol=1e-5)


def test_skip_split_points_equal_the_h_channels_of_each_concat():
    from diffusers import UNet2DModel

    model = UNet2DModel(**UNET2D_CONFIGS[1])
    # diffusers concatenates [h, skip] right before each up-path resnet; record h's channels there.
    orig_cat = torch.cat
    hs = []
    def spy(tensors, dim=0, **kw):
        if dim == 1 and len(tensors) == 2:
            hs.append(tensors[0].shape[1])
        return orig_cat(tensors, dim=dim, **kw)
    torch.cat = spy
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    finally:
        torch.cat = orig_cat
    report = wrap_unet(model, 4, 32, [])
    conv1 = [v for k, v in report.split.items() if k.endswith("conv1")]
    assert conv1 == hs and len(hs) == 9
    assert all(report.split[k] < model.get_submodule(k).in_channels for k in report.split)


def test_keep_patterns():
    assert is_kept("down_blocks.0.resnets.0.conv_shortcut", ["conv_shortcut"])
    assert not is_kept("down_blocks.0.resnets.0.conv1", ["conv_shortcut", "conv"])
    assert is_kept("up_blocks.1.attentions.0.to_q", ["up_blocks.1.*"])
    assert is_kept("time_embedding.linear_1", ["time_embedding"])


def test_unknown_layer_type_is_refused_with_its_name():
    from diffusers import UNet2DModel

    model = UNet2DModel(**UNET2D_CONFIGS[0])
    model.down_blocks[0].extra = nn.Conv1d(4, 4, 3)
    with pytest.raises(UnsupportedLayerError, match=r"Conv1d at down_blocks\.0\.extra"):
        wrap_unet(model, 4, 8, [])
    model = UNet2DModel(**UNET2D_CONFIGS[0])
    model.down_blocks[0].extra = nn.Conv1d(4, 4, 3)
    report = wrap_unet(model, 4, 8, ["extra"])
    assert "down_blocks.0.extra" in report.kept


def test_wrapping_twice_is_refused():
    from diffusers import UNet2DModel

    model = UNet2DModel(**UNET2D_CONFIGS[0])
    wrap_unet(model, 4, 8, [])
    with pytest.raises(ValueError, match="already quantized"):
        wrap_unet(model, 4, 8, [])
