"""lmms-eval's ``--model llava_rc`` (llava_rc/lmms_eval_model.py) on the shipped model and a local easy-VQA task.

The end-to-end test runs the command documented in docs/evaluation.md, with only the repo id and the task names
changed, and checks the results JSON (lmms-eval can exit 0 after a failure) against the project's own benchmark
code (``easyvqa.evaluate``, what benchmarks/accuracy.py runs) on the same 50 questions. Skipped where lmms-eval is
not installed (``pip install -e ".[eval]"``; CI installs it).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from llava_rc import easyvqa  # noqa: E402
from llava_rc.lmms_eval_model import LlavaRC, parse_compression_arg, truncate_at_stop, user_message  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
TASKS = ROOT / "tests" / "lmms_tasks"
PARQUET = TASKS / "easyvqa" / "easyvqa_test.parquet"
DOCUMENTED_TASKS = "--tasks gqa,textvqa_val,pope,mme"
CONFIG = json.loads((CHECKPOINT / "config.json").read_text())
CONFIGURED = CONFIG["compression"]  # RC with CLIP guidance
PATCHES = CONFIG["image_seq_length"]  # image tokens per image without compression


def documented_command() -> str:
    """The lmms-eval command of docs/evaluation.md (continuation lines joined)."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    commands = [
        re.sub(r"\\\n\s*", "", match)
        for match in re.findall(r"^ *python -m lmms_eval (?:.*\\\n)*.*$", text, flags=re.MULTILINE)
    ]
    assert len(set(commands)) == 1, f"expected one lmms-eval command in docs/evaluation.md, found {commands}"
    return commands[0].strip()


def test_the_entry_point_registers_llava_rc():
    """Installed metadata names the model; this module was imported first, so a circular import would show here."""
    from lmms_eval.models import get_model

    assert get_model("llava_rc") is LlavaRC


def test_compression_arg_parsing():
    assert parse_compression_arg(None) is None
    assert parse_compression_arg("none") == {"method": "none"}
    assert parse_compression_arg("rc") == {"method": "rc"}
    assert parse_compression_arg('{"method": "rc", "budget": 64}') == {"method": "rc", "budget": 64}
    assert parse_compression_arg("'{\"method\": \"gprune\"}'") == {"method": "gprune"}
    for bad in ('{"budget": 64}', "{method: rc}", "rc budget", 3):
        with pytest.raises(ValueError, match="compression"):
            parse_compression_arg(bad)


def test_prompt_is_the_benchmarks_prompt_and_images_follow_their_markers():
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    prompt = processor.apply_chat_template([user_message("what shape is this?", 1)], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == easyvqa.PROMPT.format(question="what shape is this?")
    assert user_message("<image>\nfirst <image> second", 2)["content"] == [
        {"type": "image"},
        {"type": "text", "text": "first"},
        {"type": "image"},
        {"type": "text", "text": "second"},
    ]
    assert [part["type"] for part in user_message("compare them", 2)["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError, match="2 <image> markers but the sample has 1 images"):
        user_message("<image> and <image>", 1)
    assert truncate_at_stop("red ASSISTANT: blue", ["ASSISTANT:"]) == "red "


def test_bad_model_args_fail_before_any_request(tmp_path):
    with pytest.raises(ValueError, match=r"unknown llava_rc model_args \['temperature'\]"):
        LlavaRC(pretrained=str(tmp_path), temperature=0.2)
    with pytest.raises(ValueError, match="--batch_size N"):
        LlavaRC(pretrained=str(tmp_path), batch_size="auto")
    with pytest.raises(ValueError, match="unknown compression method 'rcc'"):
        LlavaRC(pretrained=str(CHECKPOINT), compression="rcc")


def requests_for(lmms, docs: list[dict], gen_kwargs: dict):
    """lmms-eval generate_until instances over ``docs`` (each with "question" and "images")."""
    from lmms_eval.api.instance import Instance

    lmms.task_dict = {"local": {"test": docs}}
    return [
        Instance(
            request_type="generate_until",
            arguments=(doc["question"], dict(gen_kwargs), lambda doc: doc["images"], doc_id, "local", "test"),
            idx=0,
            metadata={"task": "local", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, doc in enumerate(docs)
    ]


@pytest.mark.parametrize("compression", ["none", "rc"])
def test_batches_with_several_images_per_sample_answer_as_alone(compression):
    """Left-padded batches mixing one- and two-image samples give each sample's answer and token count alone."""
    lmms = LlavaRC(pretrained=str(CHECKPOINT), compression=compression, batch_size=3, device="cpu")
    dataset = datasets.load_dataset("parquet", data_files={"test": str(PARQUET)})["test"]
    docs = [
        {"question": dataset[0]["question"], "images": [dataset[0]["image"]]},
        {"question": "<image> what shape is this? <image>", "images": [dataset[1]["image"], dataset[2]["image"]]},
        {"question": "is there a red shape in the image?", "images": [dataset[3]["image"], dataset[4]["image"]]},
    ]
    gen_kwargs = {"max_new_tokens": 4, "temperature": 0, "until": ["ASSISTANT:"]}
    together = lmms.generate_until(requests_for(lmms, docs, gen_kwargs))
    alone = [lmms.generate_until(requests_for(lmms, [doc], gen_kwargs))[0] for doc in docs]
    assert [result.text for result in together] == [result.text for result in alone]
    assert [result.token_counts for result in together] == [result.token_counts for result in alone]
    read = [result.token_counts.input_tokens for result in together]
    if compression == "none":  # every image token plus the text
        assert PATCHES < read[0] < PATCHES + 20 and 2 * PATCHES < read[1] < 2 * PATCHES + 20
    else:
        assert read[1] < PATCHES  # two compressed images read fewer tokens than one full one


def test_a_stock_llava_repo_gives_the_baseline_row_of_its_rc_twin(tmp_path):
    """Same weights saved as a stock LLaVA repo and as an LLaVA-RC repo: compression=none answers and counts alike."""
    from tiny import NUM_PATCHES, random_image, stock_twin, tiny_processor, tiny_rc_model

    rc_model = tiny_rc_model()
    for name, model in (("rc", rc_model), ("stock", stock_twin(rc_model))):
        model.save_pretrained(tmp_path / name)
        tiny_processor().save_pretrained(tmp_path / name)
    docs = [{"question": "what shape is this?", "images": [random_image(seed)]} for seed in range(3)]
    gen_kwargs = {"max_new_tokens": 5, "temperature": 0}
    rows = {}
    for name in ("rc", "stock"):
        lmms = LlavaRC(pretrained=str(tmp_path / name), compression="none", batch_size=2, device="cpu")
        rows[name] = [(result.text, result.token_counts) for result in
                      lmms.generate_until(requests_for(lmms, docs, gen_kwargs))]
    assert rows["rc"] == rows["stock"]
    assert all(counts.input_tokens > NUM_PATCHES for _, counts in rows["stock"])
    with pytest.raises(ValueError, match="needs an LLaVA-RC repo"):
        LlavaRC(pretrained=str(tmp_path / "stock"), compression="rc", device="cpu")


@pytest.fixture(scope="module")
def lmms_eval_runs(tmp_path_factory):
    """Results JSON of the documented command, run on the shipped model with compression none and as configured."""
    output = tmp_path_factory.mktemp("lmms_eval")
    command = documented_command()
    assert command.count(DOCUMENTED_TASKS) == 1, command
    command = command.replace(DOCUMENTED_TASKS, f"--tasks easyvqa_local --include_path {TASKS}")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # `python` is this interpreter
    environment = {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "REPO": str(CHECKPOINT)}
    runs = {}
    for name, compression in (("none", "none"), ("configured", json.dumps(CONFIGURED))):
        finished = subprocess.run(
            ["bash", "-c", command],
            cwd=output,
            env={**environment, "COMPRESSION": compression},
            capture_output=True,
            text=True,
            timeout=600,
        )
        found = sorted(output.glob("results/**/*_results.json"), key=lambda path: path.stat().st_mtime)
        assert len(found) == len(runs) + 1, f"no results JSON for {name}: {finished.stdout[-3000:]}{finished.stderr[-3000:]}"
        runs[name] = json.loads(found[-1].read_text())
    return runs


@pytest.fixture(scope="module")
def benchmark():
    """easyvqa.evaluate (benchmarks/accuracy.py's measure) on the parquet's questions, both settings."""
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINT, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT, trust_remote_code=True)
    dataset = datasets.load_dataset("parquet", data_files={"test": str(PARQUET)})["test"]
    batches = []
    for start in range(0, len(dataset), 25):
        rows = dataset[start : start + 25]
        inputs = processor(
            images=[image.convert("RGB") for image in rows["image"]],
            text=[easyvqa.PROMPT.format(question=question) for question in rows["question"]],
            padding=True,
            return_tensors="pt",
        )
        batches.append(easyvqa.PreparedBatch(dict(inputs), rows["answer"], rows["kind"]))
    text_tokens = sum(
        int((batch.inputs["attention_mask"].bool() & (batch.inputs["input_ids"] != model.config.image_token_id)).sum())
        for batch in batches
    )
    with torch.no_grad():
        results = {
            "none": easyvqa.evaluate(model, processor, batches, {"method": "none"}),
            "configured": easyvqa.evaluate(model, processor, batches, CONFIGURED),
        }
    return results, text_tokens


@pytest.mark.parametrize("setting", ["none", "configured"])
def test_lmms_eval_accuracy_matches_the_projects_benchmark(lmms_eval_runs, benchmark, setting):
    run = lmms_eval_runs[setting]
    measured, _ = benchmark
    questions = measured[setting]["questions"]
    assert run["n-samples"]["easyvqa_local"]["effective"] == questions == 50
    lmms_eval_correct = run["results"]["easyvqa_local"]["exact_match,none"] * questions
    benchmark_correct = measured[setting]["accuracy"] * questions
    assert abs(lmms_eval_correct - benchmark_correct) <= 1 + 1e-9, (lmms_eval_correct, benchmark_correct)


def test_lmms_eval_records_the_language_model_tokens(lmms_eval_runs, benchmark):
    """Input tokens per sample = text + kept image tokens, as the benchmark counts them; fewer with compression."""
    measured, text_tokens = benchmark
    efficiency = {name: run["efficiency"]["by_task"]["easyvqa_local"] for name, run in lmms_eval_runs.items()}
    for name, summary in efficiency.items():
        assert summary["docs_with_token_counts"] == 50
        image_tokens = summary["total_input_tokens"] - text_tokens
        assert image_tokens == pytest.approx(measured[name]["kept_mean"] * 50, abs=2), name
    assert efficiency["none"]["total_input_tokens"] == text_tokens + 50 * PATCHES
    assert efficiency["configured"]["total_input_tokens"] < 0.6 * efficiency["none"]["total_input_tokens"]
