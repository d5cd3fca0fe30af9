"""Property-based fuzzing of recipes and of every subcommand's arguments and input files (shared by
tests/test_reliability.py and benchmarks/fuzz_cli.py; the broken files come from tests/fuzz_inputs.py).

Every case runs ``gaq`` in-process and must end in one of two ways: exit 0 with a complete output (or,
for a dry run, no output), or exit 2 with exactly one line on stderr and no traceback. Exit 1 (gaq's
"internal error") counts as a failure: it means a bad input reached code that did not expect it.
Around every case: nothing outside the requested output changes (a sentinel folder of user files named
like gaq's, the model and the broken inputs are hashed), no pickle payload ran (it would create
``PWNED``), and no ``.tmp-gaq-`` temporary is left anywhere.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import time
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
    mounted: list = field(default_factory=list)
    per_command: dict = field(default_factory=dict)

    @classmethod
    def create(cls, root: str, model_dir: str) -> "Env":
        env = cls(root, model_dir)
        sentinel = os.path.join(root, "sentinel")
        os.makedirs(os.path.join(sentinel, "sub"), exist_ok=True)
        for name, text in (("data.txt", "user data\n"), ("sub/more.txt", "more\n"), ("report.json", "{\"mine\": 1}\n"),
                           ("samples.png", "not a png\n"), ("model.onnx", "user onnx\n")):
            with open(os.path.join(sentinel, name), "w") as f:
                f.write(text)
        os.makedirs(os.path.join(root, "bad"), exist_ok=True)
        return env

    # -- base recipe ----------------------------------------------------------------------------
    def base_recipe(self) -> dict:
        return dict(model=self.model_dir, algorithm="minmax", name="fuzz",
                    sampler=dict(num_inference_steps=4),
                    calibration=dict(n_per_step=4, interval=1, n_groups=2, val_fraction=0.25, batch_size=8,
                                     cache_dir=os.path.join(self.root, "cache")),
                    quantization=dict(w_bits=4, a_bits=8),
                    settings=dict(batch_size=16),
                    report=dict(num_samples=2, grid=2, batch_size=2, sensitivity=False))

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
                    if os.path.islink(p):
                        snap[p] = "link:" + os.readlink(p)
                        continue
                    with open(p, "rb") as fh:
                        snap[p] = hashlib.sha256(fh.read()).hexdigest()
        return snap

    def leftovers(self) -> list[str]:
        """Temporaries a finished case left anywhere under the root (a run must remove its own)."""
        return [os.path.join(b, n) for b, ds, fs in os.walk(self.root) for n in ds + fs if n.startswith(".tmp-gaq-")]

    def run(self, argv: list[str], label: str, out: str | None = None, dry_run: bool = False,
            complete_files: tuple[str, ...] = (), more_outputs: tuple[str, ...] = ()) -> int:
        """Run ``gaq argv`` in ``root``; record a failure if the outcome breaks the contract. ``out`` is the main
        output (checked for completeness), ``more_outputs`` the others the command was asked to write."""
        self.n_cases += 1
        before = self.snapshot()
        allowed = set().union(*(self.may_change(o, "--overwrite" in argv, before) for o in (out, *more_outputs)))
        target = os.path.abspath(os.path.join(self.root, out)) if out else None
        existed = target is not None and os.path.lexists(target)
        err = io.StringIO()
        cwd, t0 = os.getcwd(), time.perf_counter()
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
        from fuzz_inputs import PAYLOAD_MARKER

        if os.path.exists(os.path.join(self.root, PAYLOAD_MARKER)):
            problems.append("a pickle payload ran")
            os.remove(os.path.join(self.root, PAYLOAD_MARKER))
        left = self.leftovers()
        if left:
            problems.append(f"left temporaries: {left[:2]}")
            for p in left:
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
        stats = self.per_command.setdefault(argv[0], dict(cases=0, exit_0=0, rejected=0, failures=0, seconds=0.0))
        stats["cases"] += 1
        stats["seconds"] = round(stats["seconds"] + time.perf_counter() - t0, 1)
        stats["exit_0" if rc == 0 else "rejected" if rc in (2, 130) else "failures"] += 1
        stats["failures"] += bool(problems) and rc in (0, 2, 130)
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
        # an output's companions: an ONNX file's external data, gaq train's checkpoint OUT.ckpt
        companions = {p for p in (target + ".data", target + ".ckpt") if overwrite or p not in before}
        if os.path.basename(target) == "model.onnx":  # Optimum's layout: a new config.json beside it, never a replaced one
            companions |= {p for p in [os.path.join(os.path.dirname(target), "config.json")] if p not in before}
        manifest = os.path.join(target, "gaq-manifest.json")
        if os.path.isdir(target):
            allowed = {manifest}
            if os.path.isfile(manifest):
                with open(manifest) as f:
                    allowed |= {os.path.join(target, name) for name in json.load(f)["files"]}
        else:
            allowed = {target} if overwrite or target not in before else set()
        return allowed | companions | {"NEW:" + target}  # and anything new inside the output folder

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
# CLI cases: every subcommand against the broken inputs of tests/fuzz_inputs.py and outputs that cannot be written

def mount_faulty_folders(env: Env) -> dict[str, str]:
    """``full/`` (a tmpfs filled to the last byte) and ``read-only/`` (a read-only tmpfs), where the platform lets
    this process mount (root); returns the reasons for those it could not make. ``unmount_faulty_folders`` undoes it."""
    import subprocess

    skipped = {}
    for name, opts in (("full", "size=64k"), ("read-only", "ro,size=64k")):
        path = os.path.join(env.root, name)
        os.makedirs(path, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True, text=True)
        if proc.returncode != 0:
            skipped[name] = proc.stderr.strip()[:100] or f"mount exited {proc.returncode}"
            continue
        env.mounted.append(path)
        if name == "full":
            with contextlib.suppress(OSError), open(os.path.join(path, "filler"), "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
    return skipped


def unmount_faulty_folders(env: Env) -> None:
    import subprocess

    for path in env.mounted:
        subprocess.run(["umount", path], capture_output=True)
    env.mounted.clear()


def bad_parents(env: Env) -> list[str]:
    """Folders under which no output can ever be created: a dangling link, a link loop, and the faulty mounts."""
    r = env.root
    if not os.path.lexists(os.path.join(r, "dangling-parent")):
        os.symlink(os.path.join(r, "nowhere"), os.path.join(r, "dangling-parent"))
        os.symlink(os.path.join(r, "loop-b"), os.path.join(r, "loop-a"))
        os.symlink(os.path.join(r, "loop-a"), os.path.join(r, "loop-b"))
    return [os.path.join(r, "dangling-parent"), os.path.join(r, "loop-a")] + env.mounted


def cli_pools(env: Env, inputs: dict[str, list[str]], optimum: list[str], slow: bool = True) -> dict[str, dict[str, list]]:
    """``slow=False`` (the suite): ``bench`` never gets a valid folder and ``eval`` never a valid reference, so neither
    benchmarks nor scores (10-20 s a case: the feature network, 2048-d FIDs); ``eval --sample-only`` still runs for
    real. The corpus in benchmarks/fuzz_cli.py runs every case."""
    r = env.root
    weird = [os.path.join(r, "sentinel"), os.path.join(r, "sentinel", "data.txt"), os.path.join(r, "missing"), ""]
    dirs = inputs["quantized"] + weird
    fast = lambda paths: paths if slow else [p for p in paths if p not in inputs["valid"]]  # noqa: E731
    bench_dirs, references = fast(dirs), fast(inputs["reference"])

    def outs(name: str) -> list[str]:
        """A new output, the user's file of that name, the user's folder, a path below a file, an empty name, a name
        too long for the filesystem, and the same name under every folder where nothing can be created."""
        return [os.path.join(r, "out", name), os.path.join(r, "sentinel", name), os.path.join(r, "sentinel"),
                os.path.join(r, "sentinel", "data.txt", name), "", os.path.join(r, "out", "n" * 256 + name),
                *(os.path.join(p, name) for p in bad_parents(env))]
    ints = ["0", "-1", "x", "1.5", "nan", str(2**64)]
    noise = inputs["noise"]
    return {
        "export": {"dir": dirs, "--out": outs("model.onnx") + outs("x.onnx"), "--optimum-from": [""] * 3 + optimum,
                   "--weights": ["int8", "int4", "int2"], "--opset": ["21", "13", "12", "x", "-1"], "--check-samples": ["4", "0", "-3", "x"]},
        "sample": {"--onnx": inputs["onnx"] + weird, "--out": outs("samples.png"), "--npy": [""] * 3 + outs("s.npy") + [noise[0]],
                   "--noise": [""] * 3 + noise, "--num-samples": ["2", "1"] + ints, "--steps": ["2"] + ints,
                   "--eta": ["0", "1", "nan", "inf", "-0.5", "2", "x"], "--seed": ["0", "-1", str(2**32), str(2**64), "x"],
                   "--batch-size": ["2", "0", "-1"]},
        "eval": {"dir": dirs + inputs["images"], "mode": ["", "--sample-only", "--from-images"], "--num-samples": ["4", "3", "0", "x", str(10**12)],
                 "--steps": ["2", "0", "x"], "--seed": ["0", "-1", str(2**40)], "--reference": references + weird,
                 "--reference-count": ["4", "1", "x"],
                 "--cache-dir": [os.path.join(r, "cache"), os.path.join(r, "sentinel", "data.txt"), "", *bad_parents(env)]},
        "bench": {"dirs": bench_dirs, "--json": outs("report.json"), "--markdown": [""] * 3 + outs("b.md") + [os.path.join(r, "out", "report.json")],
                  "--batch": ["1", "0", "x"], "--repeats": ["3", "1", "x"], "--threads": ["1", "-1"],
                  "--work-dir": [os.path.join(r, "cache", "bench"), os.path.join(r, "sentinel", "data.txt"), *bad_parents(env)]},
        "train": {"--out": outs("m"), "checkpoint": inputs["ckpt"], "--steps": ["1", "0", "-1", "x"], "--lr": ["2e-4", "nan", "inf", "0", "-1"],
                  "--seed": ["0", "-1", str(2**64)], "--batch-size": ["4", "0", "x"]},
    }


# what a case gets when it does not draw a flag: the first (valid, cheap) choice for these, nothing for the rest
DEFAULTS = {"export": ["--out", "--check-samples"], "sample": ["--out", "--num-samples", "--steps"],
            "eval": ["--num-samples", "--steps", "--reference"], "bench": ["--json", "--repeats", "--batch", "--threads", "--work-dir"],
            "train": ["--out", "--steps", "--batch-size"]}


@st.composite
def cli_cases(draw, pools, cmd: str):
    pool = pools[cmd]
    keys = draw(st.lists(st.sampled_from(sorted(pool)), min_size=1, max_size=len(pool), unique=True))
    args = {k: draw(st.sampled_from(pool[k])) for k in keys}
    overwrite = draw(st.booleans())
    return cmd, args, overwrite


def fuzz_every_subcommand(env: Env, pools, examples: int, options, seed_value: int | None = None) -> None:
    """``examples`` cases of each subcommand (hypothesis ``options``; ``seed_value`` seeds each command's draw),
    checked by ``check_cli_case``."""
    from hypothesis import given, seed, settings

    for cmd in sorted(pools):
        @settings(options, max_examples=examples)
        @given(case=cli_cases(pools, cmd))
        def cases(case):
            check_cli_case(env, case, pools)
        (seed(seed_value)(cases) if seed_value is not None else cases)()


def check_cli_case(env: Env, case, pools) -> None:
    cmd, args, overwrite = case
    pool = pools[cmd]
    for k in DEFAULTS[cmd]:
        args.setdefault(k, pool[k][0])
    argv = [cmd]
    if "dir" in pool or "dirs" in pool:
        argv.append(args.get("dir", args.get("dirs", pool.get("dir", pool.get("dirs"))[0])))
    for k, v in args.items():
        if k in ("dir", "dirs", "checkpoint"):
            continue
        if k == "mode":
            argv += [v] if v else []
        elif v or k in ("--out", "--json", "--onnx", "--reference", "--cache-dir"):  # empty values of required flags stay
            argv += [k, v]
    if cmd != "eval":
        argv += ["--overwrite"] if overwrite else []
    argv += ["--quiet"] if cmd != "train" else []
    out = args.get("--out") or args.get("--json")
    if cmd == "eval":
        out = argv[1]
    fresh = bool(out) and out.startswith(os.path.join(env.root, "out") + os.sep)
    planted = _plant_checkpoint(out, args.get("checkpoint", "")) if cmd == "train" and fresh else None
    try:
        env.run(argv, f"cli {argv}" + (f" with {planted} at OUT.ckpt" if planted else ""), out,
                more_outputs=tuple(args.get(k) or "" for k in ("--npy", "--markdown")))
    finally:
        if fresh:
            for p in (out, out + ".data", out + ".ckpt", args.get("--npy") or "", args.get("--markdown") or ""):
                if p.startswith(os.path.join(env.root, "out") + os.sep) and os.path.lexists(p):
                    shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def _plant_checkpoint(out: str, source: str) -> str | None:
    """Put a copy of the broken checkpoint ``source`` (a file or a folder) at ``out.ckpt``."""
    if not source or len(os.path.basename(out)) + len(".ckpt") > 255:  # no room for a file named OUT.ckpt
        return None
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.isdir(source):
        os.makedirs(out + ".ckpt", exist_ok=True)
    else:
        shutil.copyfile(source, out + ".ckpt")
    return os.path.basename(source)
