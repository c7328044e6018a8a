"""The documentation is tested: every Python block of README.md and docs/*.md runs, every method setting is
documented with its true default, the generated tables match the committed results, and relative links resolve.

How a block runs: on its own (each block is self-contained, as a reader copies it), with the repository root as
the working directory (so ``llava_rc/samples/...`` resolves), and with a line ``REPO = "<anything>"`` replaced by
the shipped checkpoint ``llava_rc/checkpoints/llava-rc-easyvqa``, which stands in for a Hub repo id. An HTML comment
on the line right above a block changes that:

- ``<!-- not-run: REASON -->``: the block is not run (it needs downloads); the reason is required.
- ``<!-- requires: pkg, pkg -->``: the block runs only where those packages are importable (optional extras such as
  peft and trl, which the package does not install); elsewhere it is skipped.
- ``<!-- repo: NAME -->``: ``REPO`` is replaced by the tiny random repo ``NAME`` of ``TINY_REPOS`` instead (a model
  family the shipped checkpoint does not cover), saved with its processor and remote code like a converted repo,
  and the block runs as a Hub user runs it: in a fresh process where ``llava_rc`` cannot be imported, offline, with
  no terminal to answer transformers' remote-code prompt.
"""

import ast
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava_rc import METHODS
from llava_rc.hub_upload import BLOCK_LLAVA_RC

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPO_LINE = re.compile(r'^REPO = ".*"', re.MULTILINE)
DIRECTIVE = re.compile(r"^<!-- (not-run|requires|repo): *(.*?) *-->$")
# Pages linked from the docs that another change adds; a missing one is reported as a skip, not a failure.
WRITTEN_ELSEWHERE: dict = {}  # pages another change writes, linked before they exist (none now)


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    source: str
    directive: str | None  # "not-run", "requires", "repo" or None
    argument: str  # the reason, the required packages, or the tiny repo's name

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with the directive comment on the line above each."""
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python":
            end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
            above = DIRECTIVE.match(lines[index - 1].strip()) if index else None
            blocks.append(
                Block(
                    page=page,
                    line=index + 2,
                    source="\n".join(lines[index + 1 : end]) + "\n",
                    directive=above.group(1) if above else None,
                    argument=above.group(2) if above else "",
                )
            )
            index = end
        index += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def save_tiny_llava_next(directory: Path) -> None:
    from tiny_next import tiny_next_model, tiny_next_processor

    tiny_next_model({"method": "rc"}).save_pretrained(directory)
    tiny_next_processor().save_pretrained(directory)


TINY_REPOS = {"tiny-llava-next": save_tiny_llava_next}


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    """Each tiny repo a block names, saved on first use."""
    saved = {}

    def repo(name: str) -> Path:
        if name not in TINY_REPOS:
            raise KeyError(f"<!-- repo: {name} -->: no such tiny repo; expected one of {sorted(TINY_REPOS)}")
        if name not in saved:
            saved[name] = tmp_path_factory.mktemp(name)
            TINY_REPOS[name](saved[name])
        return saved[name]

    return repo


def test_blocks_are_found():
    """The extraction itself: blocks on every reference page, and few that do not run."""
    pages_with_blocks = {block.page.name for block in ALL_BLOCKS}
    assert {"README.md", "methods.md", "rc.md", "hub.md", "fine-tuning.md", "llava-next.md"} <= pages_with_blocks
    not_run = [block for block in ALL_BLOCKS if block.directive == "not-run"]
    assert len(not_run) <= 3, [block.name for block in not_run]
    for block in not_run:
        assert block.argument, f"{block.name}: a not-run block must say why"


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[block.name for block in ALL_BLOCKS])
def test_python_block_runs(block: Block, monkeypatch, tiny_repos):
    if block.directive == "not-run":
        pytest.skip(f"not run: {block.argument}")
    if block.directive == "requires":
        missing = [name for name in re.split(r"[,\s]+", block.argument) if name and not importlib.util.find_spec(name)]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (not installed)")
    repo = tiny_repos(block.argument) if block.directive == "repo" else CHECKPOINT
    source = REPO_LINE.sub(f"REPO = {str(repo)!r}", block.source)
    if block.directive == "repo":
        run_as_hub_user(block, source, repo.parent)
        return
    monkeypatch.chdir(ROOT)
    # Pad so that a traceback's line numbers are the page's.
    code = compile("\n" * (block.line - 1) + source, str(block.page), "exec")
    exec(code, {"__name__": "__docs__"})


def run_as_hub_user(block: Block, source: str, scratch: Path) -> None:
    """Run ``source`` in a fresh interpreter from the repository root, without ``llava_rc`` and without stdin."""
    script = scratch / f"block_{block.line}.py"
    script.write_text(BLOCK_LLAVA_RC + "\n" * (block.line - 1 - BLOCK_LLAVA_RC.count("\n")) + source)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(scratch / "hf_modules"))
    result = subprocess.run(
        [sys.executable, "-P", str(script)], cwd=ROOT, env=environment, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{block.name} failed in a fresh process:\n{result.stderr[-4000:]}"
    # Without a terminal transformers' prompt reads an empty answer and loading goes on; a user's terminal waits.
    prompt = "Do you wish to run the custom code?"
    assert prompt not in result.stdout + result.stderr, f"{block.name} stops at transformers' prompt {prompt!r}"


def test_blocks_that_load_a_repo_trust_its_remote_code():
    """A repo converted by llava-rc-upload names remote code in its config: every Auto* class loading it needs
    ``trust_remote_code=True``, or transformers stops at an interactive prompt (or raises without a terminal)."""
    for block in ALL_BLOCKS:
        for call in re.findall(r"Auto\w+\.from_pretrained\(\s*REPO[^)]*\)", block.source):
            assert "trust_remote_code=True" in call, f"{block.name}: {call} lacks trust_remote_code=True"


def method_sections(text: str) -> dict[str, str]:
    """``## `name` `` sections of docs/methods.md by method name."""
    parts = re.split(r"^## `([a-z_]+)`\s*$", text, flags=re.MULTILINE)
    return {parts[index]: parts[index + 1].split("\n## ")[0] for index in range(1, len(parts), 2)}


def test_every_method_setting_is_documented_with_its_default():
    """Each registered method has a section in docs/methods.md whose settings table lists exactly its config
    fields, each with the dataclass's default."""
    sections = method_sections((ROOT / "docs" / "methods.md").read_text())
    assert set(METHODS) <= set(sections), f"methods without a section: {sorted(set(METHODS) - set(sections))}"
    for method, (config_class, _) in METHODS.items():
        rows = {
            match.group(1): [cell.strip() for cell in match.group(2).split("|")]
            for match in re.finditer(r"^\| `(\w+)` \|(.*)\|\s*$", sections[method], flags=re.MULTILINE)
        }
        fields = {field.name: field for field in dataclasses.fields(config_class)}
        missing, stale = sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields))
        assert not missing, f"{method}: settings missing from docs/methods.md: {missing}"
        assert not stale, f"{method}: documented settings that do not exist: {stale}"
        for name, field in fields.items():
            documented = rows[name][1].strip("`")  # cells: type, default, range, what it does
            assert ast.literal_eval(documented) == field.default, (
                f"{method}.{name}: docs/methods.md says default {documented}, the config has {field.default!r}"
            )


def test_generated_accuracy_tables_match_the_committed_results():
    """The README summary, the docs/easyvqa.md table and the NOTES.md goals are what accuracy.py writes from
    benchmarks/results/accuracy.json (regenerate with ``python benchmarks/accuracy.py --readme-only``)."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accuracy
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    texts = {path: path.read_text() for path in [*PAGES, ROOT / "benchmarks" / "NOTES.md"]}
    for marker, lines in accuracy.generated_sections(result).items():
        begin, end = f"<!-- {marker}:begin -->\n", f"\n<!-- {marker}:end -->"
        holders = [text for text in texts.values() if begin in text]
        assert len(holders) == 1, f"marker {marker!r} found {len(holders)} times"
        shown = holders[0].split(begin)[1].split(end)[0]
        assert shown == "\n".join(lines).rstrip(), f"the {marker!r} table is stale: run accuracy.py --readme-only"


def test_readme_test_command_is_what_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && python -m pytest -q' in readme
    assert re.search(r"^python -m pytest -q$", ci, flags=re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_relative_links_resolve():
    pending = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if linked in WRITTEN_ELSEWHERE and not linked.exists():
                pending.append(WRITTEN_ELSEWHERE[linked])
                continue
            assert linked.exists(), f"{page.name}: link to a missing file {target}"
            if anchor:
                assert anchor in anchors(linked), f"{page.name}: link to a missing heading {target}"
    if pending:
        pytest.skip("; ".join(sorted(set(pending))))


def test_docs_stand_alone():
    """The pages cite papers and releases, never notes outside the repository (a ``shared/`` folder beside it)."""
    for page in [*PAGES, ROOT / "benchmarks" / "NOTES.md"]:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            assert "shared/" not in line, f"{page.relative_to(ROOT)}:{number} cites a file outside the repository: {line}"
