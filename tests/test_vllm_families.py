"""vLLM serves llava-rc-upload repos of the other families (tiny models built here, as tests/test_hub_upload.py
does): LLaVA-NeXT with anyres images of several sizes (newline tokens kept on top of the budget), answers equal to
``generate()``, several requests batched, two images in one request."""

import json

import pytest

from vllm_common import Reference, engine, greedy, import_vllm, shutdown, vllm_answer

import_vllm()

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration  # noqa: E402

from llava_rc import anyres_token_counts, hub_upload  # noqa: E402
from llava_rc.compression_registry import update_compression  # noqa: E402
from tiny_next import random_next_image, tiny_next_config_dict, tiny_next_processor  # noqa: E402

# vLLM's CPU attention supports head sizes of 32 and up: the tiny language model gets 2 heads of 32.
TEXT_FOR_VLLM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
NEXT_COMPRESSION = {"method": "cls_attention", "budget": 6}
NEXT_SIZES = [(56, 56), (20, 56), (60, 30), (28, 28)]
LOGPROB_TOLERANCE = 2e-3


def next_base_config() -> LlavaNextConfig:
    settings = tiny_next_config_dict()
    settings["text_config"] = {**settings["text_config"], **TEXT_FOR_VLLM}
    return LlavaNextConfig(**settings)


@pytest.fixture(scope="module")
def next_repo(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("next")
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(next_base_config()).eval().save_pretrained(root / "base")
    tiny_next_processor().save_pretrained(root / "base")
    argv = ["--base", str(root / "base"), "--method", NEXT_COMPRESSION["method"], "--set",
            f"budget={NEXT_COMPRESSION['budget']}", "--output-dir", str(root / "repo")]
    assert hub_upload.main(argv) == 0
    return root / "repo"


def prompt(question: str, num_images: int = 1) -> str:
    return "USER: " + "<image> " * num_images + f"{question} ASSISTANT:"


def test_next_repo_answers_equal_generate_batched_and_with_two_images(next_repo):
    reference = Reference(next_repo)
    config = reference.model.config
    assert config.compression["method"] == NEXT_COMPRESSION["method"]
    images = [random_next_image(seed, *size) for seed, size in enumerate(NEXT_SIZES)]
    updates = [{}, {"budget": 0.5}, {"method": "rc", "budget": 5}, {"method": "gprune", "budget": 8},
               {"method": "prumerge_plus", "budget": 7}, {"method": "none"}]
    requests, expected, labels = [], [], []
    for update in updates:
        settings = update_compression(config.compression, update).to_dict()
        for image in images:
            requests.append({"prompt": prompt("what color is this ?"), "multi_modal_data": {"image": image},
                             "mm_processor_kwargs": {"compression": update}})
            expected.append(reference(prompt("what color is this ?"), image, compression=settings))
            labels.append((update, image.size))
        requests.append({"prompt": prompt("what shape ?", 2), "multi_modal_data": {"image": images[:2]},
                         "mm_processor_kwargs": {"compression": update}})
        expected.append(reference(prompt("what shape ?", 2), images[:2], compression=settings))
        labels.append((update, "two images"))
    llm = engine(next_repo, max_model_len=512)
    try:
        outputs = llm.generate(requests, greedy())
        text_only = len(llm.generate([prompt("what color is this ?", 0)], greedy(1))[0].prompt_token_ids)
    finally:
        shutdown(llm)
    for output, (ids, logprobs, _), label in zip(outputs, expected, labels):
        got_ids, got_logprobs = vllm_answer(output)
        assert got_ids == ids, f"{label}: vLLM {got_ids}, generate() {ids}"
        assert max(abs(a - b) for a, b in zip(got_logprobs, logprobs)) <= LOGPROB_TOLERANCE, label
    # Placeholders of the engine's own settings: the budget (clamped to the image) plus the grid's newline tokens.
    for output, size in zip(outputs[: len(images)], NEXT_SIZES):
        base, grid, newlines = anyres_token_counts(config, [size])[0].tolist()
        assert len(output.prompt_token_ids) - text_only == min(NEXT_COMPRESSION["budget"], base + grid) + newlines
