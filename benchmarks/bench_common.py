"""What every benchmark script shares: device synchronisation, timing, and writing a README table from results.

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
    """Replace the README text between ``<!-- {marker}:begin -->`` and ``<!-- {marker}:end -->`` with ``lines``."""
    readme = ROOT / "README.md"
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    head, rest = readme.read_text().split(begin)
    _, tail = rest.split(end)
    readme.write_text(head + begin + "\n" + "\n".join(lines).rstrip() + "\n" + end + tail)
