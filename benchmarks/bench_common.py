"""What every benchmark script shares: device synchronisation, timing, and writing a docs table from results.

The scripts run as ``python benchmarks/<name>.py``, so this file is imported as a sibling module.
"""

import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``function``, each between two device synchronisations."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
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
