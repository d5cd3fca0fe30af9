"""The long fuzz corpus: mutated recipes, and every subcommand against broken inputs and unwritable outputs.
Reproduces: docs/benchmarks.md, "Reliability fuzz".

    python benchmarks/fuzz_cli.py --recipes 500 --cli 60 --seed 0 --json runs/fuzz.json

Same harness as tests/test_reliability.py (tests/fuzz.py, broken files from tests/fuzz_inputs.py), on a tiny
random UNet2DModel built here, with more cases, a chosen seed, and the slow valid cases the suite leaves out
(real benchmarks and FID scoring). ``--cli N`` is per subcommand (export, sample, eval, bench, train). A case
passes if it exits 0 with a complete output (or, for the ``--dry-run`` recipe cases, writes nothing), or exits 2
with exactly one line on stderr and no traceback; leaves the sentinel folder, the model and the broken inputs
unchanged; runs no pickle payload; and leaves no temporary. As root it also mounts a full and a read-only tmpfs
to write into. Prints the counts and every failure; exit 1 if any case failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import yaml  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import fuzz  # noqa: E402
import fuzz_inputs  # noqa: E402
from conftest import make_tiny_model_dir, tiny_recipe  # noqa: E402
from gaq_backend.cli import main as gaq  # noqa: E402


def run(n_recipes: int, n_cli: int, seed_value: int, real_runs: int) -> dict:
    work = tempfile.mkdtemp(prefix="gaq-fuzz-")
    model = make_tiny_model_dir(os.path.join(work, "model"))
    recipe = os.path.join(work, "base.yaml")
    with open(recipe, "w") as f:
        yaml.safe_dump(tiny_recipe(model, os.path.join(work, "cache")), f)
    quantized = os.path.join(work, "q")
    assert gaq(["quantize", recipe, "--out", quantized, "--quiet"]) == 0
    root = os.path.join(work, "fuzz")
    os.makedirs(root)
    env = fuzz.Env.create(root, model)
    onnx_path = os.path.join(work, "tiny.onnx")
    assert gaq(["export", quantized, "--out", onnx_path, "--check-samples", "4", "--quiet"]) == 0
    inputs = fuzz_inputs.make_inputs(env.root, quantized, onnx_path)
    optimum = fuzz_inputs.make_optimum_dirs(env.root, quantized)
    opts = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    budget = [real_runs]
    not_mounted = fuzz.mount_faulty_folders(env)
    pools = fuzz.cli_pools(env, inputs, optimum, slow=True)
    t0 = time.perf_counter()

    @seed(seed_value)
    @settings(opts, max_examples=n_recipes)
    @given(case=fuzz.recipe_cases())
    def recipes(case):
        fuzz.check_recipe_case(env, case, budget)

    recipes()
    n_recipe_cases = env.n_cases
    try:
        fuzz.fuzz_every_subcommand(env, pools, n_cli, opts, seed_value)
    finally:
        fuzz.unmount_faulty_folders(env)
    return dict(seed=seed_value, recipe_examples=n_recipes, cli_examples_per_command=n_cli, cases=env.n_cases, recipe_cases=n_recipe_cases,
                cli_cases=env.n_cases - n_recipe_cases, exit_0=env.n_ok, complete_outputs_checked=env.n_complete,
                rejected=env.n_rejected, failures=env.failures, per_command=env.per_command, not_mounted=not_mounted,
                seconds=round(time.perf_counter() - t0, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", type=int, default=500)
    p.add_argument("--cli", type=int, default=60, help="cases per subcommand")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-runs", type=int, default=20, help="dry-run-valid cheap recipes also run for real")
    p.add_argument("--json")
    a = p.parse_args()
    res = run(a.recipes, a.cli, a.seed, a.real_runs)
    print(f"{res['cases']} cases ({res['recipe_cases']} recipe, {res['cli_cases']} CLI): {res['exit_0']} exit 0 "
          f"({res['complete_outputs_checked']} complete outputs checked), {res['rejected']} rejected, "
          f"{len(res['failures'])} failures, {res['seconds']} s")
    for cmd, c in sorted(res["per_command"].items()):
        print(f"  {cmd:8s} {c['cases']:4d} cases, {c['exit_0']:4d} exit 0, {c['rejected']:4d} rejected, {c['failures']} failures, {c['seconds']} s")
    if res["not_mounted"]:
        print(f"  not mounted (not root?): {res['not_mounted']}")
    for f in res["failures"]:
        print(json.dumps(f))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
