"""vLLM serves the shipped LLaVA-1.5 checkpoint compressed exactly as ``generate()`` does (llava_rc.vllm_model).

One engine (its settings: the shipped RC with a budget, through ``hf_overrides``) serves every method through
per-request ``mm_processor_kwargs``; answers are greedy and must equal ``generate()`` token for token, with the
same log-probabilities up to float32 kernel differences.
"""

import json

import pytest

from vllm_common import SAMPLES, SHIPPED, Reference, engine, greedy, import_vllm, shutdown, vllm_answer

import_vllm()

from PIL import Image  # noqa: E402

from llava_rc.compression_common import resolve_guidance  # noqa: E402
from llava_rc.compression_registry import update_compression  # noqa: E402

SHIPPED_COMPRESSION = json.loads((SHIPPED / "config.json").read_text())["compression"]
ENGINE_COMPRESSION = {**SHIPPED_COMPRESSION, "budget": 16}  # RC with CLIP guidance, 16 tokens per image
PER_REQUEST = [  # every method at a budget, each a per-request update of the engine's settings
    {"budget": 24},  # same method: RC with CLIP guidance, 24 tokens
    {"guidance": "llm"},  # RC, 16 tokens, the language model's embeddings as guidance
    {"method": "random", "budget": 16},
    {"method": "cls_attention", "budget": 16},
    {"method": "prumerge", "budget": 16},
    {"method": "prumerge_plus", "budget": 16},
    {"method": "gprune", "budget": 16},
    {"method": "trsm", "budget": 16},
    {"method": "trsm", "budget": 16, "guidance": "clip"},
    {"method": "none"},
]
LOGPROB_TOLERANCE = 2e-3  # float32 kernels differ between vLLM's CPU backend and transformers


def prompt(question: str, num_images: int = 1) -> str:
    return "USER: " + "<image>\n" * num_images + f"{question} ASSISTANT:"


def samples(count: int):
    """(image, question) pairs: the first question of the first ``count`` sample scenes, plus a second question
    about the first image (the same image with another question)."""
    entries = json.loads((SAMPLES / "samples.json").read_text())[:count]
    pairs = [(Image.open(SAMPLES / entry["image"]).convert("RGB"), entry["questions"][0]["question"])
             for entry in entries]
    first = entries[0]
    pairs.append((pairs[0][0], first["questions"][1]["question"]))
    return pairs


@pytest.fixture(scope="module")
def llm():
    # enable_mm_embeds: vLLM would refuse image embeddings itself otherwise; the plugin's own refusal is tested here.
    instance = engine(SHIPPED, hf_overrides={"compression": ENGINE_COMPRESSION}, enable_mm_embeds=True)
    yield instance
    shutdown(instance)


@pytest.fixture(scope="module")
def reference():
    return Reference(SHIPPED)


def expected_settings(update: dict | None) -> dict:
    """What ``generate(compression=...)`` is given: the engine's settings updated by the request's, by the rule."""
    return update_compression(ENGINE_COMPRESSION, update).to_dict()


def assert_same(vllm_output, expected, label):
    ids, logprobs = vllm_answer(vllm_output)
    expected_ids, expected_logprobs, _ = expected
    assert ids == expected_ids, f"{label}: vLLM answered {ids}, generate() {expected_ids}"
    difference = max(abs(a - b) for a, b in zip(logprobs, expected_logprobs))
    assert difference <= LOGPROB_TOLERANCE, f"{label}: log-probs differ by {difference}"


def test_every_method_per_request_matches_generate_in_one_batch(llm, reference):
    """Every method (and two same-method updates) at a budget, all requests in one generate() call of vLLM: the
    engine batches requests with different settings; the same image appears with two questions."""
    pairs = samples(3)
    requests, labels = [], []
    for update in PER_REQUEST:
        for image, question in pairs:
            requests.append({
                "prompt": prompt(question),
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"compression": update},
            })
            labels.append((update, image, question))
    outputs = llm.generate(requests, greedy())
    assert len(outputs) == len(requests)
    for output, (update, image, question) in zip(outputs, labels):
        expected = reference(prompt(question), image, compression=expected_settings(update))
        assert_same(output, expected, f"{update} / {question!r}")
    budget_24 = outputs[0]
    assert len(budget_24.prompt_token_ids) - len(outputs[len(pairs)].prompt_token_ids) == 24 - 16


def test_placeholder_counts_follow_the_budget(llm):
    image, question = samples(1)[0]
    text_only = len(llm.generate([prompt(question).replace("<image>\n", "")], greedy(1))[0].prompt_token_ids)
    counts = {}
    for budget in (5, 16, 0.5):
        output = llm.generate(
            [{"prompt": prompt(question), "multi_modal_data": {"image": image},
              "mm_processor_kwargs": {"compression": {"budget": budget}}}],
            greedy(1),
        )[0]
        counts[budget] = len(output.prompt_token_ids) - text_only
    patches = (168 // 14) ** 2
    assert counts == {5: 5, 16: 16, 0.5: patches // 2}


def test_text_guided_selection_reads_each_requests_question(llm, reference):
    """The same image, two questions, text-guided methods: each request gets the selection generate() computes for
    its own question (vLLM's caches key on the image, so the question must be part of the key)."""
    image, first, = samples(1)[0]
    second = samples(1)[1][1]
    # RC with CLIP guidance in the adaptive proportions (recovered_share=None): with the default share both questions
    # about one single-shape image recover the same patches, which would make the check vacuous.
    for update in ({"guidance": "llm"}, {"recovered_share": None}, {"method": "trsm", "budget": 16, "guidance": "llm"}):
        settings = expected_settings(update)
        kept = [reference(prompt(q), image, compression=settings)[2].source_index.tolist() for q in (first, second)]
        assert kept[0] != kept[1], f"{update}: the two questions keep the same patches; the test would be vacuous"
        # First request alone (fills the caches), then both questions again.
        llm.generate([{"prompt": prompt(first), "multi_modal_data": {"image": image},
                       "mm_processor_kwargs": {"compression": update}}], greedy())
        outputs = llm.generate(
            [{"prompt": prompt(q), "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"compression": update}}
             for q in (second, first)],
            greedy(),
        )
        for output, question in zip(outputs, (second, first)):
            assert_same(output, reference(prompt(question), image, compression=settings), f"{update} / {question!r}")


def test_kept_patches_equal_generate(llm, reference):
    """The encoder inside the engine (weights loaded by vLLM) keeps exactly the patches generate() keeps."""
    image, question = samples(1)[0]
    inputs = reference.processor(images=image, text=prompt(question), return_tensors="pt")
    for update in PER_REQUEST[:-1]:
        # "auto" guidance made concrete as generate() does (this repo has CLIP's text tower): the direct encoder call
        # below is handed the guidance inputs of the resolved source.
        settings = resolve_guidance(update_compression(ENGINE_COMPRESSION, update), has_clip_tower=True)
        expected = reference(prompt(question), image, compression=settings.to_dict())[2]
        guidance = (inputs["guidance_input_ids"][0], inputs["guidance_attention_mask"][0])
        if settings.guidance_source == "llm":
            ids = inputs["input_ids"][0]
            text = ids[ids != reference.model.config.image_token_id]
            guidance = (text, text.new_ones(text.shape))

        def encode(model, settings=settings, guidance=guidance):
            return model.compress_images([inputs["pixel_values"][0]], None, settings, [guidance[0]], [guidance[1]])[1]

        report = llm.apply_model(encode)[0]
        assert report.source_index.tolist() == expected.source_index.tolist(), update
        assert report.absorbed.tolist() == expected.absorbed.tolist(), update


def test_two_images_in_one_request(llm, reference):
    pairs = samples(2)
    images = [pairs[0][0], pairs[1][0]]
    question = "what shape is in the image?"
    for update in ({}, {"method": "cls_attention", "budget": 8}):
        output = llm.generate(
            [{"prompt": prompt(question, 2), "multi_modal_data": {"image": images},
              "mm_processor_kwargs": {"compression": update}}],
            greedy(),
        )[0]
        assert_same(output, reference(prompt(question, 2), images, compression=expected_settings(update)), update)


@pytest.mark.parametrize(
    "update, message",
    [
        ({"method": "rc", "budget": None}, "Set a budget"),
        ({"method": "prumerge"}, "Set a budget"),
        ({"method": "nope"}, "unknown compression method 'nope'"),
        ({"budget": 0}, "budget as a token count must be >= 1"),
        ({"method": 3}, "compression method must be a str"),
    ],
)
def test_bad_or_adaptive_settings_are_refused_and_the_engine_keeps_serving(llm, update, message):
    image, question = samples(1)[0]
    with pytest.raises(ValueError, match=message):
        llm.generate([{"prompt": prompt(question), "multi_modal_data": {"image": image},
                       "mm_processor_kwargs": {"compression": update}}], greedy(1))
    assert llm.generate([{"prompt": prompt(question), "multi_modal_data": {"image": image}}], greedy(2))[0].outputs


def test_image_embeddings_are_refused_with_what_is_needed_and_the_engine_keeps_serving(llm):
    """Embeddings cannot be compressed (the methods read the vision tower's attention): a request with
    ``image_embeds`` gets a ValueError naming what it gave and what is needed, whatever its method."""
    import torch

    image, question = samples(1)[0]
    hidden = llm.llm_engine.model_config.get_inputs_embeds_size()
    for update in ({}, {"method": "none"}):
        with pytest.raises(ValueError, match=r"image embeddings \(image_embeds\) for 1 image\(s\), shapes "
                           rf"\[\(16, {hidden}\)\].*needs the images themselves"):
            llm.generate([{"prompt": prompt(question), "multi_modal_data": {"image": torch.zeros(1, 16, hidden)},
                           "mm_processor_kwargs": {"compression": update}}], greedy(1))
    assert llm.generate([{"prompt": prompt(question), "multi_modal_data": {"image": image}}], greedy(2))[0].outputs


def test_an_engine_without_a_budget_fails_at_start_with_the_remedy():
    with pytest.raises(Exception, match="Set a budget"):
        engine(SHIPPED)
