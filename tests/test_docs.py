"""Every link and every command in the README, docs/*.md and bench/research/README.md is checked.

- Links: every relative link's target exists (file or directory); an anchor into a .md file names
  one of its headings, slugged as GitHub slugs them.
- `mtcore ...` commands, in fenced shell blocks (continuation lines joined, comments, `&&` / `|` /
  `;` and `NAME=value` prefixes handled, `torchrun ... -m mtcore ...` too) and in inline code: the
  subcommand exists and every `--option` is one of its options, read from the click group
  (`mtcore.cli.main`).
- `python bench/...py` commands: the script exists and each `--option` appears in its source (or
  in bench/common.py, whose parser the kernel benchmarks share); in the slow set, `--help` runs in a
  subprocess, exits 0 and lists each option. Every bench/, mtcore/, kernels/ and tests/ .py path
  the docs name exists.

Which commands run and which are only parsed: `mtcore --help` and `mtcore <command> --help` for
every command the docs name run in-process (click's CliRunner), as does every fenced `mtcore info`
whose checkpoint is in this repository (the toy assets); `python bench/memory_plan.py` runs, and its
tables must be docs/scale-out.md's, row for row. Everything else is only parsed: the toy
`mtcore train` (about 35 s; tests/test_loop.py runs the toy world in the slow set), commands that
need a real model, data or a GPU, torchrun lines, and the benchmarks (minutes each). The slow set
runs each bench script's `--help` in a subprocess: most import torch first, about 2 s each.
The non-slow part takes about 5 s.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mtcore.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "research" / "README.md"]
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
SEPARATORS = {"&&", "||", "|", ";", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPTION = re.compile(r"^--?[A-Za-z][\w-]*")
PLACEHOLDERS = {"...", "…"}  # `torchrun ... -m mtcore ...`: a command left unnamed


# ------------------------------------------------------------------------------------------------
# Markdown: fenced blocks, prose, headings, links
# ------------------------------------------------------------------------------------------------

def split_fences(text: str) -> tuple[list[tuple[str, str]], str]:
    """(the fenced blocks as (language, body), the prose with those blocks blanked out)."""
    blocks, prose, lines = [], [], iter(text.split("\n"))
    for line in lines:
        m = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if not m:
            prose.append(line)
            continue
        fence, body = m.group(1), []
        for inner in lines:
            if inner.strip().startswith(fence):
                break
            body.append(inner)
        blocks.append((m.group(2).lower(), "\n".join(body)))
        prose.append("")
    return blocks, "\n".join(prose)


def code_spans(prose: str) -> list[str]:
    """Inline code, a span possibly running over a line break, whitespace collapsed."""
    return [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a markdown text (repeats get -1, -2, ... as on GitHub)."""
    _, prose = split_fences(text)
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        s = slug(m.group(1))
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def link_problems(path: Path, text: str) -> list[str]:
    """Relative links whose target does not exist, or whose #anchor names no heading of it."""
    _, prose = split_fences(text)
    prose = re.sub(r"(?<!`)`[^`]+`(?!`)", "code", prose)  # a link's syntax inside code is not a link
    problems = []
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{path.name}: link to {target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{path.name}: link to {target}: no heading #{anchor} in {dest.name}")
    return problems


# ------------------------------------------------------------------------------------------------
# Commands: mtcore and python bench/
# ------------------------------------------------------------------------------------------------

def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block, as argument lists (quotes removed, comments dropped,
    continuation lines joined, split at && || | ; &)."""
    commands = []
    for line in block.replace("\\\n", " ").split("\n"):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for token in lexer:
            if token in SEPARATORS:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def inline_command(span: str) -> list[str]:
    """An inline code span as an argument list: quoted text and [ ] | { } dropped, so that a synopsis
    like `mtcore dpo [--beta 0.01] [--loss-type sigmoid|ipo|hinge]` reads as its words."""
    span = re.sub(r"\"[^\"]*\"|'[^']*'", " ", span)
    return re.sub(r"[\[\]|{}]", " ", span).split()


def classify(argv: list[str]) -> tuple[str, list[str]] | None:
    """("mtcore", args after `mtcore`) or ("bench", [script, args...]) or None for anything else."""
    while argv and ENV_ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    if argv[0] == "mtcore":
        return "mtcore", argv[1:]
    if argv[0] in ("torchrun", "python", "python3") and "-m" in argv:
        i = argv.index("-m")
        if i + 1 < len(argv) and argv[i + 1] == "mtcore":
            return "mtcore", argv[i + 2:]
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].startswith("bench/") and argv[1].endswith(".py"):
        return "bench", argv[1:]
    return None


def options_of(argv: list[str]) -> list[str]:
    return [OPTION.match(a).group(0) for a in argv if OPTION.match(a)]


def click_options(command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return names


def mtcore_problems(args: list[str], where: str) -> list[str]:
    """An unknown subcommand, or an option the subcommand does not have."""
    if not args or args[0].startswith("-"):
        command, name = main, "mtcore"
        known = click_options(main) | {"--version"}
    elif args[0] in PLACEHOLDERS:
        return []
    elif args[0] not in main.commands:
        return [f"{where}: `mtcore {args[0]}`: no such command (the commands: {', '.join(sorted(main.commands))})"]
    else:
        command, name = main.commands[args[0]], f"mtcore {args[0]}"
        known = click_options(command)
        args = args[1:]
    return [f"{where}: `{name}` has no option {opt}" for opt in options_of(args) if opt not in known]


def bench_problems(argv: list[str], where: str) -> list[str]:
    """A bench script that does not exist, or an option that appears neither in its source nor in
    bench/common.py (the kernel benchmarks' shared parser)."""
    script = ROOT / argv[0]
    if not script.is_file():
        return [f"{where}: {argv[0]} does not exist"]
    source = script.read_text() + (ROOT / "bench" / "common.py").read_text()
    return [f"{where}: {argv[0]} has no option {opt}" for opt in options_of(argv[1:])
            if opt not in ("--help", "-h") and f'"{opt}"' not in source]


def doc_commands(path: Path, text: str) -> list[tuple[str, list[str], str, bool]]:
    """(kind, argv, where, fenced) of every mtcore and bench command of a markdown text."""
    blocks, prose = split_fences(text)
    out = []
    for lang, body in blocks:
        if lang in SHELL_LANGS:
            for argv in shell_commands(body):
                found = classify(argv)
                if found:
                    out.append((*found, f"{path.name}: `{' '.join(argv)}`", True))
    for span in code_spans(prose):
        found = classify(inline_command(span))
        if found:
            out.append((*found, f"{path.name}: `{span}`", False))
    return out


def path_problems(path: Path, text: str) -> list[str]:
    """Source files the text names (bench/, mtcore/, kernels/, tests/ ... .py) that do not exist."""
    names = set(re.findall(r"(?<![\w/.])((?:bench|mtcore|kernels|tests)/[\w/.-]*\w\.py)\b", text))
    return [f"{path.name}: names {name}, which does not exist" for name in sorted(names) if not (ROOT / name).exists()]


def all_commands():
    return [c for path in DOCS for c in doc_commands(path, path.read_text())]


# ------------------------------------------------------------------------------------------------
# The documents
# ------------------------------------------------------------------------------------------------

def test_readme_is_short_and_self_contained():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split("\n")) - (readme.endswith("\n")) <= 300, "README.md is over 300 lines"
    for path in DOCS:
        assert "../shared" not in path.read_text(), f"{path} refers outside the project (../shared)"
    assert (ROOT / "docs" / "algorithm.md").is_file()


def test_readme_has_the_ci_test_command_verbatim():
    """.ci/run runs the README's test command only if it is there verbatim, on a line of its own."""
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"^CMD='(.*)'$", ci, re.M).group(1)
    lines = (ROOT / "README.md").read_text().split("\n")
    assert cmd in lines
    assert ("python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && "
            "mtcore train --iters 3") in lines


def test_ci_also_runs_the_quick_suite_on_the_gpu_images_versions():
    """The second run of .ci/run: the quick suite from the clone's root, pinned to ci/gpu-image.txt."""
    ci = (ROOT / ".ci" / "run").read_text()
    pins = dict(line.split("==") for line in (ROOT / "ci" / "gpu-image.txt").read_text().split("\n")
                if line and not line.startswith("#"))
    assert pins == {"triton": "3.6.0", "transformers": "5.17.0", "numpy": "2.4.6"}
    assert "-c ci/gpu-image.txt" in ci and 'python -m pytest -m "not slow"' in ci
    assert "kernels" not in pins  # the image has no Hugging Face kernels; neither does the venv


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links(path):
    problems = link_problems(path, path.read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_source_files_exist(path):
    problems = path_problems(path, path.read_text())
    assert not problems, "\n".join(problems)


def test_mtcore_commands_parse():
    commands = [c for c in all_commands() if c[0] == "mtcore"]
    assert len(commands) > 20, "the docs should show the commands"
    problems = [p for _, args, where, _ in commands for p in mtcore_problems(args, where)]
    assert not problems, "\n".join(problems)


def test_bench_commands_parse():
    commands = [c for c in all_commands() if c[0] == "bench"]
    assert commands, "the docs should show the benchmarks"
    problems = [p for _, argv, where, _ in commands for p in bench_problems(argv, where)]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# The commands that run
# ------------------------------------------------------------------------------------------------

def test_mtcore_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in main.commands:
        assert name in result.output


def named_subcommands() -> list[str]:
    return sorted({args[0] for kind, args, _, _ in all_commands()
                   if kind == "mtcore" and args and args[0] in main.commands})


def test_every_named_command_has_help():
    names = named_subcommands()
    assert {"train", "generate", "info", "eval"} <= set(names)
    for name in names:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, f"mtcore {name} --help: {result.output}"
        assert "Usage:" in result.output


def test_fenced_info_commands_run(monkeypatch):
    """`mtcore info` on a checkpoint of this repository (the toy assets) runs, as the docs show it."""
    monkeypatch.chdir(ROOT)
    runs = [(args, where) for kind, args, where, fenced in all_commands()
            if kind == "mtcore" and fenced and args[:1] == ["info"] and len(args) > 1 and (ROOT / args[1]).is_dir()]
    assert runs, "the README shows `mtcore info` on the toy assets"
    for args, where in runs:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"{where}: {result.output}"
        assert re.search(r": Llama (policy|reward), [\d.]+M parameters", result.output), result.output


def test_memory_plan_runs_and_equals_the_docs():
    """`python bench/memory_plan.py` (computed, no GPU, ~2 s): every table row it prints is in
    docs/scale-out.md, so the memory and disk plans there cannot drift from the script."""
    out = subprocess.run([sys.executable, "bench/memory_plan.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.split("\n") if line.startswith("| ") and not line.startswith("| stage ")]
    assert len(rows) >= 10, out.stdout
    doc = (ROOT / "docs" / "scale-out.md").read_text().split("\n")
    missing = [row for row in rows if row not in doc]
    assert not missing, "rows of bench/memory_plan.py not in docs/scale-out.md:\n" + "\n".join(missing)


def bench_scripts() -> list[str]:
    return sorted({argv[0] for kind, argv, _, _ in all_commands() if kind == "bench"})


@pytest.mark.slow
@pytest.mark.parametrize("script", bench_scripts())
def test_bench_help(script):
    """Each bench script the docs show answers --help, and lists every option the docs give it."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    used = {opt for kind, argv, _, _ in all_commands() if kind == "bench" and argv[0] == script
            for opt in options_of(argv[1:])}
    missing = [opt for opt in sorted(used) if opt not in out.stdout]
    assert not missing, f"{script} --help does not list {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench" / "research").glob("*.py")))
def test_research_script_help(script):
    """bench/research/README.md says how to run each research script: each answers --help from there."""
    out = subprocess.run([sys.executable, f"bench/research/{script}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"[{script}]({script})" in (ROOT / "bench" / "research" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------
# The checks themselves can fail
# ------------------------------------------------------------------------------------------------

BROKEN = """# Title

## A heading, with `code`

See [a file](no/such/file.md), [a heading](#a-heading-with-code), [no heading](#nowhere),
[the README](../README.md#set-up) and [a bad anchor](../README.md#no-such-section).

```bash
MTCORE_DEVICE=cpu mtcore train --iters 1 \\
    --no-such-option 3 && mtcore nosuch --x
torchrun --nproc_per_node 2 -m mtcore dpo --policy P --beta 0.1   # a comment --not-an-option
python bench/memory_plan.py --gpus 8 --no-such-flag
python bench/no_such_script.py
```

Inline: `mtcore generate --policy DIR [--decode-mode auto|eager] [--bogus]` and `mtcore train --no-m-step`.
"""


def test_the_checker_finds_broken_links(tmp_path):
    path = tmp_path / "docs" / "page.md"
    path.parent.mkdir()
    path.write_text(BROKEN)
    (tmp_path / "README.md").write_text("# mtcore\n\n## Set up\n")
    problems = link_problems(path, BROKEN)
    assert len(problems) == 3, problems
    assert "no/such/file.md" in problems[0] and "#nowhere" in problems[1] and "#no-such-section" in problems[2]
    assert slug("Smaller DPO steps: `--tau 0 --dpo-lr 5e-6`") == "smaller-dpo-steps---tau-0---dpo-lr-5e-6"
    assert slug("Issue #14's targets") == "issue-14s-targets"


def test_the_checker_finds_bad_commands(tmp_path):
    commands = doc_commands(tmp_path / "page.md", BROKEN)
    kinds = [(kind, argv[:1]) for kind, argv, _, _ in commands]
    assert kinds == [("mtcore", ["train"]), ("mtcore", ["nosuch"]), ("mtcore", ["dpo"]),
                     ("bench", ["bench/memory_plan.py"]), ("bench", ["bench/no_such_script.py"]),
                     ("mtcore", ["generate"]), ("mtcore", ["train"])]
    problems = [p for kind, argv, where, _ in commands
                for p in (mtcore_problems(argv, where) if kind == "mtcore" else bench_problems(argv, where))]
    assert len(problems) == 5, problems
    for expected in ("has no option --no-such-option", "`mtcore nosuch`: no such command",
                     "has no option --no-such-flag", "no_such_script.py does not exist", "has no option --bogus"):
        assert any(expected in p for p in problems), (expected, problems)
    assert path_problems(tmp_path / "page.md", "see `bench/research/nothing.py` and mtcore/cli.py") == [
        "page.md: names bench/research/nothing.py, which does not exist"]
