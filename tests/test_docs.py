"""The commands and outputs in README.md and docs/*.md are run and compared (tests/docs_examples.py)."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from docs_examples import (
    DOC_FILES,
    OPTIONAL_TOOLS,
    ROOT,
    ExampleCache,
    FileRun,
    first_commands,
    matches,
    normalise,
    parse_blocks,
    run_file,
    unmarked_blocks,
)


@pytest.fixture(scope="session")
def doc_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FileRun]:
    """Every documented file's examples, run once per session, two files at a time (most of a command's
    time is one interpreter's start-up, so two cores run two files at once)."""
    cache = ExampleCache(tmp_path_factory.mktemp("examples"))
    lock = threading.Lock()

    def run(path: str) -> FileRun:
        with lock:
            workdir = tmp_path_factory.mktemp("docs")
        return run_file(path, workdir, cache)

    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        return dict(zip(DOC_FILES, pool.map(run, DOC_FILES), strict=True))


@pytest.mark.parametrize("path", DOC_FILES)
def test_documented_examples_print_what_the_docs_say(path: str, doc_results: dict[str, FileRun]) -> None:
    run = doc_results[path]
    assert not run.mismatches, "\n\n".join(m.report(path) for m in run.mismatches)
    if run.skipped:
        pytest.skip(f"all ran but {len(run.skipped)} commands that need {', '.join(OPTIONAL_TOOLS)}: {run.skipped}")


@pytest.mark.parametrize("path", DOC_FILES)
def test_every_command_block_runs_or_says_why_not(path: str) -> None:
    unmarked = [f"{b.path}:{b.line} ({b.lang})" for b in unmarked_blocks(path)]
    assert not unmarked, "mark them `# not run by the doc tests: REASON` or make them ```console: " + ", ".join(
        unmarked
    )


def test_readme_starts_with_the_two_first_commands() -> None:
    """The founders' brief: one command installs and converts the example, one installs and runs the tests,
    and .ci/run runs that test command (the examples test runs the first one without its installs)."""
    blocks = parse_blocks("README.md", (ROOT / "README.md").read_text())
    first = next(b for b in blocks if b.lang == "bash")
    install_and_convert, install_and_test = first_commands(first)
    assert install_and_convert.startswith("pip install torch==2.13.0 && pip install -e . && moe-convert example ")
    assert install_and_test == "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and "pip install -q -e '.[test]'" in ci
    assert "\npython -m pytest\n" in ci


def test_design_doc_names_every_module() -> None:
    """docs/design.md's module table cannot silently miss a module that was added."""
    table = (ROOT / "docs" / "design.md").read_text()
    modules = sorted(p.name for p in (ROOT / "moe_convert").glob("*.py"))
    missing = [m for m in modules if f"`{m}`" not in table]
    assert not missing, f"docs/design.md does not name {missing}"


def test_readme_links_every_doc() -> None:
    readme = (ROOT / "README.md").read_text()
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    missing = [d for d in docs if f"]({d})" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_families_doc_counts_the_rules_files_lines() -> None:
    text = (ROOT / "docs" / "families.md").read_text()
    pattern = r"Lines per family: Mixtral (\d+) lines of rules .*?, Qwen2-MoE (\d+), Qwen3-MoE (\d+);"
    stated = re.search(pattern, text, re.S)
    assert stated, "docs/families.md no longer says how many lines each family's rules take"
    actual = [
        len((ROOT / "moe_convert" / "architectures" / f"{name}.json").read_text().splitlines())
        for name in ("mixtral", "qwen2_moe", "qwen3_moe")
    ]
    assert [int(n) for n in stated.groups()] == actual


# The convention itself.

SAMPLE = """Text.

```console
$ printf 'a\\nb\\n' && \\
    printf 'c\\n'
a
...
c
$ cat > f.txt <<'END'
$ not a command: inside the here-document
END
$ wc -l < f.txt
1
```

  ```console
  # not run by the doc tests: needs a GPU
  $ nvidia-smi
  ```

```bash
echo unmarked
```
"""


def test_console_blocks_parse_into_commands_and_outputs() -> None:
    console, skipped, bash = parse_blocks("sample.md", SAMPLE)
    assert [c.text for c in console.commands] == [
        "printf 'a\\nb\\n' && \\\n    printf 'c\\n'",
        "cat > f.txt <<'END'\n$ not a command: inside the here-document\nEND",
        "wc -l < f.txt",
    ]
    assert [c.expected for c in console.commands] == [
        ["a", "...", "c"],
        [],
        ["1"],
    ]
    assert console.commands[0].line == 4
    assert skipped.not_run == "needs a GPU" and not skipped.commands
    assert bash.lang == "bash" and bash.not_run is None


def test_outputs_match_up_to_what_varies_between_runs() -> None:
    assert matches(["a", "...", "c"], "a\nb\nb2\nc\n")
    assert matches(["a", "...", "c"], "a\nc\n")
    assert not matches(["a", "...", "c"], "a\nb\n")
    assert not matches(["a"], "a\nb\n")
    assert matches(
        ["done (1.4 s), 12.00 MB/s, sha256 0123456789abcdef..."],
        "done (0.2 s), 3.10 KB/s, sha256 fedcba9876543210...",
    )
    assert not matches(["4 rank files, 301.63 KB"], "4 rank files, 301.64 KB")
    assert normalise('{"seconds": 1.25, "pid 42"}\n\n') == '{"seconds": <sec>, "pid <n>"}'


def test_a_documented_output_that_is_wrong_fails(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```console\n$ echo hello\nhello\n$ echo world\nhello\n$ false\n$ ls nothing-here\n...\n"
        "$ echo $?\n2\n```\n\n```pycon\n>>> 1 + 1\n3\n```\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    run = run_file(str(doc), work)
    assert run.ran == 6 and not run.skipped
    assert [(m.command.text, m.why) for m in run.mismatches] == [
        ("echo world", "the output differs"),
        ("false", "exit 1 (an error: line or `echo $?` says so)"),
        ("(pycon block)", "doctest failed"),
    ]
