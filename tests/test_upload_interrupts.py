"""llava-rc-upload --force never loses a repo: real conversions (subprocesses) interrupted by SIGINT or SIGTERM at
each named step leave the destination either the old repo, complete, or the new one, complete, and nothing else.

The tool's documented debug hook (LLAVA_RC_UPLOAD_PAUSE=STEP[:SECONDS]) makes each step observable: the tool prints
"paused at STEP" and sleeps there, and the test signals it then. All conversions run at once to share the wait.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import llava_rc
from tiny import tiny_config_dict, tiny_processor

ROOT = Path(llava_rc.__file__).resolve().parent.parent
# (step, signal, what the destination must hold afterwards). "aside" and "replaced" lie inside the two renames,
# where the tool holds signals back: the signal lands once the new repo is in place.
CASES = [
    ("load", signal.SIGTERM, "old"),
    ("write", signal.SIGINT, "old"),
    ("verify", signal.SIGTERM, "old"),
    ("verify", signal.SIGINT, "old"),
    ("aside", signal.SIGTERM, "new"),
    ("replaced", signal.SIGINT, "new"),
    ("push", signal.SIGTERM, "new"),
]
HELD_STEPS = ("aside", "replaced")
EXIT_CODES = {signal.SIGINT: (-signal.SIGINT, 130), signal.SIGTERM: (128 + signal.SIGTERM,)}
TIMEOUT = 600


def snapshot(directory: Path) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def old_repo(directory: Path) -> dict:
    """A previous repo at the destination: a few files and a sub-folder, every byte checked afterwards."""
    (directory / "guidance_tokenizer").mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llava_rc", "old": true}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (directory / "guidance_tokenizer" / "vocab.json").write_text('{"old": 1}')
    return snapshot(directory)


def start(case_dir: Path, base: Path, logs: Path, pause: str | None, repo_id: str | None) -> tuple:
    """The conversion's process and the file its output goes to."""
    (case_dir / "tmp").mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(case_dir / "tmp"),  # the verification scratch folder goes here: checked empty afterwards
        "HF_HOME": str(logs / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_fake",  # passes the credentials check; the push itself is never reached
    }
    environment.pop("LLAVA_RC_UPLOAD_PAUSE", None)
    if pause is not None:
        environment["LLAVA_RC_UPLOAD_PAUSE"] = pause
    command = [sys.executable, "-m", "llava_rc.hub_upload", "--base", str(base), "--method", "cls_attention",
               "--set", "budget=5", "--output-dir", str(case_dir / "out"), "--force"]
    if repo_id is not None:
        command += ["--repo-id", repo_id]
    log_path = logs / f"{case_dir.name}.log"
    with open(log_path, "w") as log:  # the child holds its own copy of the file
        # A runner started in the background inherits SIGINT ignored; the tool must see it as a user would.
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=case_dir,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    return process, log_path


def is_running(pid: int) -> bool:
    """True while ``pid`` is alive and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_interrupted_force_leaves_the_old_or_the_new_repo_complete(tmp_path):
    base, logs = tmp_path / "base", tmp_path / "logs"
    logs.mkdir()
    torch.manual_seed(1)
    LlavaForConditionalGeneration(LlavaConfig(**tiny_config_dict())).eval().save_pretrained(base)
    tiny_processor().save_pretrained(base)

    reference, reference_log = start(tmp_path / "reference", base, logs, None, None)
    runs = []
    for index, (step, signal_number, expected) in enumerate(CASES):
        case_dir = tmp_path / f"case{index}_{step}"
        old = old_repo(case_dir / "out")
        pause = f"{step}:5" if step in HELD_STEPS else f"{step}:{TIMEOUT}"
        repo_id = "org/tiny-rc" if step == "push" else None
        process, log_path = start(case_dir, base, logs, pause, repo_id)
        runs.append(dict(step=step, signal=signal_number, expected=expected, dir=case_dir, old=old, process=process,
                         log=log_path, child=None))

    # Signal each run when it reports its pause.
    deadline = time.monotonic() + TIMEOUT
    waiting = list(runs)
    while waiting:
        assert time.monotonic() < deadline, [run["step"] for run in waiting]
        for run in list(waiting):
            text = run["log"].read_text()
            paused = re.search(rf"paused at {run['step']}(?: \(verification process (\d+)\))?", text)
            if paused:
                run["child"] = int(paused.group(1)) if paused.group(1) else None
                run["process"].send_signal(run["signal"])
                waiting.remove(run)
            else:
                assert run["process"].poll() is None, f"{run['step']} ended before pausing:\n{text[-3000:]}"
        time.sleep(0.1)

    assert reference.wait(TIMEOUT) == 0, reference_log.read_text()[-3000:]
    new = snapshot(tmp_path / "reference" / "out")
    assert "model.safetensors" in new and "modeling_llava_rc.py" in new

    for run in runs:
        code = run["process"].wait(TIMEOUT)
        label = f"{run['step']} + {signal.Signals(run['signal']).name}"
        assert code in EXIT_CODES[run["signal"]], f"{label}: exit {code}\n{run['log'].read_text()[-3000:]}"
        destination = snapshot(run["dir"] / "out")
        if run["expected"] == "old":
            assert destination == run["old"], label
        elif run["step"] == "push":  # the card names the --repo-id; everything else is the reference's
            assert {name: data for name, data in destination.items() if name != "README.md"} == {
                name: data for name, data in new.items() if name != "README.md"
            }, label
            assert "# org/tiny-rc" in destination["README.md"].decode(), label
        else:
            assert destination == new, label
        # No staging folder, no old repo set aside, no verification scratch folder.
        assert sorted(path.name for path in run["dir"].iterdir()) == ["out", "tmp"], label
        assert list((run["dir"] / "tmp").iterdir()) == [], label
        if run["step"] == "verify":
            assert run["child"] is not None and not is_running(run["child"]), f"{label}: verification process left"
