"""The long fuzz corpus of issue 12: mutated recipes and CLI arguments against the reliability contract.

    python benchmarks/fuzz_cli.py --recipes 500 --cli 150 --seed 0 --json runs/fuzz.json

Same harness as tests/test_reliability.py (tests/fuzz.py), on a tiny random UNet2DModel built here, with
more cases and a chosen seed. A case passes if it exits 0 with a complete output (or, for the
``--dry-run`` recipe cases, writes nothing), or exits non-zero with at most three lines on stderr and no
traceback, and leaves the sentinel folder, the model and the bad inputs unchanged. Prints the counts and
every failure; exit 1 if any case failed.
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
    fuzz.make_bad_folders(env, quantized)
    onnx_path = os.path.join(work, "tiny.onnx")
    assert gaq(["export", quantized, "--out", onnx_path, "--check-samples", "4", "--quiet"]) == 0
    opts = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    budget = [real_runs]
    pools = fuzz.cli_pools(env, quantized, onnx_path)
    t0 = time.perf_counter()

    @seed(seed_value)
    @settings(opts, max_examples=n_recipes)
    @given(case=fuzz.recipe_cases())
    def recipes(case):
        fuzz.check_recipe_case(env, case, budget)

    @seed(seed_value)
    @settings(opts, max_examples=n_cli)
    @given(case=fuzz.cli_cases(pools))
    def cli(case):
        fuzz.check_cli_case(env, case, pools)

    recipes()
    n_recipe_cases = env.n_cases
    cli()
    return dict(seed=seed_value, recipe_examples=n_recipes, cli_examples=n_cli, cases=env.n_cases, recipe_cases=n_recipe_cases,
                cli_cases=env.n_cases - n_recipe_cases, exit_0=env.n_ok, complete_outputs_checked=env.n_complete,
                rejected=env.n_rejected, failures=env.failures, seconds=round(time.perf_counter() - t0, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", type=int, default=500)
    p.add_argument("--cli", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-runs", type=int, default=20, help="dry-run-valid cheap recipes also run for real")
    p.add_argument("--json")
    a = p.parse_args()
    res = run(a.recipes, a.cli, a.seed, a.real_runs)
    print(f"{res['cases']} cases ({res['recipe_cases']} recipe, {res['cli_cases']} CLI): {res['exit_0']} exit 0 "
          f"({res['complete_outputs_checked']} complete outputs checked), {res['rejected']} rejected, "
          f"{len(res['failures'])} failures, {res['seconds']} s")
    for f in res["failures"]:
        print(json.dumps(f))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
