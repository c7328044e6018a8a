"""What every benchmark script shares: device synchronisation, timing, results with provenance, docs tables.

Provenance: ``write_result`` stores with each results JSON the commit, the exact command and the sha256 of every
source file that determines its numbers (the project modules the run imported, plus a checkpoint's files where one
is used); ``staleness`` compares them with today's files (``tests/test_results_fresh.py``,
``benchmarks/regenerate.py``). Tables between ``<!-- marker:begin/end -->`` comments are generated from the JSON
and name the commit and command (``measured_at``).

The scripts run as ``python benchmarks/<name>.py``, so this file is imported as a sibling module.
"""

import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_clock = time.perf_counter
STARTED = time.monotonic()  # about when the benchmark process started (scripts import this module first)
STARTED_WALL = time.time()


def use_cpu_time() -> None:
    """Time with this process's CPU time instead of wall time from now on (CPU only, one thread).

    On a machine shared with other jobs, wall time counts the time the thread waits for a core, which varies from
    run to run by several times; the CPU time the work itself takes does not.
    """
    global _clock
    _clock = time.process_time


def now() -> float:
    """Seconds on the benchmark's clock (wall time, or CPU time after ``use_cpu_time()``)."""
    return _clock()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> list[float]:
    """Seconds (``now()``) of ``repeats`` calls of ``function``, each between two device synchronisations."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = now()
        function()
        synchronize(device)
        times.append(now() - start)
    return times


def write_readme_section(marker: str, lines: list[str]) -> None:
    """Replace the text between ``<!-- {marker}:begin -->`` and ``<!-- {marker}:end -->`` with ``lines``.

    The markers are looked for in README.md, docs/*.md and benchmarks/NOTES.md (a generated table lives on the page
    that shows it); exactly one file must hold them.
    """
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    page, _ = section_text(marker)
    head, rest = page.read_text().split(begin)
    _, tail = rest.split(end)
    page.write_text(head + begin + "\n" + "\n".join(lines).rstrip() + "\n" + end + tail)


# ---- provenance: which code a results file describes -----------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "results"
HISTORY = RESULTS / "history"  # dated measurements of earlier code (before/after pairs in NOTES.md): never checked
CODE_FOLDERS = (ROOT / "llava_rc", ROOT / "benchmarks", ROOT / "tests")  # tests/: tiny models some benchmarks build
# Files of a checkpoint folder that do not change what a model computes.
CHECKPOINT_NON_SOURCES = {"README.md", "training_report.json"}
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix()


def loaded_sources() -> list[Path]:
    """The project's Python files this process has imported: the benchmark script, ``bench_common``, the other
    benchmark modules it uses and every ``llava_rc`` module the run exercised."""
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path is None:
            continue
        path = Path(path).resolve()
        if path.suffix == ".py" and any(path.is_relative_to(folder) for folder in CODE_FOLDERS):
            files.add(path)
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) and Path(main.__file__).resolve().is_relative_to(ROOT):
        files.add(Path(main.__file__).resolve())
    return sorted(files)


def checkpoint_sources(checkpoint: Path) -> list[Path]:
    """A checkpoint folder's files that determine what it computes: weights, configs, tokenizers, its code copy."""
    return sorted(
        path for path in Path(checkpoint).rglob("*")
        if path.is_file() and path.name not in CHECKPOINT_NON_SOURCES and not path.name.startswith("LICENSE")
    )


def combined_fingerprint(hashes: dict[str, str]) -> str:
    """One sha256 over the sorted (path, sha256) pairs."""
    return hashlib.sha256("".join(f"{path}\0{digest}\n" for path, digest in sorted(hashes.items())).encode()).hexdigest()


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def command_line() -> str:
    """The command this process was started with, as run from the repository root (OMP_NUM_THREADS kept)."""
    script = Path(sys.argv[0]).resolve()
    words = ["python", relative(script) if script.is_relative_to(ROOT) else str(script), *sys.argv[1:]]
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + shlex.join(words)


def provenance(extra_sources: list[Path] = (), command: str | None = None) -> dict:
    """Where a result comes from: the commit, the exact command, and the sha256 of every source file that determines
    its numbers (the loaded project modules plus ``extra_sources``, e.g. a checkpoint's files)."""
    sources = sorted({*loaded_sources(), *(Path(path).resolve() for path in extra_sources)})
    edited = [relative(path) for path in sources if path.stat().st_mtime > STARTED_WALL]
    if edited:  # the hashes would describe code other than the code that ran
        raise RuntimeError(f"source files changed while the benchmark ran: {edited}; run it again")
    hashes = {relative(path): sha256_of(path) for path in sources}
    changed = git("status", "--porcelain", "--", *hashes) if hashes else ""
    return {
        "commit": git("rev-parse", "HEAD"),
        "sources_committed": not changed,  # False: the sources differed from the commit (uncommitted changes)
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or command_line(),
        # How long the command ran (imports included) and how busy the machine was: what a rerun costs.
        "wall_seconds": round(time.monotonic() - STARTED, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "fingerprint": combined_fingerprint(hashes),
        "sources": hashes,
    }


def write_result(path: Path, result: dict, extra_sources: list[Path] = (), command: str | None = None) -> dict:
    """Write ``result`` as JSON with its ``provenance``; returns the result as written."""
    result = {**result, "provenance": provenance(extra_sources, command)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def staleness(path: Path, legacy_commands: dict[str, str] | None = None) -> dict | None:
    """None when the results file describes today's sources; else why not (``reason``), the ``changed`` and
    ``missing`` source files and the ``command`` that regenerates it (for a file without provenance: its entry in
    ``legacy_commands``, by file name; None when unknown)."""
    result = json.loads(Path(path).read_text())
    record = result.get("provenance")
    if record is None:
        return {"reason": "no provenance (measured before the commit and sources were recorded)",
                "changed": [], "missing": [], "command": (legacy_commands or {}).get(Path(path).name)}
    changed, missing = [], []
    for name, digest in record["sources"].items():
        source = ROOT / name
        if not source.exists():
            missing.append(name)
        elif sha256_of(source) != digest:
            changed.append(name)
    if not changed and not missing:
        return None
    return {"reason": "its sources changed since it was measured", "changed": changed, "missing": missing,
            "command": record["command"]}


def current_results() -> list[Path]:
    """Every results file the freshness rule covers (history/ excluded)."""
    return sorted(RESULTS.glob("*.json"))


def measured_at(result: dict) -> str:
    """The sentence a generated table ends with: the commit, date and command its numbers come from."""
    record = result.get("provenance")
    if record is None:
        return "Measured before commits were recorded (stale: `python benchmarks/regenerate.py`)."
    dirty = "" if record["sources_committed"] else " plus uncommitted changes"
    return f"Measured at commit {record['commit'][:10]}{dirty} on {record['measured']}: `{record['command']}`."


def minutes_table(legacy_commands: dict[str, str] | None = None) -> list[str]:
    """How long each current result's command took, from the results' provenance (NOTES.md)."""
    lines = [
        "How long each benchmark took when its current result was written (wall time of the whole command on the "
        "shared 2-core machine, with the load average beside it; generated from the results' provenance by "
        "`python benchmarks/regenerate.py --minutes`):",
        "",
        "| results file | command | minutes | load average (1, 5, 15 min) | measured |",
        "|---|---|---|---|---|",
    ]
    for path in current_results():
        record = json.loads(path.read_text()).get("provenance")
        if record is None or "wall_seconds" not in record:
            command = (legacy_commands or {}).get(path.name)
            lines.append(f"| `{path.name}` | {f'`{command}`' if command else '?'} | not recorded | | |")
            continue
        load = ", ".join(f"{value:.1f}" for value in record["load_average"])
        lines.append(
            f"| `{path.name}` | `{record['command']}` | {record['wall_seconds'] / 60:.1f} | {load} | "
            f"{record['measured']} |"
        )
    return lines


def section_text(marker: str) -> tuple[Path, str]:
    """The page holding ``<!-- marker:begin/end -->`` and the text between the markers (without the newlines
    next to them)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    holders = [page for page in generated_pages() if page.exists() and begin in page.read_text()]
    if len(holders) != 1:
        raise ValueError(f"expected the marker {begin!r} in exactly one page, found {[str(p) for p in holders]}")
    text = holders[0].read_text()
    return holders[0], text.split(begin + "\n")[1].split("\n" + end)[0]


def generated_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "NOTES.md"]
