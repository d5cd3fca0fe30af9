"""The README and docs/ cannot rot silently: every relative link resolves (the file, and the heading an anchor
names), every repository path they mention exists, every `gaq ...` command in their bash blocks parses with the
real CLI parser, and every script they run exists. (Their Python examples run in test_front_doors.py.)"""
import os
import re
import shlex

import pytest

from gaq_backend.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
REPO_DIRS = ("benchmarks/", "experiments/", "tests/", "gaq_backend/", "exporters/", "recipes/", "docs/")


def _text(page: str) -> str:
    return open(os.path.join(ROOT, page)).read()


def _prose(text: str) -> str:
    """The page without its fenced blocks (links and paths in code are not links)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, markup dropped, punctuation but '-' and '_' dropped, spaces -> '-'."""
    h = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h.replace("`", "")).replace(" ", "-")


def _anchors(page: str) -> set[str]:
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", _prose(_text(page)), flags=re.M)}


def _bash_commands(page: str):
    """Each simple command of each bash block line (continuations joined, comments and placeholders dropped)."""
    for block in re.findall(r"```bash\n(.*?)```", _text(page), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line)   # [--optional flags] in a usage line
            line = re.sub(r"\$\(\([^)]*\)\)", "0", line)   # shell arithmetic $((n / 2))
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            cmd = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", "||", "|", ";"):
                    if cmd:
                        yield line, cmd
                    cmd = []
                elif cmd or not re.match(r"^[A-Z_]+=", tok):   # leading VAR=value assignments
                    cmd.append(tok)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(_text(page))):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in _anchors(os.path.relpath(full, ROOT)):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page}: {broken}"


@pytest.mark.parametrize("page", PAGES)
def test_every_repository_path_mentioned_exists(page):
    paths = set(re.findall(r"(?<![\w./-])((?:%s)[\w./-]*\w)(?![\w./\[-])" % "|".join(map(re.escape, REPO_DIRS)), _text(page)))
    missing = sorted(p for p in paths if "*" not in p and not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{page} mentions paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_every_documented_command_parses_and_its_script_exists(page):
    bad = []
    for line, cmd in _bash_commands(page):
        if cmd[0] == "torchrun" and "gaq_backend.cli" in cmd:
            cmd = ["gaq"] + cmd[cmd.index("gaq_backend.cli") + 1:]
        if cmd[0] == "gaq":
            try:
                build_parser().parse_args(cmd[1:])
            except SystemExit:
                bad.append(f"does not parse: {line.strip()}")
        elif cmd[0] in ("python", "python3", "bash") and len(cmd) > 1 and cmd[1].endswith((".py", ".sh")):
            if not os.path.exists(os.path.join(ROOT, cmd[1])):
                bad.append(f"no such script: {cmd[1]}")
    assert not bad, f"{page}: {bad}"


def test_the_checks_see_the_pages():
    """The walk finds the commands and links it checks (a regex that matches nothing would pass everything)."""
    commands = [c for p in PAGES for _, c in _bash_commands(p)]
    assert sum(c[0] == "gaq" for c in commands) >= 20
    assert {"quantize", "export", "eval", "sample", "bench", "train"} <= {c[1] for c in commands if c[0] == "gaq"}
    assert "the-best-recipe-and-its-levers" in _anchors("docs/benchmarks.md")
    assert _anchor("Distributed reconstruction (`torchrun`)") == "distributed-reconstruction-torchrun"
