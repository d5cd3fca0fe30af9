"""The project's promises about itself: CI runs the README's test command; the embedded model ships; no two
modules import each other."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", text)


def test_ci_runs_exactly_the_readme_test_command():
    cmds = _readme_commands()
    test_cmd = [c for c in cmds if "pytest" in c]
    assert len(test_cmd) == 1
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert test_cmd[0] in ci.splitlines()


def test_readme_main_command_quantizes_the_shipped_w4a8_recipe():
    main = [c for c in _readme_commands() if "gaq quantize" in c]
    assert main and "recipes/ddpm-mnist-w4a8.yaml" in main[0]
    assert os.path.exists(os.path.join(ROOT, "recipes", "ddpm-mnist-w4a8.yaml"))


def _package_modules() -> dict[str, str]:
    mods = {}
    for pkg in ("gaq_backend", "exporters"):
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    mods[name.removesuffix(".__init__")] = path
    return mods


def _imported(name: str, path: str, mods: dict[str, str]) -> set[str]:
    """Every package module ``name`` imports, at module level or inside a function."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {next((c for c in (f"{base}.{a.name}", base) if c in mods), None) for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in mods and m != name}


def test_no_two_modules_import_each_other():
    mods = _package_modules()
    graph = {m: _imported(m, p, mods) for m, p in mods.items()}
    related = lambda a, b: a.startswith(b + ".") or b.startswith(a + ".")  # noqa: E731  (a package and its own modules)
    knots = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph[b] and not related(a, b)})
    assert not knots, f"modules that import each other (split the shared piece out): {knots}"
    assert "exporters.validate" in graph and "gaq_backend.calibration.recorder" in graph   # the walk found the packages
