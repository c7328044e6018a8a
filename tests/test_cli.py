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
    """One scene with an expected answer and one without (a samples file of one's own): the table names each
    question's scene and shows '-' for a missing answer; the pictures frame every counted token's patch or say why not."""
    samples = tmp_path / "samples"
    samples.mkdir()
    scenes = json.loads((demo.SAMPLES / "samples.json").read_text())
    scene, mosaic = scenes[0], next(entry for entry in scenes if "mosaic" in entry["image"])
    for entry in (scene, mosaic):
        shutil.copy(demo.SAMPLES / entry["image"], samples / entry["image"])
    question = scene["questions"][0]
    unanswered = {"question": mosaic["questions"][0]["question"]}  # no "answer" key
    (samples / "samples.json").write_text(json.dumps([
        {"image": scene["image"], "questions": [question]}, {"image": mosaic["image"], "questions": [unanswered]},
    ]))
    demo.main(["--samples", str(samples), "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if question["question"] in line)
    assert row.split()[0] == scene["image"]
    assert row.split()[-3:-1] == [question["answer"]] * 2  # all tokens and compressed both right
    row = next(line for line in printed.splitlines() if unanswered["question"] in line)
    assert row.split()[0] == mosaic["image"] and row.split()[-4] == "-"
    assert "1/1 right with all tokens" in printed
    assert "ms" not in printed.split()
    picture = Image.open(tmp_path / "out" / scene["image"]).convert("RGB")
    assert picture.width == demo.MARGIN + 2 * (demo.PANEL + demo.MARGIN)  # the scene and one question
    colours = {colour for _, colour in picture.getcolors(picture.width * picture.height)}
    assert demo.KEPT[:3] in colours  # kept frames (and the legend's swatch) are drawn opaque
    assert demo.RECOVERED[:3] in colours
    assert demo.CENTRE[:3] in colours
    assert (tmp_path / "out" / mosaic["image"]).exists()


def test_demo_answers_questions_about_ones_own_picture(tmp_path, capsys):
    """--image (any size and format; the model sees its centre square) with repeated --question."""
    wide = Image.new("RGB", (128, 64), "white")
    wide.paste(Image.open(demo.SAMPLES / "test-mosaic-0-1.png").convert("RGB").resize((64, 64)), (32, 0))
    wide.save(tmp_path / "mine.jpg")
    questions = ["what shape is present?", "is there a circle?"]
    argv = ["--image", str(tmp_path / "mine.jpg"), "--output-dir", str(tmp_path / "out")]
    demo.main(argv + [item for question in questions for item in ("--question", question)])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mine.jpg")]
    assert [row.split()[-4] for row in rows] == ["-", "-"] and len(rows) == len(questions)
    picture = Image.open(tmp_path / "out" / "mine.png")
    assert picture.format == "PNG" and picture.width == demo.MARGIN + 3 * (demo.PANEL + demo.MARGIN)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--question", "what?"], "--question needs --image"),
        (["--image", "missing.png", "--question", "what?"], "is not a file"),
        (["--image", "llava_rc/samples/test-390.png"], "--image needs at least one --question"),
    ],
)
def test_demo_rejects_incomplete_image_arguments(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert message in capsys.readouterr().err


def test_demo_picture_accounts_for_every_kept_token():
    """Framed patches (kept, recovered) + merge centres + extra tokens (not drawable) == the kept count, and the
    roles are disjoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(demo.CHECKPOINT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(demo.CHECKPOINT, trust_remote_code=True)
    image = Image.open(demo.SAMPLES / "test-mosaic-0-1.png")
    inputs = processor(images=image, text=demo.PROMPT.format(question="what shape is present?"), return_tensors="pt")
    settings = dict(max_new_tokens=1, return_dict_in_generate=True)
    on = model.generate(**inputs, **settings).compression
    vision = model.generate(**inputs, compression={"guidance": None}, **settings).compression
    roles = demo.patch_roles(on, vision)
    extra = demo.extra_tokens(on)
    assert extra == 1 and roles["centre"], "RC on a mosaic merges into centres and adds its extra token"
    drawn = len(roles["kept"]) + len(roles["recovered"]) + len(roles["centre"])
    assert drawn + extra == int(on.kept_counts[0])
    names = list(roles)
    for index, first in enumerate(names):
        for second in names[index + 1 :]:
            assert not roles[first] & roles[second], (first, second)
    breakdown = demo.token_breakdown(roles, extra)
    assert breakdown == f"{len(roles['kept']) + len(roles['recovered'])} framed + {len(roles['centre'])} centres + 1 extra"


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
