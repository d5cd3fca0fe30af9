"""The image-pair metrics of gaq eval --prompts (evaluation/pipeline_eval.py)."""
import numpy as np

from gaq_backend.evaluation.pipeline_eval import prompt_grid, psnr, ssim, summary


def _images(seed, n=3, size=24):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_psnr_matches_its_definition_and_identical_pairs_are_counted():
    a = _images(0)
    b = np.clip(a.astype(int) + np.where(np.arange(a.size).reshape(a.shape) % 2, 4, -4), 0, 255).astype(np.uint8)
    mse = ((a.astype(float) - b) ** 2).reshape(3, -1).mean(1)
    assert np.allclose(psnr(a, b), 10 * np.log10(255 ** 2 / mse))
    s = summary(psnr(a, a))
    assert s["n_identical"] == 3 and s["mean"] is None


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = _images(1)
    assert np.allclose(ssim(a, a), 1.0)
    rng = np.random.default_rng(2)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    scores = [ssim(a, b).mean() for b in noisy]
    assert 1 > scores[0] > scores[1] > scores[2] > 0
    assert np.allclose(ssim(a, noisy[0]), ssim(noisy[0], a))   # symmetric
    small = _images(3, size=6)   # smaller than the 11-pixel window: the window shrinks
    assert np.allclose(ssim(small, small), 1.0)


def test_the_grid_has_a_row_per_pair_wide_enough_for_its_prompt():
    a = _images(4, n=2, size=8)
    g = prompt_grid(a, a, ["a very long prompt about a cat", "dog"])
    assert g.shape[1] >= 6 * len("a very long prompt about a cat") and g.shape[0] > 2 * 8
