import pytest
import torch
from hypothesis import given, settings, strategies as st

from gaq_backend.quantizers import UniformQuantizer, round_ste, search_mse_scale
from gaq_backend.quantizers.uniform import qrange


@pytest.mark.parametrize("bits,sym,expected", [(4, True, (-8, 7)), (8, True, (-128, 127)), (4, False, (0, 15)), (2, False, (0, 3))])
def test_integer_range(bits, sym, expected):
    assert qrange(bits, sym) == expected


def test_symmetric_grid_and_clipping():
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(torch.tensor(-8.0), torch.tensor(8.0))
    assert float(q.scale) == pytest.approx(1.0)
    x = torch.tensor([-100.0, -8.0, -2.4, 0.0, 0.49, 0.51, 6.6, 7.0, 9.0])
    assert q(x).tolist() == [-8.0, -8.0, -2.0, 0.0, 0.0, 1.0, 7.0, 7.0, 7.0]


def test_asymmetric_zero_point_represents_zero_exactly():
    q = UniformQuantizer(8, symmetric=False)
    q.set_range(torch.tensor(-0.3), torch.tensor(5.0))
    assert float(q.zero_point) == round(0.3 / float(q.scale))
    assert float(q(torch.tensor(0.0))) == 0.0
    out = q(torch.linspace(-0.3, 5.0, 1000))
    assert out.unique().numel() <= 256
    assert (out - torch.linspace(-0.3, 5.0, 1000)).abs().max() <= float(q.scale) / 2 + 1e-6


@given(st.integers(2, 8), st.booleans(), st.floats(0.01, 100.0))
@settings(max_examples=40, deadline=None)
def test_outputs_lie_on_grid(bits, sym, spread):
    torch.manual_seed(0)
    x = torch.randn(257) * spread
    q = UniformQuantizer(bits, symmetric=sym)
    q.fit(x)
    codes = (q(x) / q.scale + q.zero_point)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= q.qmin - 1e-3 and codes.max() <= q.qmax + 1e-3


def test_per_channel_scales_follow_each_channel():
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).float().view(6, 1, 1, 1)
    q = UniformQuantizer(4, symmetric=True, channel_axis=0, shape=(6, 1, 1, 1))
    q.fit(w)
    expected = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 8
    assert q.scale.shape == (6, 1, 1, 1)
    assert torch.allclose(q.scale, expected)
    err = (q(w) - w).abs()
    inside = (w >= -8 * q.scale) & (w <= 7 * q.scale)
    # within the grid the error is at most half a step of that channel; beyond +7 steps it clips by under one step
    assert (err <= q.scale / 2 + 1e-6)[inside].all()
    assert (err <= q.scale + 1e-6).all()


@pytest.mark.parametrize("method", ["max", "mse"])
def test_block_wise_scales_are_the_per_channel_scales_of_each_block(method):
    """One scale per (output channel, block of 16 inputs): the same as a per-channel quantizer fitted on the
    (channel x block)-row reshape, repeated over the block by params()."""
    w = torch.randn(5, 48) * torch.linspace(0.1, 3, 48)
    q = UniformQuantizer(4, channel_axis=0, shape=(5, 3), block_size=16)
    q.fit(w, method)
    ref = UniformQuantizer(4, channel_axis=0, shape=(15, 1))
    ref.fit(w.reshape(15, 16), method)
    assert q.scale.shape == (5, 3) and torch.equal(q.scale.reshape(15, 1), ref.scale)
    assert torch.equal(q(w), ref(w.reshape(15, 16)).reshape(5, 48))
    assert torch.equal(q.integer(w), ref.integer(w.reshape(15, 16)).reshape(5, 48))
    with pytest.raises(ValueError, match="per output channel"):
        UniformQuantizer(4, channel_axis=None, block_size=16)


def test_ste_gradient_is_identity_inside_range_and_zero_outside():
    x = torch.tensor([-20.0, -3.3, 0.2, 2.7, 20.0], requires_grad=True)
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(torch.tensor(-8.0), torch.tensor(8.0))
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    y = torch.tensor([1.3], requires_grad=True)
    round_ste(y).backward()
    assert y.grad.item() == 1.0


def test_scale_receives_lsq_gradient_when_learnable():
    q = UniformQuantizer(4, symmetric=True)
    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    q.scale.requires_grad_(True)
    (q(torch.randn(100)) ** 2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs() > 0


def test_mse_search_never_worse_than_max():
    torch.manual_seed(1)
    w = torch.randn(16, 64) * torch.rand(16, 1) + torch.randn(16, 64).pow(3) * 0.1  # heavy tails
    qmax = UniformQuantizer(4, channel_axis=0, shape=(16, 1)); qmax.fit(w, "max")
    qmse = UniformQuantizer(4, channel_axis=0, shape=(16, 1)); qmse.fit(w, "mse")
    err_max = (qmax(w) - w).pow(2).mean(1)
    err_mse = (qmse(w) - w).pow(2).mean(1)
    assert (err_mse <= err_max + 1e-9).all() and err_mse.sum() < err_max.sum()
    s, z = search_mse_scale(w, 4, True, 0)
    assert s.shape == (16, 1) and (z == 0).all()


def test_32_bits_is_identity_and_bad_bits_rejected():
    x = torch.randn(10)
    assert torch.equal(UniformQuantizer(32)(x), x)
    for bad in (1, 9, 16):
        with pytest.raises(ValueError, match="bits"):
            UniformQuantizer(bad)


def test_uncalibrated_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="before calibration"):
        UniformQuantizer(8)(torch.randn(3))


def test_adaround_hand_written_backward_matches_autograd_to_second_order():
    """The memory-saving backward of the soft-quantized weight and the regulariser equals autograd's, and
    stays differentiable (gradient_aligned differentiates through the inner step)."""
    from gaq_backend.quantizers.adaround import GAMMA, ZETA, _RoundingRegularizer, _SoftQuantWeight

    g = torch.Generator().manual_seed(0)
    v = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    floor = torch.randint(-9, 8, (6, 5), generator=g).double()  # some land outside [-8, 7]: clamped, no gradient
    scale, zero = torch.rand(6, 1, generator=g, dtype=torch.float64) + 0.1, torch.zeros(6, 1, dtype=torch.float64)
    weights = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def reference(v):
        h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
        w = scale * (torch.clamp(floor + h + zero, -8, 7) - zero)
        return (w * weights).sum() + (1 - (2 * h - 1).abs().pow(3.5)).sum()

    def custom(v):
        return (_SoftQuantWeight.apply(v, floor, scale, zero, -8, 7) * weights).sum() + _RoundingRegularizer.apply(v, 3.5)

    assert torch.equal(custom(v), reference(v))
    # first order (AdaRound's own training) takes the in-place backward: the same numbers as the differentiable one
    first = torch.autograd.grad(custom(v), v)[0]
    assert torch.equal(first, torch.autograd.grad(custom(v), v, create_graph=True)[0].detach())
    torch.testing.assert_close(first, torch.autograd.grad(reference(v), v)[0], rtol=1e-12, atol=1e-15)
    (g_ref,) = torch.autograd.grad(reference(v), v, create_graph=True)
    (g_new,) = torch.autograd.grad(custom(v), v, create_graph=True)
    assert torch.allclose(g_new, g_ref) and (g_ref == 0).any() and (g_ref != 0).any()
    probe = torch.randn(6, 5, generator=g, dtype=torch.float64)
    (h_ref,) = torch.autograd.grad((g_ref * probe).sum(), v)
    (h_new,) = torch.autograd.grad((g_new * probe).sum(), v)
    assert torch.allclose(h_new, h_ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_equals_the_autograd_formula_in_value_and_gradients(per_channel):
    """The hand-written backward (STE for round, LSQ for the scale) against autograd on the textbook formula."""
    from gaq_backend.quantizers.uniform import fake_quant

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 4, 3, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    shape = (5, 1, 1) if per_channel else ()
    scale = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.3 + 0.05).requires_grad_(True)
    zero = torch.full(shape, 2.0, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)

    def reference(x, s, z):
        return (torch.clamp(round_ste(x / s) + z, -8, 7) - z) * s

    out, ref = fake_quant(x, scale, zero, -8, 7), reference(x, scale, zero)
    assert torch.equal(out, ref)
    got = torch.autograd.grad((out * w).sum(), (x, scale, zero), create_graph=True)
    want = torch.autograd.grad((ref * w).sum(), (x, scale, zero), create_graph=True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b)
    assert (got[0] == 0).any() and (got[0] != 0).any()  # some clamped, some not
    plain = torch.autograd.grad((fake_quant(x, scale, zero, -8, 7) * w).sum(), (x, scale, zero))  # the in-place path
    for a, b in zip(plain, want):
        assert torch.allclose(a, b)
    (h_got,) = torch.autograd.grad(got[1].sum(), x)     # second order (gradient_aligned differentiates gradients)
    (h_want,) = torch.autograd.grad(want[1].sum(), x)
    assert torch.allclose(h_got, h_want)
    half = fake_quant(x.detach().half(), scale.detach().float(), zero.detach().float(), -8, 7)
    assert half.dtype == torch.float16


def test_timestep_observer_tables_and_spread():
    import torch

    from gaq_backend.quantizers.observers import TimestepMinMaxObserver
    from gaq_backend.quantizers.timestep import current_timesteps

    ob = TimestepMinMaxObserver()
    x = torch.tensor([[1.0, -1.0], [100.0, -50.0], [2.0, 0.0]])
    with current_timesteps(torch.tensor([10.0, 900.0, 10.0])):
        ob(x)
    t, lo, hi = ob.table()
    assert t.tolist() == [10.0, 900.0] and lo.tolist() == [-1.0, -50.0] and hi.tolist() == [2.0, 100.0]
    assert ob.range() == (torch.tensor(-50.0), torch.tensor(100.0))
    assert ob.spread() == 150.0 / 3.0   # the range over all timesteps against the narrowest timestep's
    with current_timesteps(torch.tensor([10.0, 900.0])):
        ob(torch.ones(4, 2))   # rows that are not the call's batch (attention operands: batch x heads)
    assert not ob.usable and ob.spread() == 1.0


def test_auto_timestep_ranges_go_where_the_range_varies():
    from unet_zoo import build_unet, generate, quant_config, sampling_loop

    import gaq_backend as gaq

    case = generate(19)
    tables = {}
    for mode in ("global", "auto", "per_timestep"):
        config = quant_config("minmax", 8, 8)
        config.algorithm = gaq.MinMaxConfig(timestep_ranges=mode)
        q = gaq.quantize(build_unet(case), config, forward_loop=sampling_loop(case, 0), progress=False)
        tables[mode] = {n for n, m in q.named_modules() if getattr(m, "timestep_ranges", None) is not None}
    assert not tables["global"] and tables["auto"] and tables["auto"] < tables["per_timestep"]
    assert "down_blocks.0.downsamplers.0.conv.act_quantizers.0" in tables["auto"]   # the layer the report names
    assert not any(".processor." in n for n in tables["per_timestep"])
