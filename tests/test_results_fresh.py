"""Committed benchmark results describe today's code, and the docs tables show exactly what the results hold.

Every ``benchmarks/results/*.json`` records the sha256 of the source files that determine its numbers (the benchmark
script, the ``llava_rc`` modules it ran, a checkpoint's files); a file whose sources changed since is stale, and the
failure names the file, the changed sources and the command that regenerates it (``python benchmarks/regenerate.py``
reruns every stale one). ``benchmarks/results/history/`` holds dated measurements of earlier code (NOTES.md's
before/after pairs) and is not checked.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_common  # noqa: E402  (benchmarks/bench_common.py)
from regenerate import LEGACY_COMMANDS  # noqa: E402  (benchmarks/regenerate.py)

# The scripts whose results become docs tables (each has ``committed_sections()``: marker -> lines).
TABLE_SCRIPTS = ["accuracy", "accuracy_qwen", "latency", "rc_step", "latency_onevision", "vllm_serving", "step_share"]
RESULTS = bench_common.current_results()


@pytest.mark.parametrize("path", RESULTS, ids=[path.name for path in RESULTS])
def test_results_file_matches_todays_sources(path):
    record = bench_common.staleness(path, LEGACY_COMMANDS)
    if record is None:
        return
    changed = ", ".join(record["changed"] + [f"{name} (missing)" for name in record["missing"]])
    pytest.fail(
        f"benchmarks/results/{path.name} is stale: {record['reason']}"
        + (f"; changed sources: {changed}" if changed else "")
        + f". Regenerate it with `{record['command'] or 'see benchmarks/NOTES.md'}` from the repository root "
        "(or `python benchmarks/regenerate.py`, which reruns every stale file)."
    )


@pytest.mark.parametrize("path", RESULTS, ids=[path.name for path in RESULTS])
def test_recorded_provenance_is_complete(path):
    """A recorded provenance names a commit that exists, the command, and a fingerprint of exactly its sources."""
    record = json.loads(path.read_text()).get("provenance")
    if record is None:
        pytest.skip("no provenance yet (reported by the freshness test)")
    assert set(record) >= {"commit", "sources_committed", "measured", "command", "fingerprint", "sources"}
    assert record["fingerprint"] == bench_common.combined_fingerprint(record["sources"])
    assert any(name.startswith("benchmarks/") for name in record["sources"]), "the benchmark script is a source"
    assert record["command"].split("python ", 1)[-1].startswith("benchmarks/"), record["command"]
    kind = subprocess.run(["git", "cat-file", "-t", record["commit"]], cwd=ROOT, capture_output=True, text=True)
    if kind.returncode != 0 and not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert kind.stdout.strip() == "commit", f"{path.name}: recorded commit {record['commit']} is not in this history"


@pytest.mark.parametrize("script", TABLE_SCRIPTS)
def test_docs_tables_are_generated_from_the_committed_results(script):
    module = importlib.import_module(script)
    for marker, lines in module.committed_sections().items():
        page, shown = bench_common.section_text(marker)
        assert shown == "\n".join(lines).rstrip(), (
            f"{page.relative_to(ROOT)}: the {marker!r} table differs from what benchmarks/{script}.py generates from "
            f"benchmarks/results/: run `python benchmarks/{script}.py --readme-only`"
        )


def test_generated_tables_name_the_measurement():
    """Every generated table says at which commit and how it was measured (or that it predates recorded commits;
    for results of older code the figures are withdrawn)."""
    for script in TABLE_SCRIPTS:
        for marker, lines in importlib.import_module(script).committed_sections().items():
            text = "\n".join(lines)
            named = ("Measured at commit ", "Measured before commits were recorded", "figures are withdrawn")
            assert any(phrase in text for phrase in named), marker


def test_staleness_names_the_changed_sources_and_the_command(tmp_path):
    """The rule itself, on a result written now: fresh as written; a changed source hash or a vanished source makes
    it stale and is named; a file without provenance is stale."""
    result = bench_common.write_result(tmp_path / "probe.json", {"value": 1}, command="python benchmarks/probe.py")
    record = result["provenance"]
    assert "benchmarks/bench_common.py" in record["sources"] and "tests/test_results_fresh.py" in record["sources"]
    assert record["commit"] == bench_common.git("rev-parse", "HEAD")
    assert bench_common.staleness(tmp_path / "probe.json") is None

    record["sources"]["benchmarks/bench_common.py"] = "0" * 64
    record["sources"]["llava_rc/no_such_module.py"] = "0" * 64
    (tmp_path / "probe.json").write_text(json.dumps(result))
    stale = bench_common.staleness(tmp_path / "probe.json")
    assert stale["changed"] == ["benchmarks/bench_common.py"]
    assert stale["missing"] == ["llava_rc/no_such_module.py"]
    assert stale["command"] == "python benchmarks/probe.py"

    (tmp_path / "legacy.json").write_text(json.dumps({"value": 1}))
    assert "no provenance" in bench_common.staleness(tmp_path / "legacy.json")["reason"]


def test_checkpoint_sources_are_the_files_that_change_its_numbers():
    checkpoint = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
    names = {path.relative_to(checkpoint).as_posix() for path in bench_common.checkpoint_sources(checkpoint)}
    assert {"model.safetensors", "config.json", "modeling_llava_rc.py", "processor_config.json"} <= names
    assert "README.md" not in names and "training_report.json" not in names


def test_regenerate_lists_stale_files_with_their_commands(capsys):
    import regenerate  # benchmarks/regenerate.py

    status = regenerate.main(["--list"])
    printed = capsys.readouterr().out
    stale = {
        path.name: record for path in RESULTS if (record := bench_common.staleness(path, LEGACY_COMMANDS)) is not None
    }
    assert status == (1 if stale else 0)
    for name, record in stale.items():
        assert f"benchmarks/results/{name}:" in printed
        assert record["command"] is None or f"regenerate with: {record['command']}" in printed
        for source in record["changed"]:
            assert source in printed


def test_regenerate_runs_a_recorded_command_as_recorded():
    import regenerate  # benchmarks/regenerate.py

    command = "OMP_NUM_THREADS=1 python benchmarks/latency.py --geometry cpu-small --set budget=5"
    assert regenerate.runnable(command, 10) == [
        "env", "OMP_NUM_THREADS=1", "nice", "-n", "10", sys.executable, "benchmarks/latency.py", "--geometry",
        "cpu-small", "--set", "budget=5",
    ]
