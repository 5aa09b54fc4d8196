"""The examples in README.md and docs/*.md, parsed and run, so that they cannot drift from the code.

The convention:

- A ```console block is run. A line `$ CMD` is a command (continued over following lines when it ends
  with a backslash, or up to the end marker of a `<<'EOF'` here-document); the lines after it, up to the
  next `$ ` line, are its expected output, stdout and stderr together as a terminal shows them. Each
  command runs in its own `bash -c` in the file's scratch directory: files carry over from one command to
  the next, shell variables and `cd` do not (`$?` does). A line
  that is just `...` stands for any number of lines. Blank lines at the end of an output are ignored.
  A command must exit 0 unless its expected output has an `error:` line or the next command is
  `echo $?`.
- A ```pycon block is run by doctest (ELLIPSIS and NORMALIZE_WHITESPACE on).
- A ```console, ```pycon, ```bash, ```sh or ```python block whose first line is
  `# not run by the doc tests: REASON` is not run; the reason is shown to the reader. Any other
  ```bash / ```sh / ```python block is an error: a command in the docs is run, or says why not. (The one
  exception is README.md's first commands, which install the package: tests/test_docs.py runs them
  without their `pip install` steps, and .ci/run runs the test command as written.)
- Both sides are normalised first (`normalise`): durations, rates, sha256 digits, pids and dates vary
  from run to run; everything else, sizes, tables and messages included, must match exactly.

Every file's blocks run in document order in one scratch directory holding links to the repository's
`configs/` and `convert_checkpoint.py`, with no GPU visible (`CUDA_VISIBLE_DEVICES=`), the hub offline
and its cache in the scratch directory, and `python` / `moe-convert` from this interpreter's environment.

To regenerate the expected outputs from real runs: `python tests/docs_examples.py --update [FILE ...]`.
An output that no longer matches is replaced by the actual one; where it had `...` lines, its first
and last lines are kept around one `...` (check the diff).
"""

from __future__ import annotations

import argparse
import doctest
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^# not run by the doc tests: (?P<reason>\S.*)$")
SHELL_LANGS = {"bash", "sh", "shell", "python"}
COMMAND_TIMEOUT_S = 300

# What legitimately varies between runs, replaced on both sides before comparing.
_NORMALISE = [
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)? ?[kKMGT]?B/s\b"), "<rate>"),
    (re.compile(r'"seconds": ?\d+(?:\.\d+)?'), '"seconds": <sec>'),
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)? s(?!\w)"), "<sec> s"),
    (re.compile(r"\b[0-9a-f]{12,64}\b"), "<hex>"),
    (re.compile(r"\bpid \d+"), "pid <n>"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? UTC"), "<date>"),
    # A tiny model's disk need counts its manifest, which records the scratch directory's absolute path.
    (re.compile(r"disk: needs \d+\.\d\d KB"), "disk: needs <n> KB"),
]
# The memory bound counts write threads and staging buffers, whose defaults follow the core count:
# the documented figures are those of hosts with at most 4 cores (CI, the development machine).
_MEMORY_LINE = re.compile(r"^memory bound: .*$", re.M)


def normalise(text: str) -> str:
    for pattern, replacement in _NORMALISE:
        text = pattern.sub(replacement, text)
    if (os.cpu_count() or 1) > 4:
        text = _MEMORY_LINE.sub("memory bound: <depends on the core count>", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


@dataclass
class Command:
    line: int  # 1-based line of the `$ ` in the markdown file
    text: str  # the shell command, without `$ `
    expected: list[str]  # expected output lines
    expected_span: tuple[int, int]  # [start, stop) of those lines in the file (0-based line indices)


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]  # content, the fence's indentation removed
    first: int  # 0-based index of the first content line in the file
    indent: str
    not_run: str | None = None
    commands: list[Command] = field(default_factory=list)


def parse_blocks(path: str, text: str) -> list[Block]:
    """Every fenced code block of a markdown file (indented ones, inside list items, too)."""
    blocks = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            j += 1
        body = [ln[len(indent) :] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1 : j]]
        block = Block(path, i + 1, lang, body, i + 1, indent)
        if body and (found := NOT_RUN.match(body[0])):
            block.not_run = found.group("reason")
        if lang == "console" and block.not_run is None:
            block.commands = _parse_console(block)
        blocks.append(block)
        i = j + 1
    return blocks


def _parse_console(block: Block) -> list[Command]:
    commands: list[Command] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if lines[i].strip():
                raise ValueError(f"{block.path}:{block.first + i + 1}: output before any `$ ` command")
            i += 1
            continue
        start = i
        text = [lines[i][2:]]
        heredoc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", text[0])
        while text[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i])
        if heredoc:
            while i + 1 < len(lines):
                i += 1
                text.append(lines[i])
                if lines[i] == heredoc.group(2):
                    break
        i += 1
        out_start = i
        while i < len(lines) and not lines[i].startswith("$ "):
            i += 1
        commands.append(
            Command(
                line=block.first + start + 1,
                text="\n".join(text),
                expected=lines[out_start:i],
                expected_span=(block.first + out_start, block.first + i),
            )
        )
    return commands


def first_commands(readme: Block) -> list[str]:
    """README.md's first commands: the first ```bash block, one command per non-comment line."""
    return [ln for ln in readme.lines if ln.strip() and not ln.lstrip().startswith("#")]


def without_installs(command: str) -> str:
    """`pip install A && pip install B && X && Y` -> `X && Y` (the test runs in an installed environment)."""
    steps = [s.strip() for s in command.split("&&")]
    return " && ".join(s for s in steps if not s.startswith("pip install"))


def matches(expected: list[str], actual: str) -> bool:
    want = normalise("\n".join(expected))
    got = normalise(actual)
    parts = [r"(?:.*\n)*?" if ln == "..." else re.escape(ln) + r"\n" for ln in want.split("\n")]
    return re.fullmatch("".join(parts), got + "\n" if got else "") is not None or want == got


def allowed_to_fail(command: Command, following: Command | None) -> bool:
    return any(ln.startswith(("error:", "Error:")) for ln in command.expected) or (
        following is not None and following.text.strip() == "echo $?"
    )


class Sandbox:
    """A scratch directory like a checkout's root, in which the documented commands run."""

    def __init__(self, root: Path, example_cache: ExampleCache | None = None) -> None:
        self.root = root
        for name in ("configs", "convert_checkpoint.py"):
            (root / name).symlink_to(ROOT / name)
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(root / ".hf-home"),
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
            "COLUMNS": "100",
        }
        for name in ("MOE_CONVERT_PROFILE", "HF_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT"):
            self.env.pop(name, None)
        self.rc = 0
        self.example_cache = example_cache

    def run(self, command: str) -> tuple[int, str]:
        if self.example_cache is not None and (cached := self.example_cache.run(self, command)) is not None:
            self.rc, out = cached
            return cached[0], out
        # `(exit N)` first, so that `echo $?` sees the previous command's status.
        proc = subprocess.run(
            ["bash", "-c", f"(exit {self.rc})\n{command}"],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        self.rc = proc.returncode
        out = proc.stdout.decode("utf-8", "replace")
        # The scratch directory's path is the one thing the docs cannot know: they say $PWD.
        for root in {str(self.root.resolve()), str(self.root)}:
            out = out.replace(root, "$PWD")
        return proc.returncode, out


class ExampleCache:
    """`moe-convert example DIR [--family F] [--fused_experts]` run once per option set, then copied.

    The example is seeded, so every run writes the same bytes; copying a real run's output saves the
    3-4 s of building it again for every file that starts from one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, ...], tuple[Path, str, str]] = {}

    def run(self, sandbox: Sandbox, command: str) -> tuple[int, str] | None:
        if not command.startswith("moe-convert example ") or any(c in command for c in "|&;<>$`#'\"\n"):
            return None
        words = shlex.split(command)
        if words[:2] != ["moe-convert", "example"] or len(words) < 3 or words[2].startswith("-"):
            return None
        target, options = words[2], tuple(sorted(words[3:]))
        if not set(options) <= {"--family", "mixtral", "qwen2_moe", "qwen3_moe", "--fused_experts"}:
            return None
        if (sandbox.root / target).exists():
            return None
        if options not in self.built:
            work = Path(tempfile.mkdtemp(dir=self.root))
            proc = subprocess.run(
                ["moe-convert", "example", "ex", *words[3:]],
                cwd=work,
                env=sandbox.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            if proc.returncode != 0:
                return None
            self.built[options] = (work / "ex", proc.stdout.decode(), "ex")
        tree, out, name = self.built[options]
        shutil.copytree(tree, sandbox.root / target)
        return 0, out.replace(f" to {name}\n", f" to {target}\n")


@dataclass
class Mismatch:
    command: Command
    rc: int
    actual: str
    why: str

    def report(self, path: str) -> str:
        want = "\n".join(self.command.expected)
        return (
            f"{path}:{self.command.line}: $ {self.command.text}\n  {self.why}\n"
            f"--- documented\n{want}\n--- actual (exit {self.rc})\n{self.actual}"
        )


@dataclass
class FileRun:
    mismatches: list[Mismatch] = field(default_factory=list)
    ran: int = 0
    skipped: list[str] = field(default_factory=list)  # commands that need a tool this machine lacks


# Tools the examples use beyond the POSIX shell and coreutils; a command needing a missing one is skipped.
OPTIONAL_TOOLS = ("jq",)


def run_file(
    path: str,
    workdir: Path,
    example_cache: ExampleCache | None = None,
    pycon_outputs: list[tuple[Block, list[str]]] | None = None,
) -> FileRun:
    """Run every runnable block of one markdown file in order.

    With `pycon_outputs`, what each pycon block printed is recorded (for --update).
    """
    text = (ROOT / path).read_text()
    blocks = parse_blocks(path, text)
    sandbox = Sandbox(workdir, example_cache)
    result = FileRun()
    mismatches = result.mismatches
    missing = [t for t in OPTIONAL_TOOLS if shutil.which(t, path=sandbox.env["PATH"]) is None]
    if path == "README.md":
        first = next(b for b in blocks if b.lang == "bash")
        command = without_installs(first_commands(first)[0])
        rc, out = sandbox.run(command)
        result.ran += 1
        if rc != 0:
            fake = Command(first.first, command, [], (0, 0))
            mismatches.append(Mismatch(fake, rc, out, "README.md's first command failed"))
    for block in blocks:
        if block.not_run is not None:
            continue
        if block.lang == "pycon":
            result.ran += 1
            failures, got = _run_pycon(block, sandbox)
            if pycon_outputs is not None and got:
                pycon_outputs.append((block, _pycon_with_outputs(block, got)))
                continue
            if failures:
                fake = Command(block.line, "(pycon block)", [], (0, 0))
                mismatches.append(Mismatch(fake, 1, failures, "doctest failed"))
            continue
        for k, command in enumerate(block.commands):
            following = block.commands[k + 1] if k + 1 < len(block.commands) else None
            if any(re.search(rf"(^|[|;&(]\s*){tool}\b", command.text) for tool in missing):
                result.skipped.append(f"{path}:{command.line}")
                continue
            rc, out = sandbox.run(command.text)
            result.ran += 1
            if not matches(command.expected, out):
                mismatches.append(Mismatch(command, rc, out, "the output differs"))
            elif rc != 0 and not allowed_to_fail(command, following):
                mismatches.append(Mismatch(command, rc, out, f"exit {rc} (an error: line or `echo $?` says so)"))
    return result


class _NormalisingChecker(doctest.OutputChecker):
    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(normalise(want) + "\n", normalise(got) + "\n", optionflags)


class _RecordingChecker(_NormalisingChecker):
    def __init__(self) -> None:
        self.got: list[str] = []

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        self.got.append(got)
        return super().check_output(want, got, optionflags)


def _doctest(source: str, name: str) -> tuple[str, list[str]]:
    """Run a pycon block here: (the failure report, empty if none; what each example printed)."""
    checker = _RecordingChecker()
    test = doctest.DocTestParser().get_doctest(source, {}, name, name, 0)
    runner = doctest.DocTestRunner(checker=checker, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    runner.run(test, out=out.append, clear_globs=True)
    return "".join(out), checker.got


def _run_pycon(block: Block, sandbox: Sandbox) -> tuple[str, list[str]]:
    """Run a pycon block in a fresh interpreter in the scratch directory, as a reader would."""
    proc = subprocess.run(
        [sys.executable, __file__, "--doctest", f"{block.path}:{block.line}"],
        input="\n".join(block.lines) + "\n",
        cwd=sandbox.root,
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        return f"the doctest runner failed (exit {proc.returncode}):\n{proc.stderr}", []
    result = json.loads(proc.stdout)
    return result["report"], result["got"]


def _pycon_with_outputs(block: Block, got: list[str]) -> list[str]:
    """The block's lines with every example's expected output replaced by what it printed."""
    examples = doctest.DocTestParser().get_examples("\n".join(block.lines) + "\n")
    lines: list[str] = []
    for example, printed in zip(examples, got, strict=True):
        n_source = example.source.count("\n")
        lines += block.lines[example.lineno : example.lineno + n_source]
        lines += printed.rstrip("\n").split("\n") if printed.strip() else []
    return lines


def unmarked_blocks(path: str) -> Iterator[Block]:
    """Command blocks that are neither run nor marked `# not run by the doc tests: REASON`."""
    blocks = parse_blocks(path, (ROOT / path).read_text())
    readme_first = next((b for b in blocks if b.lang == "bash"), None) if path == "README.md" else None
    for block in blocks:
        if block.lang in SHELL_LANGS and block.not_run is None and block is not readme_first:
            yield block


def update(path: str, workdir: Path, example_cache: ExampleCache | None = None) -> int:
    """Rewrite the expected outputs of `path` that no longer match with real ones; how many changed."""
    pycon_outputs: list[tuple[Block, list[str]]] = []
    mismatches = run_file(path, workdir, example_cache, pycon_outputs).mismatches
    lines = (ROOT / path).read_text().split("\n")
    edits: list[tuple[int, int, list[str]]] = []
    for block, new_lines in pycon_outputs:
        if new_lines != block.lines:
            edits.append((block.first, block.first + len(block.lines), [block.indent + ln for ln in new_lines]))
    for mismatch in mismatches:
        start, stop = mismatch.command.expected_span
        if start == stop == 0 or mismatch.why != "the output differs":
            print(mismatch.report(path), file=sys.stderr)
            continue
        indent = parse_indent(lines, mismatch.command.line - 1)
        new = mismatch.actual.rstrip("\n").split("\n") if mismatch.actual.strip() else []
        old = mismatch.command.expected
        if "..." in old:
            head = old.index("...")
            tail = len(old) - 1 - max(i for i, ln in enumerate(old) if ln == "...")
            if head + tail < len(new):
                new = new[:head] + ["..."] + (new[len(new) - tail :] if tail else [])
        blank_tail = len(old) - len(_rstrip_blank(old))
        edits.append((start, stop, [indent + ln for ln in new] + [""] * blank_tail))
    for start, stop, new in sorted(edits, key=lambda e: -e[0]):
        lines[start:stop] = new
    (ROOT / path).write_text("\n".join(lines))
    return len(edits)


def _rstrip_blank(lines: list[str]) -> list[str]:
    out = list(lines)
    while out and not out[-1].strip():
        out.pop()
    return out


def parse_indent(lines: list[str], index: int) -> str:
    return lines[index][: len(lines[index]) - len(lines[index].lstrip())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", default=DOC_FILES)
    parser.add_argument("--update", action="store_true", help="rewrite outputs that differ with real ones")
    parser.add_argument("--doctest", metavar="NAME", help=argparse.SUPPRESS)  # a pycon block on stdin
    args = parser.parse_args()
    if args.doctest:
        report, got = _doctest(sys.stdin.read(), args.doctest)
        print(json.dumps({"report": report, "got": got}))
        return
    failed = 0
    with tempfile.TemporaryDirectory(prefix="moe-convert-examples-") as cache_dir:
        cache = ExampleCache(Path(cache_dir))
        for path in args.files:
            failed += _main_file(path, cache, args.update)
    sys.exit(1 if failed else 0)


def _main_file(path: str, cache: ExampleCache, rewrite: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="moe-convert-docs-") as tmp:
        if rewrite:
            print(f"{path}: {update(path, Path(tmp), cache)} outputs rewritten")
            return 0
        run = run_file(path, Path(tmp), cache)
        for mismatch in run.mismatches:
            print(mismatch.report(path) + "\n")
        skipped = f", {len(run.skipped)} skipped (no {' or '.join(OPTIONAL_TOOLS)})" if run.skipped else ""
        print(f"{path}: {run.ran} commands, {len(run.mismatches)} mismatches{skipped}")
        return len(run.mismatches)


if __name__ == "__main__":
    main()
