"""The command-line tools: ``python -m llava_rc`` (the demo) and ``llava-rc-upload`` answer --help without loading
torch or transformers, every option has a help text, and the demo writes pictures that explain themselves."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import llava_rc
from llava_rc import demo, hub_upload

ROOT = Path(llava_rc.__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "huggingface_hub", "PIL")
# Runs --help of a module as `python -m` would, then lists the heavy packages that got imported.
HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit:
    pass
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(%r))
print("HEAVY", ",".join(heavy))
""" % (HEAVY,)


@pytest.mark.parametrize(
    "module, usage", [("llava_rc", "python -m llava_rc"), ("llava_rc.hub_upload", "llava-rc-upload")]
)
def test_help_does_not_import_torch_or_transformers(module, usage):
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, module],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert f"usage: {usage}" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY", result.stdout


@pytest.mark.parametrize("parser", [demo.build_parser(), hub_upload.build_parser()], ids=["demo", "upload"])
def test_every_option_has_a_help_text(parser):
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_demo_writes_a_self_explaining_picture_and_prints_no_timings(tmp_path, capsys):
    samples = tmp_path / "samples"
    samples.mkdir()
    scene = json.loads((demo.SAMPLES / "samples.json").read_text())[0]
    shutil.copy(demo.SAMPLES / scene["image"], samples / scene["image"])
    question = scene["questions"][0]
    (samples / "samples.json").write_text(json.dumps([{"image": scene["image"], "questions": [question]}]))
    demo.main(["--samples", str(samples), "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(question["question"]))
    assert row.split()[-3:-1] == [question["answer"]] * 2  # all tokens and compressed both right
    assert "ms" not in printed.split()
    picture = Image.open(tmp_path / "out" / scene["image"]).convert("RGB")
    assert picture.width == demo.MARGIN + 2 * (demo.PANEL + demo.MARGIN)  # the scene and one question
    colours = {colour for _, colour in picture.getcolors(picture.width * picture.height)}
    assert demo.KEPT[:3] in colours  # kept frames (and the legend's swatch) are drawn opaque
    assert demo.RECOVERED[:3] in colours


@pytest.mark.slow
def test_the_training_script_registers_the_auto_classes_before_it_saves():
    """The package imports lazily; a module that saves models must use the package's names (which register the
    Auto classes: auto_map and the code files in save_pretrained), not import the model modules directly."""
    probe = (
        "import llava_rc.train_easyvqa as training\n"  # no other use of the package's names here
        "from transformers import AutoConfig\n"
        "assert training.LlavaRCForConditionalGeneration._auto_class == 'AutoModelForImageTextToText'\n"
        "print(type(AutoConfig.for_model('llava_rc')).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "LlavaRCConfig"
