"""The generator of broken inputs for the CLI fuzz (tests/fuzz.py): every kind of file a gaq command reads,
each in the ways a file goes wrong: truncated, empty, foreign, wrong-shape, pickled (a payload that would
create ``PWNED`` in the fuzz root if anything unpickled it), a folder where a file belongs, and symbolic links
(dangling, a loop, and one to the good file, which must work).

``make_inputs(root, quantized, onnx_path)`` writes them under ``root/bad`` and returns, per kind, the list of
paths, the good one first (``"valid"``: every path that is a good input, the links to good ones included). Nothing here is specific to one command; the pools in tests/fuzz.py combine them.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np

PAYLOAD_MARKER = "PWNED"


class Payload:
    """Unpickling this creates the marker file: a reader that unpickles is caught by the marker's existence."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _links(folder: str, name: str, good: str) -> list[str]:
    """A dangling link, a link loop, and a link to the good input (which must behave like it)."""
    os.makedirs(folder, exist_ok=True)
    dangling, loop_a, loop_b, to_good = (os.path.join(folder, f"{name}-{s}") for s in ("dangling", "loop-a", "loop-b", "link"))
    os.symlink(os.path.join(folder, "nowhere"), dangling)
    os.symlink(loop_b, loop_a)
    os.symlink(loop_a, loop_b)
    os.symlink(good, to_good)
    return [dangling, loop_a, to_good]


def _common(folder: str, name: str, good: bytes, pickled: bytes) -> list[str]:
    """Truncated, empty, pickled, and a folder under the file's name."""
    out = [_write(os.path.join(folder, f"{name}-truncated"), good[: len(good) // 2]), _write(os.path.join(folder, f"{name}-empty"), b""),
           _write(os.path.join(folder, f"{name}-pickled"), pickled)]
    os.makedirs(os.path.join(folder, f"{name}-folder"), exist_ok=True)
    return out + [os.path.join(folder, f"{name}-folder")]


def _safetensors(tensors: dict) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


def make_inputs(root: str, quantized: str, onnx_path: str) -> dict[str, list[str]]:
    bad = os.path.join(root, "bad")
    marker = os.path.join(root, PAYLOAD_MARKER)
    pickled = pickle.dumps(Payload(marker))
    torch_pickled = _torch_payload(marker)
    inputs: dict[str, list[str]] = {}

    # quantized folders (export, eval, bench): each broken copy differs from the good one in one file
    folders = []
    def variant(name: str, file: str, data: bytes | None) -> None:
        d = os.path.join(bad, "q", name)
        shutil.copytree(quantized, d, symlinks=True)
        p = os.path.join(d, file)
        if data is None:
            os.remove(p)
            os.makedirs(p)  # a folder where the file belongs
        else:
            _write(p, data)
        folders.append(d)
    weights = open(os.path.join(quantized, "quantized_unet.safetensors"), "rb").read()
    for name, file, data in (("weights-truncated", "quantized_unet.safetensors", weights[: len(weights) // 2]),
                             ("weights-empty", "quantized_unet.safetensors", b""),
                             ("weights-pickled", "quantized_unet.safetensors", torch_pickled),
                             ("weights-foreign", "quantized_unet.safetensors", _safetensors({"w": np.zeros(3, np.float32)})),
                             ("weights-folder", "quantized_unet.safetensors", None),
                             ("held-out-pickled", "held_out_inputs.safetensors", pickled),
                             ("held-out-wrong-shape", "held_out_inputs.safetensors",
                              _safetensors({"x": np.zeros((2, 3), np.float32), "t": np.zeros(2, np.int64), "eps": np.zeros((2, 3), np.float32)})),
                             ("config-broken", "unet_config.json", b"{\"_class_name\": "),
                             ("config-foreign", "unet_config.json", json.dumps({"_class_name": "Transformer2DModel"}).encode()),
                             ("recipe-broken", "recipe.yaml", b"model: [\n"),
                             ("scheduler-list", "scheduler_config.json", b"[1, 2]"),
                             ("manifest-incomplete", "gaq-manifest.json", json.dumps(dict(kind="quantized", complete=False,
                                                                                            files=sorted(os.listdir(quantized)))).encode())):
        variant(name, file, data)
    inputs["quantized"] = [quantized, *folders, *_links(os.path.join(bad, "q"), "link", quantized)]

    # eval-images.npz inside copies of the good folder (eval --from-images reads it; the manifest claims it)
    good_images = dict(fp=np.zeros((4, 1, 16, 16), np.uint8), quantized=np.zeros((4, 1, 16, 16), np.uint8),
                       info=np.array(json.dumps(dict(n_samples=4, seed=0, sampler=dict(num_inference_steps=2), algorithm="minmax",
                                                     w_bits=4, a_bits=8, device="cpu", fp_from_cache=False,
                                                     timings=dict(sample_fp=0.0, sample_quantized=0.0)))))
    npz = {"good": good_images, "missing-key": {k: v for k, v in good_images.items() if k != "quantized"},
           "wrong-shape": dict(good_images, quantized=np.zeros((4, 1, 8, 8), np.uint8)),
           "wrong-dtype": dict(good_images, fp=np.zeros((4, 1, 16, 16), np.float32)),
           "pickled": dict(good_images, info=np.array([Payload(marker)], dtype=object))}
    image_dirs = []
    for name, arrays in npz.items():
        d = os.path.join(bad, "images", name)
        shutil.copytree(quantized, d)
        with open(os.path.join(d, "eval-images.npz"), "wb") as f:
            np.savez(f, **arrays)  # object arrays are pickled: the "pickled" variant
        _claim(d, "eval-images.npz")
        image_dirs.append(d)
    d = os.path.join(bad, "images", "truncated")
    shutil.copytree(image_dirs[0], d)
    data = open(os.path.join(d, "eval-images.npz"), "rb").read()
    _write(os.path.join(d, "eval-images.npz"), data[: len(data) // 2])
    inputs["images"] = [*image_dirs, d]

    # ONNX files (sample)
    o = os.path.join(bad, "onnx")
    good_onnx = open(onnx_path, "rb").read()
    inputs["onnx"] = [onnx_path, *_common(o, "model.onnx", good_onnx, pickled), _write(os.path.join(o, "garbage.onnx"), b"\x08\x07garbage" * 50),
                      _write(os.path.join(o, "foreign.onnx"), _foreign_onnx()), *_links(o, "onnx", onnx_path)]

    # noise .npy (sample --noise), shaped for the tiny model (1, 16, 16)
    n = os.path.join(bad, "noise")
    os.makedirs(n, exist_ok=True)
    good_noise = _npy(np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32))
    inputs["noise"] = [_write(os.path.join(n, "good.npy"), good_noise), *_common(n, "noise.npy", good_noise, _npy_pickled(marker)),
                       _write(os.path.join(n, "wrong-shape.npy"), _npy(np.zeros((2, 3, 16, 16), np.float32))),
                       _write(os.path.join(n, "ints.npy"), _npy(np.zeros((2, 1, 16, 16), np.int64))),
                       _write(os.path.join(n, "nan.npy"), _npy(np.full((2, 1, 16, 16), np.nan, np.float32))),
                       _write(os.path.join(n, "not-npy.npy"), b"not numpy"), *_links(n, "noise", os.path.join(n, "good.npy"))]

    # FID references (eval --reference): IDX files and PNG folders
    r = os.path.join(bad, "reference")
    digits = np.random.default_rng(1).integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
    idx = np.array([2051, 8, 16, 16], dtype=">u4").tobytes() + digits.tobytes()
    png_dir = os.path.join(r, "png")
    _png_folder(png_dir, digits)
    broken_png = os.path.join(r, "png-broken")
    shutil.copytree(png_dir, broken_png)
    _write(os.path.join(broken_png, "003.png"), b"\x89PNG\r\n\x1a\nbroken")
    os.makedirs(os.path.join(r, "empty-folder"), exist_ok=True)
    good_idx = _write(os.path.join(r, "good-idx3-ubyte"), idx)
    inputs["reference"] = [good_idx, *_common(r, "ref-idx3-ubyte", idx, pickled), png_dir, broken_png, os.path.join(r, "empty-folder"),
                           _write(os.path.join(r, "magic-idx3-ubyte"), b"\x00\x00\x08\x01" + idx[4:]),
                           _write(os.path.join(r, "corrupt.gz"), b"\x1f\x8b\x08\x00garbage"), *_links(r, "ref", good_idx)]

    # training checkpoints, planted at <out>.ckpt by the train cases
    c = os.path.join(bad, "ckpt")
    inputs["ckpt"] = ["", *_common(c, "ckpt", _safetensors({"w": np.zeros(3, np.float32)}), torch_pickled),
                      _write(os.path.join(c, "foreign.ckpt"), _safetensors({"w": np.zeros(3, np.float32)})),
                      _write(os.path.join(c, "other-model.ckpt"), _other_model_ckpt())]
    inputs["valid"] = [quantized, inputs["quantized"][-1], onnx_path, inputs["onnx"][-1], inputs["noise"][0], inputs["noise"][-1],
                       good_idx, png_dir, inputs["reference"][-1], image_dirs[0]]
    return inputs


def make_optimum_dirs(root: str, quantized: str) -> list[str]:
    """An Optimum-shaped pipeline folder whose unet/ is the quantized model's FP graph, and broken copies of it."""
    import torch
    from diffusers import UNet2DModel

    from exporters.onnx_export import export_fp

    base = os.path.join(root, "bad", "optimum")
    good = os.path.join(base, "good")
    os.makedirs(os.path.join(good, "unet"))
    os.makedirs(os.path.join(good, "scheduler"))
    sched_cfg = json.load(open(os.path.join(quantized, "scheduler_config.json")))
    cfg = json.load(open(os.path.join(quantized, "unet_config.json")))
    json.dump(cfg, open(os.path.join(good, "unet", "config.json"), "w"))
    json.dump(sched_cfg, open(os.path.join(good, "scheduler", "scheduler_config.json"), "w"))
    json.dump({"_class_name": "ORTDiffusionPipeline", "unet": ["diffusers", cfg["_class_name"]],
               "scheduler": ["diffusers", "DDPMScheduler"]}, open(os.path.join(good, "model_index.json"), "w"))
    with torch.no_grad():
        export_fp(UNet2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")}), os.path.join(good, "unet", "model.onnx"))
    out = [good]
    for name, file, data in (("index-broken", "model_index.json", b"{\"_class_name\""), ("index-list", "model_index.json", b"[]"),
                             ("index-no-unet", "model_index.json", b"{\"_class_name\": \"X\"}"),
                             ("scheduler-broken", "scheduler/scheduler_config.json", b"{,}"),
                             ("unet-config-broken", "unet/config.json", b"nope")):
        d = os.path.join(base, name)
        shutil.copytree(good, d)
        _write(os.path.join(d, file), data)
        out.append(d)
    d = os.path.join(base, "no-unet-onnx")
    shutil.copytree(good, d)
    os.remove(os.path.join(d, "unet", "model.onnx"))
    return out + [d, *_links(base, "link", good)]


def _claim(folder: str, name: str) -> None:
    path = os.path.join(folder, "gaq-manifest.json")
    m = json.load(open(path))
    m["files"] = sorted(set(m["files"]) | {name})
    json.dump(m, open(path, "w"))


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _npy_pickled(marker: str) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _torch_payload(marker: str) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model": Payload(marker), "step": 1}, buf)
    return buf.getvalue()


def _foreign_onnx() -> bytes:
    """A valid ONNX model that gaq did not write (no gaq metadata)."""
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["sample"], ["out_sample"])
    graph = helper.make_graph([node], "foreign", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [1, 1, 16, 16])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [1, 1, 16, 16])])
    return helper.make_model(graph).SerializeToString()


def _other_model_ckpt() -> bytes:
    from safetensors.numpy import save

    return save({"model.w": np.zeros(2, np.float32), "gen": np.zeros(8, np.uint8), "losses": np.zeros(0)},
                metadata={"format": "gaq-train-checkpoint-1", "step": "0", "param_groups": "[]"})


def _png_folder(folder: str, digits: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, d in enumerate(digits):
        Image.fromarray(d).save(os.path.join(folder, f"{i:03d}.png"))
