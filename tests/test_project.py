"""The project's promises about itself: CI runs the README's test command; the embedded model ships."""
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
