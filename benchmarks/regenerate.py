"""List the stale results files under benchmarks/results/ and rerun exactly those, each with its recorded command.

A results file is stale when a source file that determines its numbers (recorded with the file: the benchmark
script, the ``llava_rc`` modules it ran, a checkpoint's files) differs from today's, or when it was written before
sources were recorded (then ``LEGACY_COMMANDS`` below names its command). Each stale file's command runs once
(files written by one command share it), from the repository root, at low priority; commands that regenerate docs
tables (``--update-readme``) do so. Afterwards every file is checked again.

    python benchmarks/regenerate.py --list        # what is stale, why, and the command for each
    python benchmarks/regenerate.py               # rerun the stale ones
    python benchmarks/regenerate.py --only latency_cpu.json rc_step_cpu.json

Each result records how long its command ran; ``--minutes`` writes them as a table into ``benchmarks/NOTES.md``.
"""

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_common import (  # benchmarks/bench_common.py
    ROOT, current_results, minutes_table, staleness, write_readme_section
)


# Results written before provenance was recorded, with the command that measured them (NOTES.md, docs): they are
# stale by definition; this script reruns them. Remove an entry once its file carries provenance. (Kept here, not in
# bench_common.py, whose hash is part of every result's sources.)
LEGACY_COMMANDS = {
    "accuracy.json": "OMP_NUM_THREADS=1 python benchmarks/accuracy.py --update-readme",
    "latency_cpu.json": "OMP_NUM_THREADS=1 python benchmarks/latency.py --geometry cpu-small --repeats 3 "
    "--verify-largest-batch --update-readme",
    "latency_next_cpu.json": "OMP_NUM_THREADS=1 python benchmarks/latency.py --geometry cpu-next-small --repeats 3 "
    "--update-readme",
    "rc_step_cpu.json": "OMP_NUM_THREADS=1 python benchmarks/rc_step.py --batch-sizes 1 4 --repeats 3 --update-readme",
    "gprune_scaling_cpu.json": "OMP_NUM_THREADS=1 python benchmarks/gprune_scaling.py --with-previous --sizes 576 1152 "
    "2880 5760 --batch-sizes 1 --repeats 3",
    # runs in the vLLM virtual environment (see the vLLM plugin's docs), not the project's
    "vllm_serving_cpu.json": "python benchmarks/vllm_serving.py --output benchmarks/results/vllm_serving_cpu.json "
    "--update-readme",
}


def stale_files(only: list[str] | None = None) -> dict[Path, dict]:
    """{results file: staleness record} for every stale file (of ``only``, when given)."""
    paths = current_results()
    if only:
        unknown = sorted(set(only) - {path.name for path in paths})
        if unknown:
            raise SystemExit(f"--only: no such results files {unknown}; expected names from {[p.name for p in paths]}")
        paths = [path for path in paths if path.name in only]
    return {path: record for path in paths if (record := staleness(path, LEGACY_COMMANDS)) is not None}


def describe(path: Path, record: dict) -> str:
    lines = [f"{path.relative_to(ROOT)}: {record['reason']}"]
    if record["changed"]:
        lines.append(f"  changed sources: {', '.join(record['changed'])}")
    if record["missing"]:
        lines.append(f"  missing sources: {', '.join(record['missing'])}")
    lines.append(f"  regenerate with: {record['command'] or '(unknown: see benchmarks/NOTES.md)'}")
    return "\n".join(lines)


def runnable(command: str, priority: int) -> list[str]:
    """The recorded command as an argument list: environment assignments kept, ``python`` this interpreter."""
    words = shlex.split(command)
    leading = 0
    while leading < len(words) and re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[leading]):  # VAR=value prefixes
        leading += 1
    environment, rest = words[:leading], words[leading:]
    if rest and rest[0] == "python":
        rest[0] = sys.executable
    return ["env", *environment, "nice", "-n", str(priority), *rest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="only list the stale files and their commands")
    parser.add_argument("--only", nargs="+", default=None, help="results file names to consider (default: all)")
    parser.add_argument("--nice", type=int, default=10, help="priority of the reruns (default: %(default)s)")
    parser.add_argument(
        "--minutes", action="store_true", help="only regenerate NOTES.md's table of how long each benchmark took"
    )
    args = parser.parse_args(argv)
    if args.minutes:
        write_readme_section("benchmark-minutes", minutes_table(LEGACY_COMMANDS))
        return 0
    stale = stale_files(args.only)
    if not stale:
        print("every results file matches today's sources")
        return 0
    for path, record in stale.items():
        print(describe(path, record))
    if args.list:
        return 1
    unknown = [path.name for path, record in stale.items() if record["command"] is None]
    if unknown:
        raise SystemExit(f"no recorded command for {unknown}: regenerate them by hand (benchmarks/NOTES.md)")
    commands = list(dict.fromkeys(record["command"] for record in stale.values()))
    for command in commands:
        print(f"\n$ {command}", flush=True)
        start = time.monotonic()
        subprocess.run(runnable(command, args.nice), cwd=ROOT, check=True)
        print(f"took {(time.monotonic() - start) / 60:.1f} min", flush=True)
    write_readme_section("benchmark-minutes", minutes_table(LEGACY_COMMANDS))
    still = stale_files(args.only)
    for path, record in still.items():
        print("still stale: " + describe(path, record))
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
