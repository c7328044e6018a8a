"""What every benchmark script shares: device synchronisation, timing, and writing a docs table from results.

The scripts run as ``python benchmarks/<name>.py``, so this file is imported as a sibling module.
"""

import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_clock = time.perf_counter


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
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "NOTES.md"]
    holders = [page for page in pages if page.exists() and begin in page.read_text()]
    if len(holders) != 1:
        raise ValueError(f"expected the marker {begin!r} in exactly one of {[str(p) for p in pages]}, found {holders}")
    page = holders[0]
    head, rest = page.read_text().split(begin)
    _, tail = rest.split(end)
    page.write_text(head + begin + "\n" + "\n".join(lines).rstrip() + "\n" + end + tail)
