"""save_pretrained writes a Hub repo that loads through remote code in a process where llava_rc cannot be imported."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from llava_rc.hub_upload import run_without_llava_rc
from tiny import make_batch, tiny_processor, tiny_rc_model

COMPRESSION = {"method": "cls_attention", "budget": 5}

# Runs in a fresh interpreter from an empty folder (run_without_llava_rc blocks the installed package, so nothing
# but the repo's own copied code files can be used).
LOADER = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline
    from PIL import Image
    import numpy as np

    try:
        import llava_rc
    except ImportError:
        pass
    else:
        raise SystemExit("llava_rc must not be importable here")

    repo, reference_path = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    reference = torch.load(reference_path)
    batch = reference["batch"]
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    images = [Image.fromarray(np.full((30, 28, 3), 40 * i, dtype=np.uint8)) for i in range(2)]
    inputs = processor(images=images, text=["USER: <image> what color ? ASSISTANT:"] * 2, return_tensors="pt",
                       padding=True)
    from_processor = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    single = pipe(images=images[0], text="USER: <image> what shape ? ASSISTANT:", max_new_tokens=3)
    batched = pipe(images=images, text=["USER: <image> what ? ASSISTANT:", "USER: <image> shape in top left ? ASSISTANT:"],
                   max_new_tokens=3, batch_size=2)
    batched = [item[0] if isinstance(item, list) else item for item in batched]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[1]},
                                             {"type": "text", "text": "what color is this ?"}]}]
    chat = pipe(text=messages, max_new_tokens=3)
    print(json.dumps({
        "model_type": config.model_type,
        "model_class": type(model).__name__,
        "module": type(model).__module__,
        "compression": config.compression,
        "sequences_equal": torch.equal(out.sequences, reference["sequences"]),
        "kept_counts": out["compression"].kept_counts.tolist(),
        "processor_new_tokens": from_processor.shape[1] - inputs["input_ids"].shape[1],
        "pipeline": [single[0]["generated_text"], [item["generated_text"] for item in batched],
                     chat[0]["generated_text"][-1]],
    }))
    """
)


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory):
    directory = tmp_path_factory.mktemp("repo")
    model = tiny_rc_model(COMPRESSION)
    model.save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    batch = make_batch([4, 7], [1, 1], seed=21)
    sequences = model.generate(**batch, max_new_tokens=5, do_sample=False)
    torch.save({"batch": batch, "sequences": sequences}, directory / "reference.pt")
    return directory


def test_saved_repo_has_auto_map_and_flat_code(saved_repo: Path):
    config = json.loads((saved_repo / "config.json").read_text())
    assert config["model_type"] == "llava_rc"
    assert config["auto_map"]["AutoConfig"] == "configuration_llava_rc.LlavaRCConfig"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava_rc.LlavaRCForConditionalGeneration"
    assert config["compression"]["method"] == "cls_attention"
    package = Path(__file__).resolve().parents[1] / "llava_rc"
    not_model_code = {
        "__init__.py", "__main__.py", "demo.py", "hub_upload.py", "processing_llava_rc.py", "easyvqa.py", "train_easyvqa.py",
        "train_qwen_easyvqa.py",
        "lmms_eval_model.py", "vllm_plugin.py", "vllm_model.py",
    }
    other_families = {"configuration_qwen_vl_rc.py", "modeling_qwen_vl_rc.py"}  # in Qwen repos (test_qwen_remote_code)
    module_files = {path.name for path in package.glob("*.py")} - not_model_code - other_families
    assert module_files <= {path.name for path in saved_repo.glob("*.py")}


@pytest.mark.slow
def test_remote_code_round_trip_in_a_fresh_process(saved_repo: Path, tmp_path: Path):
    result = run_without_llava_rc(
        LOADER, [str(saved_repo), str(saved_repo / "reference.pt")], tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_type"] == "llava_rc"
    assert report["model_class"] == "LlavaRCForConditionalGeneration"
    assert report["module"].startswith("transformers_modules")
    assert report["compression"]["budget"] == 5
    assert report["sequences_equal"]
    assert report["kept_counts"] == [5, 5]
    assert report["processor_new_tokens"] == 3
    single, batched, chat = report["pipeline"]
    assert isinstance(single, str) and len(batched) == 2 and all(isinstance(text, str) for text in batched)
    assert chat["role"] == "assistant" and isinstance(chat["content"], str)
