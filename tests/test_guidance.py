"""Text guidance: the question extraction, "clip" guidance (CLIP text tower owned by the model) and "llm" guidance."""

import json
import textwrap

import pytest
import torch

from llava_rc import LlavaRCConfig, LlavaRCProcessor
from llava_rc.processing_llava_rc import extract_question
from llava_rc.hub_upload import run_without_llava_rc
from tiny import CHAT_TEMPLATE, PATCH_SIZE, SPECIAL_TOKENS, WORDS, random_image, tiny_config_dict, tiny_processor
from tiny import tiny_rc_model, tiny_tokenizer

CLIP_TEXT = dict(
    vocab_size=len(SPECIAL_TOKENS) + len(WORDS) + 2,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.3,
)
CLIP_GUIDED = dict(guidance_text_config=CLIP_TEXT, guidance_projection_dim=16)
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


def rc_processor() -> LlavaRCProcessor:
    base = tiny_processor()
    return LlavaRCProcessor(
        image_processor=base.image_processor,
        tokenizer=base.tokenizer,
        guidance_tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


@pytest.mark.parametrize(
    "prompt, question",
    [
        ("USER: <image>\nWhat color is the circle? ASSISTANT:", "What color is the circle?"),
        ("A chat. USER: hi ASSISTANT: hello USER: <image> how many? ASSISTANT:", "how many?"),
        ("[INST] <image>\nDescribe this [/INST]", "Describe this"),
        ("<|im_start|>user\n<image>\nwhat shape<|im_end|><|im_start|>assistant\n", "what shape"),
        ("<image> what is this", "what is this"),
        ("USER: <image> ASSISTANT:", ""),
    ],
)
def test_extract_question(prompt, question):
    assert extract_question(prompt, "<image>") == question


def test_clip_guidance_scores_patches_against_the_question():
    """TRSM keeps the top patches by text score: with "clip" guidance they must be the top patches by
    cosine(CLIP text embedding of the question, visual projection of the post-norm final patch tokens)."""
    model = tiny_rc_model({"method": "trsm", "guidance": "clip", "budget": 4}, **CLIP_GUIDED)
    processor = rc_processor()
    image = random_image(3)
    inputs = processor(images=image, text="USER: <image> what color is the square ? ASSISTANT:", return_tensors="pt")
    report = model.generate(**inputs, return_dict_in_generate=True, **GREEDY).compression
    with torch.no_grad():
        hidden = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        patches = model.guidance_visual_projection(model.model.vision_tower.post_layernorm(hidden[-1][:, 1:]))
        text = model.guidance_text_model(
            input_ids=inputs["guidance_input_ids"], attention_mask=inputs["guidance_attention_mask"]
        ).pooler_output
        scores = torch.nn.functional.cosine_similarity(patches, model.guidance_text_projection(text)[:, None], dim=-1)
    assert torch.equal(report.source_index[0, :4].sort().values, scores[0].topk(4).indices.sort().values)


def test_clip_guided_rc_batch_equals_each_sample_alone_and_empty_question_is_vision_only():
    model = tiny_rc_model({"method": "rc", "guidance": "clip"}, **CLIP_GUIDED)
    processor = rc_processor()
    images = [random_image(seed) for seed in (4, 5, 6)]
    prompts = [
        "USER: <image> what color is the circle ? ASSISTANT:",
        "USER: <image> ASSISTANT:",
        "USER: <image> what shape is in the top left of this picture ? ASSISTANT:",
    ]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        single = processor(images=image, text=prompt, return_tensors="pt")
        alone = model.generate(**single, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, single["input_ids"].shape[1] :])
        assert torch.equal(out.compression.kept_counts[row], alone.compression.kept_counts[0])
    empty = processor(images=images[1], text=prompts[1], return_tensors="pt")
    assert empty["guidance_attention_mask"].sum() == 0
    clip_plan = model.generate(**empty, return_dict_in_generate=True, **GREEDY).compression
    vision_plan = model.generate(
        **empty, compression={"method": "rc", "guidance": None}, return_dict_in_generate=True, **GREEDY
    ).compression
    assert torch.equal(clip_plan.source_index, vision_plan.source_index)
    assert torch.equal(clip_plan.absorbed, vision_plan.absorbed)


def test_clip_guidance_errors():
    processor = rc_processor()
    inputs = processor(images=random_image(7), text="USER: <image> what ? ASSISTANT:", return_tensors="pt")
    without_tower = tiny_rc_model({"method": "rc", "guidance": "clip"})
    with pytest.raises(ValueError, match=r"guidance='clip' needs a CLIP text tower.*use guidance=None"):
        without_tower.generate(**inputs, **GREEDY)
    with_tower = tiny_rc_model({"method": "rc", "guidance": "clip"}, **CLIP_GUIDED)
    inputs.pop("guidance_input_ids")
    with pytest.raises(ValueError, match=r"needs guidance_input_ids"):
        with_tower(**inputs)
    with pytest.raises(ValueError, match=r"guidance_projection_dim must be a positive int .* got None"):
        LlavaRCConfig(**tiny_config_dict(guidance_text_config=CLIP_TEXT))


def test_llm_guidance_ignores_the_answer_in_forward():
    """In forward(labels=...), the question is only the tokens whose label is ignored: changing the answer
    tokens must not change which patches are kept."""
    model = tiny_rc_model({"method": "trsm", "budget": 4, "guidance": "llm"})
    processor = tiny_processor()
    image = random_image(8)
    kept = []
    for answer in ("red", "blue green"):
        inputs = processor(images=image, text=f"USER: <image> what color ? ASSISTANT: {answer}", return_tensors="pt")
        prompt_length = len(processor(images=image, text="USER: <image> what color ? ASSISTANT:")["input_ids"][0])
        labels = inputs["input_ids"].clone()
        labels[:, :prompt_length] = -100
        kept.append(model(**inputs, labels=labels).compression.source_index)
    assert torch.equal(kept[0], kept[1])


LOADER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    repo = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    image = Image.fromarray(np.full((30, 28, 3), 90, dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image> what color ? ASSISTANT:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
    pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    answer = pipe(images=image, text="USER: <image> what shape ? ASSISTANT:", max_new_tokens=3)
    print(json.dumps({"processor": type(processor).__name__, "keys": sorted(inputs.keys()),
                      "method": out["compression"].method["guidance"], "answer": answer[0]["generated_text"]}))
    """
)


@pytest.mark.slow
def test_clip_guided_repo_loads_through_remote_code(tmp_path):
    repo = tmp_path / "repo"
    tiny_rc_model({"method": "rc", "guidance": "clip"}, **CLIP_GUIDED).save_pretrained(repo)
    rc_processor().save_pretrained(repo)
    assert (repo / "guidance_tokenizer").is_dir() and (repo / "processing_llava_rc.py").is_file()
    result = run_without_llava_rc(LOADER, [str(repo)], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["processor"] == "LlavaRCProcessor"
    assert {"guidance_input_ids", "guidance_attention_mask"} <= set(report["keys"])
    assert report["method"] == "clip" and isinstance(report["answer"], str)


def test_clip_guided_rc_in_forward_with_labels():
    model = tiny_rc_model({"method": "rc", "guidance": "clip", "budget": 6}, **CLIP_GUIDED)
    processor = rc_processor()
    prompts = ["USER: <image> what color is the circle ? ASSISTANT: red", "USER: <image> how many ? ASSISTANT: two"]
    inputs = processor(images=[random_image(9), random_image(10)], text=prompts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[labels == processor.image_token_id] = -100
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss) and out.compression.kept_counts.tolist() == [6, 6]
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_auto_guidance_is_clip_with_the_tower_and_off_with_a_warning_without(caplog):
    """The default guidance ("auto") is "clip" on a model with CLIP's text tower; on one without it the method
    runs without text guidance and the call warns, naming the setting (never silently the LLM's embeddings)."""
    from transformers.utils import logging as hf_logging

    processor = rc_processor()
    inputs = processor(images=random_image(8), text="USER: <image> what color is the circle ? ASSISTANT:",
                       return_tensors="pt")
    with_tower = tiny_rc_model({"method": "rc"}, **CLIP_GUIDED)
    for method in ("rc", "trsm"):
        assert with_tower.compression_settings({"method": method}).guidance == "clip"
    auto = with_tower.generate(**inputs, compression={"method": "trsm", "budget": 4}, return_dict_in_generate=True,
                               **GREEDY).compression
    clip = with_tower.generate(**inputs, compression={"method": "trsm", "budget": 4, "guidance": "clip"},
                               return_dict_in_generate=True, **GREEDY).compression
    assert torch.equal(auto.source_index, clip.source_index)

    without_tower = tiny_rc_model({"method": "rc"})
    hf_logging.warning_once.cache_clear()
    for method in ("rc", "trsm"):
        with caplog.at_level("WARNING"):
            caplog.clear()
            settings = without_tower.compression_settings({"method": method, "budget": 4})
            assert settings.guidance is None
            assert f"compression '{method}' with guidance='auto'" in caplog.text and "no CLIP text tower" in caplog.text
        off = without_tower.generate(**inputs, compression={"method": method, "budget": 4, "guidance": None},
                                     return_dict_in_generate=True, **GREEDY).compression
        default = without_tower.generate(**inputs, compression={"method": method, "budget": 4},
                                         return_dict_in_generate=True, **GREEDY).compression
        assert torch.equal(default.source_index, off.source_index)
    hf_logging.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        caplog.clear()
        assert without_tower.compression_settings({"method": "trsm", "guidance": "llm"}).guidance == "llm"
        assert "guidance='llm'" in caplog.text and "not to aim at the question" in caplog.text
