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
NEXT_SIZES = [(56, 56), (20, 56), (60, 30), (28, 28), (2, 56)]  # (2, 56): its unpadded grid has no row
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


# ---- LLaVA-OneVision ----------------------------------------------------------------------------------------------
ONEVISION_COMPRESSION = {"method": "cls_attention", "budget": 6}
# (height, width): 2 x 2 crops; wide and unpadded; tall; 3 x 4 and 4 x 4 grids, bilinearly downsampled; so wide that
# its unpadded grid has no row (the base view alone).
ONEVISION_SIZES = [(56, 56), (20, 56), (60, 30), (84, 112), (112, 112), (2, 56)]


@pytest.fixture(scope="module")
def onevision_repo(tmp_path_factory):
    """A tiny OneVision repo as ``llava-rc-upload`` writes it (model with its remote code, image processor,
    tokenizer). The stock ``LlavaOnevisionProcessor`` is not saved: it needs torchvision, which vLLM's CPU
    environment lacks, and the plugin reads only the image processor and the tokenizer."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from tiny import IMAGE_SIZE, tiny_tokenizer
    from tiny_onevision import GRID_PINPOINTS, tiny_onevision_config_dict, tiny_onevision_model

    repo = tmp_path_factory.mktemp("onevision") / "repo"
    text_config = {**tiny_onevision_config_dict()["text_config"], **TEXT_FOR_VLLM}
    tiny_onevision_model(ONEVISION_COMPRESSION, seed=1, text_config=text_config).save_pretrained(repo)
    LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS
    ).save_pretrained(repo)
    tiny_tokenizer().save_pretrained(repo)
    return repo


class OnevisionReference:
    """``generate()`` of a OneVision repo's transformers model, its prompts expanded by the stock processor's own
    counting (``LlavaOnevisionProcessor._get_number_of_features`` for a one-image prompt, base view + newline per
    image for several), as ``LlavaOnevisionProcessor`` does."""

    def __init__(self, repo):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        from tiny_onevision import NUM_PATCHES, stock_token_counter

        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(str(repo), dtype=torch.float32).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(str(repo))
        self.tokenizer = AutoTokenizer.from_pretrained(str(repo))
        self.counter = stock_token_counter()
        self.num_patches = NUM_PATCHES

    def inputs(self, text: str, images) -> dict:
        images = images if isinstance(images, list) else [images]
        pixels = self.image_processor(images, return_tensors="pt")
        sizes = pixels["image_sizes"].tolist()
        if len(images) == 1:
            counts = [self.counter._get_number_of_features(*sizes[0], *pixels["pixel_values"].shape[-2:])]
        else:
            counts = [self.num_patches + 1] * len(images)
        pieces = text.split("<image>")
        assert len(pieces) == len(images) + 1, text
        expanded = pieces[0] + "".join("<image>" * count + piece for count, piece in zip(counts, pieces[1:]))
        ids = self.tokenizer(expanded, return_tensors="pt")
        return dict(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                    pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
                    batch_num_images=self.torch.tensor([len(images)]))

    def __call__(self, text: str, images, compression=None, max_new_tokens: int = 6):
        """(new ids, log-probs, the CompressionReport or None, the prompt length the language model read)."""
        inputs = self.inputs(text, images)
        out = self.model.generate(
            **inputs, compression=compression, max_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True, output_scores=True,
        )
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        logprobs = [float(score[0].log_softmax(-1)[token]) for score, token in zip(out.scores, new.tolist())]
        report = getattr(out, "compression", None)
        length = inputs["input_ids"].shape[1]
        if report is not None:  # placeholders replaced by the kept tokens (newlines included)
            image_id = self.model.config.image_token_id
            length += int(report.kept_counts.sum()) - int((inputs["input_ids"] == image_id).sum())
        return new.tolist(), logprobs, report, length


@pytest.fixture(scope="module")
def onevision_llm(onevision_repo):
    instance = engine(onevision_repo, max_model_len=512)
    yield instance
    shutdown(instance)


def test_onevision_repo_answers_and_prompt_lengths_equal_generate(onevision_repo, onevision_llm):
    """Every fixed-budget method per request, images of several sizes (downsampled grids included), one request with
    two images (each read as its base view and a newline, the stock multi-image rule), all batched in one call: the
    answers and the prompt lengths vLLM's language model reads equal generate()'s."""
    from tiny_onevision import random_onevision_image

    reference = OnevisionReference(onevision_repo)
    config = reference.model.config
    images = [random_onevision_image(seed, *size) for seed, size in enumerate(ONEVISION_SIZES)]
    updates = [{}, {"budget": 0.5}, {"method": "rc", "budget": 5}, {"method": "rc", "budget": 7, "guidance": "llm"},
               {"method": "gprune", "budget": 8}, {"method": "prumerge_plus", "budget": 7},
               {"method": "prumerge", "budget": 5}, {"method": "trsm", "budget": 6, "guidance": "llm"}, {"method": "random", "budget": 4},
               {"method": "none"}]
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
    outputs = onevision_llm.generate(requests, greedy())
    for output, (ids, logprobs, report, length), label in zip(outputs, expected, labels):
        got_ids, got_logprobs = vllm_answer(output)
        assert len(output.prompt_token_ids) == length, f"{label}: vLLM prompt {len(output.prompt_token_ids)}, {length}"
        assert got_ids == ids, f"{label}: vLLM {got_ids}, generate() {ids}"
        assert max(abs(a - b) for a, b in zip(got_logprobs, logprobs)) <= LOGPROB_TOLERANCE, label
    # The engine's own settings: the budget, plus one newline per (downsampled) grid row; base view + newline each
    # in the two-image prompt.
    from llava_rc.vllm_model import onevision_token_counts

    text_only = len(reference.tokenizer(prompt("what color is this ?", 0))["input_ids"])
    for output, size in zip(outputs[: len(images)], ONEVISION_SIZES):
        base, grid, newlines = onevision_token_counts(config, *size)
        assert len(output.prompt_token_ids) - text_only == min(ONEVISION_COMPRESSION["budget"], base + grid) + newlines
    assert onevision_token_counts(config, 112, 112) == (16, 144, 12)  # 16 x 16 grid downsampled to 12 x 12
    two = outputs[len(images)]
    assert len(two.prompt_token_ids) - len(reference.tokenizer(prompt("what shape ?", 0))["input_ids"]) == 2 * (6 + 1)


def test_onevision_same_image_two_questions_get_their_own_selection(onevision_repo, onevision_llm):
    """A text-guided method on one image asked two questions (the first request alone first, filling vLLM's caches):
    each request gets generate()'s selection and answer for its own question."""
    from tiny_onevision import random_onevision_image

    reference = OnevisionReference(onevision_repo)
    image = random_onevision_image(7, 56, 56)
    questions = ("what color is this ?", "how many circle are there ?")
    update = {"method": "trsm", "budget": 6, "guidance": "llm"}
    settings = update_compression(reference.model.config.compression, update).to_dict()
    expected = [reference(prompt(question), image, compression=settings) for question in questions]
    assert expected[0][2].source_index.tolist() != expected[1][2].source_index.tolist(), "vacuous: same selection"
    requests = [{"prompt": prompt(question), "multi_modal_data": {"image": image},
                 "mm_processor_kwargs": {"compression": update}} for question in questions]
    llm = onevision_llm
    llm.generate(requests[:1], greedy())
    outputs = llm.generate(requests[::-1], greedy())[::-1]
    kept = [
        llm.apply_model(lambda model, question=question: model.compress_images(
            *onevision_encoder_inputs(reference, question, image), update_compression(None, settings),
            *llm_guidance(reference, question),
        )[1])[0].source_index.tolist()
        for question in questions
    ]
    for output, (ids, logprobs, report, _), own_kept, question in zip(outputs, expected, kept, questions):
        assert vllm_answer(output)[0] == ids, question
        assert own_kept == report.source_index.tolist(), question


def onevision_encoder_inputs(reference, question: str, image):
    """(pixel values per image, geometry rows (height, width, patched) per image) as the processor hands them over."""
    import torch

    inputs = reference.inputs(prompt(question), image)
    sizes = inputs["image_sizes"].long()
    return [inputs["pixel_values"][0]], [torch.cat([sizes[0], sizes.new_ones(1)])]


def llm_guidance(reference, question: str):
    """"llm" guidance of one request: its prompt's text tokens (the placeholder removed), mask all ones."""
    ids = reference.tokenizer(prompt(question), return_tensors="pt")["input_ids"][0]
    text = ids[ids != reference.model.config.image_token_id]
    return [text], [text.new_ones(text.shape)]


def test_onevision_counts_equal_the_stock_processors_for_many_sizes():
    """The plugin's per-image count (``onevision_token_counts``) equals the stock processor's for image sizes from 1
    to 140 px a side in steps of 3 (wide, tall, unpadded, downsampled); the engine's per-item bound covers them."""
    from transformers import LlavaOnevisionConfig

    from llava_rc.vllm_model import LlavaOnevisionRCProcessingInfo, onevision_token_counts
    from tiny_onevision import IMAGE_SIZE, stock_token_counter, tiny_onevision_config_dict

    config = LlavaOnevisionConfig(**tiny_onevision_config_dict())
    counter = stock_token_counter()
    info = LlavaOnevisionRCProcessingInfo.__new__(LlavaOnevisionRCProcessingInfo)
    info.get_hf_config = lambda: config
    bound = info.get_mm_max_tokens_per_item(512, {"image": 1})["image"]
    most = 0
    for height in range(1, 141, 3):
        for width in range(1, 141, 3):
            count = sum(onevision_token_counts(config, height, width))
            assert count == counter._get_number_of_features(height, width, IMAGE_SIZE, IMAGE_SIZE), (height, width)
            most = max(most, count)
    assert most <= bound
    assert onevision_token_counts(config, 112, 112, patched=False) == (16, 0, 1)
