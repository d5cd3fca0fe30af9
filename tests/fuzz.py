"""Property-based fuzzing of recipes and CLI arguments (shared by tests/test_reliability.py and
benchmarks/fuzz_cli.py).

Every case runs ``gaq`` in-process and must end in one of two ways: exit 0 with a complete output (or,
for a dry run, no output), or a non-zero exit with at most three lines on stderr and no traceback.
Nothing outside the requested output may change: a sentinel folder in the working directory (which
the mutated ``--out`` values aim at) is snapshotted around every case. Exit 1 (gaq's "internal error")
counts as a failure: it means a bad input reached code that did not expect it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field

import yaml
from hypothesis import strategies as st

from gaq_backend.cli import main

SECTIONS = {
    "sampler": ["kind", "num_inference_steps", "eta"],
    "calibration": ["n_per_step", "interval", "val_fraction", "n_groups", "seed", "batch_size", "cache_dir"],
    "quantization": ["w_bits", "a_bits", "weight_symmetric", "act_symmetric", "quantize_attention_matmuls", "split_skip", "keep_fp"],
    "settings": ["weight_range", "act_range", "percentile", "batch_size", "iters", "act_iters", "lr", "reg_weight", "beta_start",
                 "tau", "outer_iters", "init_logit", "base"],
    "report": ["num_samples", "grid", "seed", "batch_size"],
}
TOP = ["model", "algorithm", "name", "sampler", "calibration", "quantization", "settings", "report"]
VALUES = [-1, 0, 1, 2, 3, 4, 8, 32, 0.5, 1.5, -0.0, 1e9, 2**31, 2**63, -(2**63), 2**64, float("nan"), float("inf"), float("-inf"),
          "", " ", "x", "/", "..", "a/b", "1", "true", None, True, False, [], {}, [1, 2], ["conv_in"], ["nonexistent_layer"],
          ["*attn*"], ["conv_in", "conv_out"], "embedded", "minmax", "uniform", "temporal", "gradient_aligned", "nope",
          "max", "mse", "percentile", "minmax", "ddim", "dot", "temporal", {"a": 1}, "\x00", "é", "sentinel"]
TEXT_ODDITIES = ["alias", "deep", "duplicate", "non_utf8", "tabs", "empty", "scalar", "list", "binary", "huge_int", "bom"]


@dataclass
class Env:
    """A working directory with a tiny model, a sentinel folder and bad input files."""
    root: str
    model_dir: str
    n_cases: int = 0
    n_ok: int = 0
    n_complete: int = 0
    n_rejected: int = 0
    failures: list = field(default_factory=list)

    @classmethod
    def create(cls, root: str, model_dir: str) -> "Env":
        env = cls(root, model_dir)
        sentinel = os.path.join(root, "sentinel")
        os.makedirs(os.path.join(sentinel, "sub"), exist_ok=True)
        for name, text in (("data.txt", "user data\n"), ("sub/more.txt", "more\n"), ("report.json", "{\"mine\": 1}\n"),
                           ("samples.png", "not a png\n"), ("model.onnx", "user onnx\n")):
            with open(os.path.join(sentinel, name), "w") as f:
                f.write(text)
        bad = os.path.join(root, "bad")
        os.makedirs(bad, exist_ok=True)
        with open(os.path.join(bad, "garbage.onnx"), "wb") as f:
            f.write(b"\x08\x07garbage" * 50)
        with open(os.path.join(bad, "noise.npy"), "wb") as f:
            f.write(b"not numpy")
        return env

    # -- base recipe ----------------------------------------------------------------------------
    def base_recipe(self) -> dict:
        return dict(model=self.model_dir, algorithm="minmax", name="fuzz",
                    sampler=dict(num_inference_steps=4),
                    calibration=dict(n_per_step=4, interval=1, n_groups=2, val_fraction=0.25, batch_size=8,
                                     cache_dir=os.path.join(self.root, "cache")),
                    quantization=dict(w_bits=4, a_bits=8),
                    settings=dict(batch_size=16),
                    report=dict(num_samples=2, grid=2, batch_size=2))

    def out_choices(self) -> list[str]:
        r = self.root
        return [os.path.join(r, "out", "fresh"), os.path.join(r, "sentinel"), os.path.join(r, "sentinel", "data.txt"),
                os.path.join(r, "sentinel", "data.txt", "under"), r, ".", "..", os.path.join(r, "out", "fresh"), self.model_dir,
                os.path.join(r, "cache"), ""]

    # -- running one case ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, str]:
        """Content hashes of everything a case must not change: the sentinel, the model, the bad inputs."""
        snap = {}
        for top in (os.path.join(self.root, "sentinel"), self.model_dir, os.path.join(self.root, "bad")):
            for base, dirs, files in os.walk(top):
                for d in dirs:
                    snap[os.path.join(base, d)] = "dir"
                for f in files:
                    p = os.path.join(base, f)
                    with open(p, "rb") as fh:
                        snap[p] = hashlib.sha256(fh.read()).hexdigest()
        return snap

    def run(self, argv: list[str], label: str, out: str | None = None, dry_run: bool = False,
            complete_files: tuple[str, ...] = ()) -> int:
        """Run ``gaq argv`` in ``root``; record a failure if the outcome breaks the contract."""
        self.n_cases += 1
        before = self.snapshot()
        allowed = self.may_change(out, "--overwrite" in argv, before)
        target = os.path.abspath(os.path.join(self.root, out)) if out else None
        existed = target is not None and os.path.lexists(target)
        err = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.root)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = main(argv)
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else 2
                except BaseException as e:  # noqa: BLE001 - anything escaping main is a failure
                    rc, _ = -1, err.write(f"escaped: {type(e).__name__}: {e}")
        finally:
            os.chdir(cwd)
        text = err.getvalue()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("gaq: warning:")]
        problems = []
        if rc == 0:
            self.n_ok += 1
            if dry_run:
                if target and not existed and os.path.lexists(target):
                    problems.append("dry run wrote its output")
            elif complete_files and target:
                missing = [f for f in complete_files if not os.path.isfile(os.path.join(target, f))]
                manifest = os.path.join(target, "gaq-manifest.json")
                if missing or not os.path.isfile(manifest) or not json.load(open(manifest)).get("complete"):
                    problems.append(f"exit 0 but output incomplete (missing {missing})")
                else:
                    self.n_complete += 1
        elif rc == 2 or rc == 130:
            self.n_rejected += 1
            if len(lines) != 1:
                problems.append(f"{len(lines)} lines on stderr")
        else:
            problems.append(f"exit {rc}")
        if "Traceback" in text:
            problems.append("traceback")
        after = self.snapshot()
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and not self._allowed(k, allowed, before))
        if changed:
            problems.append(f"changed outside the output: {changed[:3]}")
        if after != before:
            self.restore_sentinel()
        if problems:
            self.failures.append(dict(case=label, argv=argv, problems=problems, stderr=text[-600:]))
        return rc

    def may_change(self, out: str | None, overwrite: bool, before: dict[str, str]) -> set[str] | None:
        """What a case may change, decided before it runs: inside an output folder, the files gaq's manifest
        owned then and new files; an output file (and its .data) only if it is new or ``--overwrite`` was given.
        Returns a set of paths, or None meaning "any path not in the snapshot before" (checked by the caller)."""
        if not out:
            return set()
        target = os.path.abspath(os.path.join(self.root, out))
        allowed = {p for p in (target, target + ".data") if overwrite or p not in before}
        if os.path.basename(target) == "model.onnx":  # Optimum's layout: a new config.json beside it, never a replaced one
            allowed |= {p for p in [os.path.join(os.path.dirname(target), "config.json")] if p not in before}
        manifest = os.path.join(target, "gaq-manifest.json")
        if os.path.isdir(target):
            allowed = {manifest}
            if os.path.isfile(manifest):
                with open(manifest) as f:
                    allowed |= {os.path.join(target, name) for name in json.load(f)["files"]}
            allowed |= {"NEW:" + target}
        return allowed

    @staticmethod
    def _allowed(path: str, allowed: set[str], before: dict[str, str]) -> bool:
        if path in allowed:
            return True
        return any(a.startswith("NEW:") and path.startswith(a[4:] + os.sep) and path not in before for a in allowed)

    def restore_sentinel(self) -> None:
        shutil.rmtree(os.path.join(self.root, "sentinel"), ignore_errors=True)
        Env.create(self.root, self.model_dir)


# ------------------------------------------------------------------------------------------------
# Recipe mutations

def recipe_mutation():
    path = st.one_of(st.sampled_from(TOP), st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks]),
                     st.sampled_from(["extra", "sampler.extra", "calibration.nope", "settings.unknown"]))
    op = st.sampled_from(["set", "set", "set", "delete"])
    return st.tuples(op, path, st.sampled_from(VALUES))


@st.composite
def recipe_cases(draw):
    muts = draw(st.lists(recipe_mutation(), min_size=0, max_size=3))
    oddity = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(TEXT_ODDITIES)))
    out_index = draw(st.integers(0, 10))
    overwrite = draw(st.booleans())
    return muts, oddity, out_index, overwrite


def apply_mutations(recipe: dict, muts) -> dict:
    recipe = copy.deepcopy(recipe)
    for op, path, value in muts:
        node, parts = recipe, path.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if op == "delete":
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return recipe


def recipe_text(recipe: dict, oddity: str | None) -> bytes:
    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    if oddity == "alias":
        text += "loop: &a [*a]\n"
    elif oddity == "deep":
        text += "settings: " + "[" * 200 + "]" * 200 + "\n"
    elif oddity == "duplicate":
        text += "algorithm: minmax\n"
    elif oddity == "tabs":
        text = text.replace("  ", "\t")
    elif oddity == "empty":
        text = ""
    elif oddity == "scalar":
        text = "42\n"
    elif oddity == "list":
        text = "- model\n- algorithm\n"
    elif oddity == "huge_int":
        text = text.replace("num_samples: 2", "num_samples: " + "9" * 400)
    elif oddity == "bom":
        text = "\ufeff" + text
    data = text.encode("utf-8")
    if oddity == "non_utf8":
        data += b"name: \xff\xfe\n"
    elif oddity == "binary":
        data = bytes(range(256)) * 4
    return data


def check_recipe_case(env: Env, case, real_run_budget: list[int]) -> None:
    muts, oddity, out_index, overwrite = case
    recipe = apply_mutations(env.base_recipe(), muts)
    path = os.path.join(env.root, "recipe.yaml")
    with open(path, "wb") as f:
        f.write(recipe_text(recipe, oddity))
    out = env.out_choices()[out_index]
    argv = ["quantize", path, "--out", out, "--quiet", "--dry-run"] + (["--overwrite"] if overwrite else [])
    label = f"recipe {muts} oddity={oddity} out={out!r} overwrite={overwrite}"
    rc = env.run(argv, label, out, dry_run=True)
    if rc == 0 and out_index in (0, 1, 7) and real_run_budget[0] > 0 and _cheap(recipe):
        real_run_budget[0] -= 1
        env.run(argv[:-1] if not overwrite else argv[:-2] + ["--overwrite"], label + " (real)", out,
                complete_files=("quantized_unet.safetensors", "recipe.yaml", "report.json", "samples.png"))
        if out_index != 1:  # never delete the sentinel
            shutil.rmtree(out, ignore_errors=True)


def _cheap(recipe: dict) -> bool:
    try:
        s, c, r = recipe["sampler"], recipe["calibration"], recipe["report"]
        return (recipe.get("algorithm") == "minmax" and s.get("num_inference_steps", 50) * c.get("n_per_step", 64) <= 64
                and r.get("num_samples", 64) <= 8 and r.get("batch_size", 64) <= 64 and c.get("batch_size", 256) <= 256)
    except (AttributeError, TypeError, KeyError):
        return False


# ------------------------------------------------------------------------------------------------
# CLI argument mutations (the subcommands that do not take a recipe)

def cli_pools(env: Env, quantized: str, onnx_path: str) -> dict[str, dict[str, list]]:
    r, bad = env.root, os.path.join(env.root, "bad")
    dirs = [quantized, os.path.join(bad, "truncated"), os.path.join(bad, "mismatch"), os.path.join(bad, "missing"),
            os.path.join(r, "sentinel"), os.path.join(r, "sentinel", "data.txt"), bad]
    outs = [os.path.join(r, "out", "x.onnx"), os.path.join(r, "sentinel", "model.onnx"), os.path.join(r, "sentinel"),
            os.path.join(r, "sentinel", "data.txt", "x.onnx"), ""]
    ints = ["0", "-1", "1", "2", "x", "1.5", "nan", str(2**64), "99999999999999999999"]
    return {
        "export": {"dir": dirs, "--out": outs, "--weights": ["int8", "int4", "int2"], "--opset": ["13", "21", "12", "x", "-1"],
                   "--check-samples": ["8", "0", "-3", "x"]},
        "sample": {"--onnx": [onnx_path, os.path.join(bad, "garbage.onnx"), os.path.join(r, "missing.onnx"), os.path.join(r, "sentinel")],
                   "--out": [os.path.join(r, "out", "s.png"), os.path.join(r, "sentinel", "samples.png"), os.path.join(r, "sentinel"),
                             os.path.join(r, "sentinel", "data.txt", "s.png")],
                   "--num-samples": ["1", "2"] + ints, "--steps": ["2"] + ints, "--eta": ["0", "1", "nan", "inf", "-0.5", "2", "x"],
                   "--seed": ["0", "-1", str(2**32), str(2**64), "x"], "--batch-size": ["1", "0", "-1"],
                   "--noise": [os.path.join(bad, "noise.npy"), os.path.join(r, "missing.npy")]},
        "eval": {"dir": dirs[1:], "--num-samples": ["4", "3", "0", "x", str(10**12)], "--steps": ["0", "2", "x"],
                 "--seed": ["0", "-1", str(2**40)], "--cache-dir": [os.path.join(r, "sentinel", "data.txt"), "", os.path.join(r, "cache")]},
        "bench": {"dirs": dirs[1:], "--json": [os.path.join(r, "sentinel", "report.json"), os.path.join(r, "out", "b.json")],
                  "--batch": ["0", "1", "x"], "--repeats": ["1", "3", "x"], "--threads": ["-1", "1"]},
        "train": {"--out": [os.path.join(r, "sentinel"), r, ".", os.path.join(r, "sentinel", "data.txt"), ""],
                  "--steps": ["0", "-1", "x"], "--lr": ["nan", "inf", "0", "-1"], "--seed": ["-1", str(2**64)],
                  "--batch-size": ["0", "x"]},
    }


@st.composite
def cli_cases(draw, pools):
    cmd = draw(st.sampled_from(sorted(pools)))
    pool = pools[cmd]
    keys = draw(st.lists(st.sampled_from(sorted(pool)), min_size=1, max_size=len(pool), unique=True))
    args = {k: draw(st.sampled_from(pool[k])) for k in keys}
    overwrite = draw(st.booleans())
    return cmd, args, overwrite


def check_cli_case(env: Env, case, pools) -> None:
    cmd, args, overwrite = case
    argv = [cmd]
    positional = [k for k in ("dir", "dirs") if k in pools[cmd]]
    for k in positional:
        argv.append(args.get(k, pools[cmd][k][0]))
    for k in ("--out", "--onnx", "--json"):  # required flags default to the first (valid) choice
        if k in pools[cmd] and k not in args:
            args[k] = pools[cmd][k][0]
    for k, v in args.items():
        if k not in positional:
            argv += [k, v]
    if cmd not in ("eval", "train"):  # a train run that gets through would train for minutes
        argv += ["--overwrite"] if overwrite else []
    argv += ["--quiet"] if cmd != "train" else []
    out = args.get("--out") or args.get("--json")
    env.run(argv, f"cli {argv}", out)
    if out and "out" + os.sep in out:
        for p in (out, out + ".data"):
            if os.path.isfile(p):
                os.remove(p)


def make_bad_folders(env: Env, quantized: str) -> None:
    """Broken copies of a quantized folder: truncated weights, weights for another model, files missing."""
    bad = os.path.join(env.root, "bad")
    for name in ("truncated", "mismatch", "missing"):
        shutil.copytree(quantized, os.path.join(bad, name))
    w = os.path.join(bad, "truncated", "quantized_unet.safetensors")
    with open(w, "rb") as f:
        data = f.read()
    with open(w, "wb") as f:
        f.write(data[: len(data) // 2])
    cfg_path = os.path.join(bad, "mismatch", "unet_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    os.remove(os.path.join(bad, "missing", "quantized_unet.safetensors"))
