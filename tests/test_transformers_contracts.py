"""The generic contracts of transformers models, written for our classes (LLaVA and LLaVA-NeXT).

Each family runs with ``"none"``, a fixed-budget method and adaptive RC: tuple outputs, hidden states and attentions
at the compressed length, fullgraph compile of the stock paths, save/load, cache vs no cache, continuation, the
refusals and their messages, the per-call settings rule, and the report's codes.
"""

import math

import numpy as np
import pytest
import torch

from llava_rc import LlavaRCConfig, parse_compression
from llava_rc.compressed_generation import COMPRESSED_CACHE_FLAG, PADDING_SOURCE, SYNTHETIC_SOURCE
from llava_rc.compression_registry import update_compression
from tiny import IMAGE_TOKEN_ID, NUM_PATCHES, make_batch, stock_twin, tiny_config_dict, tiny_rc_model, unpad_row
from tiny_next import make_next_batch, tiny_next_model

SETTINGS = {
    "none": {"method": "none"},
    "budget": {"method": "cls_attention", "budget": 5},
    "adaptive": {"method": "rc", "lof_neighbors_visual": 3, "lof_neighbors_text": 3, "lof_neighbors_merge": 3},
}
GREEDY = {"max_new_tokens": 3, "do_sample": False}
# A continuation feeds the new tokens back as input_ids: a random tiny model must generate neither image placeholders
# nor the end of sequence (a finished row would be padded in one long call but continued in two): min_new_tokens
# equal to max_new_tokens suppresses the end of sequence in every call.
CONTINUABLE = {"do_sample": False, "bad_words_ids": [[IMAGE_TOKEN_ID]]}


def family_model_and_batch(family: str, settings: dict, **overrides):
    if family == "llava":
        return tiny_rc_model(settings, **overrides), make_batch([4, 7], [1, 1], seed=3), {}
    batch = make_next_batch([4, 6], [[(56, 56)], [(20, 56)]], seed=3)
    return tiny_next_model(settings, **overrides), batch, {"image_sizes": batch["image_sizes"]}


FAMILIES = ["llava", "next"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_return_dict_false_returns_the_tuple_of_the_output(family, name):
    model, batch, _ = family_model_and_batch(family, SETTINGS[name])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    as_dict = model(**batch, labels=labels)
    as_tuple = model(**batch, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_hidden_states_and_attentions_have_the_compressed_length(family, name):
    model, batch, _ = family_model_and_batch(family, SETTINGS[name])
    model.set_attn_implementation("eager")
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    length = out.logits.shape[1]
    if name != "none":
        assert length == out.attention_mask.shape[1] < batch["input_ids"].shape[1]
    num_layers = model.config.text_config.num_hidden_layers
    assert len(out.hidden_states) == num_layers + 1 and all(h.shape[1] == length for h in out.hidden_states)
    assert len(out.attentions) == num_layers and all(a.shape[-2:] == (length, length) for a in out.attentions)


def test_forward_keeps_the_stock_signature():
    """transformers reads **kwargs: Unpack[TransformersKwargs] to decide that output_attentions is supported."""
    import inspect

    parameter = inspect.signature(type(tiny_rc_model()).forward).parameters["kwargs"]
    assert "TransformersKwargs" in str(parameter.annotation)


@pytest.mark.slow
def test_fullgraph_compile_of_the_text_path_and_of_a_decode_step():
    """generate's auto-compile traces forward for the prefill and every decode step: with compression configured
    (and a per-call override), the text-only call must trace with no graph break, as stock does. (With
    pixel_values not even stock LLaVA traces fullgraph on transformers 5.23: its output-capturing hooks take a
    lock; our "none" path with images is that same stock call.)"""
    model = tiny_rc_model({"method": "rc"})
    batch = make_batch([4, 7], [0, 0], seed=4)
    del batch["pixel_values"]
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        prefill = compiled(**batch, compression={"method": "none"}, use_cache=True)
        reference = model(**batch, use_cache=True)
        assert torch.allclose(prefill.logits, reference.logits, atol=1e-5)
        token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        step = compiled(input_ids=token, attention_mask=mask, past_key_values=prefill.past_key_values)
        assert step.logits.shape[:2] == (2, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["budget", "adaptive"])
def test_save_load_and_cache_vs_no_cache(family, name, tmp_path):
    model, batch, _ = family_model_and_batch(family, SETTINGS[name])
    with_cache = model.generate(**batch, **GREEDY)
    assert torch.equal(with_cache, model.generate(**batch, **GREEDY, use_cache=False))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    reloaded.generation_config.pad_token_id = model.generation_config.pad_token_id
    assert reloaded.config.compression == model.config.compression
    assert torch.equal(reloaded.generate(**batch, **GREEDY), with_cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_continuing_from_a_compressed_cache_is_refused_and_without_it_works(family):
    model, batch, _ = family_model_and_batch(family, SETTINGS["budget"])
    out = model.generate(**batch, **CONTINUABLE, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    assert getattr(out.past_key_values, COMPRESSED_CACHE_FLAG)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, batch["input_ids"].shape[1]:])], 1)
    with pytest.raises(ValueError, match=r"compressed prompt.*without the cache"):
        model.generate(input_ids=out.sequences, attention_mask=mask, past_key_values=out.past_key_values, **GREEDY)
    images = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}
    continued = model.generate(input_ids=out.sequences, attention_mask=mask, **images, **CONTINUABLE, max_new_tokens=3, min_new_tokens=3)
    longer = model.generate(**batch, **CONTINUABLE, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(continued, longer)  # greedy: continuing 3 + 3 tokens equals 6 in one call


@pytest.mark.parametrize("family", FAMILIES)
def test_continuing_a_none_generation_from_its_cache_works(family):
    model, batch, _ = family_model_and_batch(family, SETTINGS["none"])
    out = model.generate(**batch, **CONTINUABLE, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    assert out.compression is None
    mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, batch["input_ids"].shape[1]:])], 1)
    # As with stock LLaVA, the images are in the cache already: continue with the ids and the cache alone.
    continued = model.generate(
        input_ids=out.sequences, attention_mask=mask, past_key_values=out.past_key_values,
        **CONTINUABLE, max_new_tokens=3, min_new_tokens=3,
    )
    assert torch.equal(continued, model.generate(**batch, **CONTINUABLE, max_new_tokens=6, min_new_tokens=6))


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_with_compression_is_refused_by_name(family):
    model, batch, _ = family_model_and_batch(family, SETTINGS["budget"])
    embeds = model.get_input_embeddings()(batch["input_ids"])
    images = {key: value for key, value in batch.items() if key != "input_ids"}
    with pytest.raises(ValueError, match=r"compression needs input_ids .* no inputs_embeds"):
        model(inputs_embeds=embeds, **images)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_mismatching_image_tokens_raise_value_error(family, name):
    model, batch, _ = family_model_and_batch(family, SETTINGS[name])
    batch["input_ids"] = batch["input_ids"].clone()
    first = (batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    batch["input_ids"][0, first] = 5
    with pytest.raises(ValueError):
        model(**batch)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_generate_output_always_carries_compression(family, name):
    model, batch, _ = family_model_and_batch(family, SETTINGS[name])
    out = model.generate(**batch, **GREEDY, return_dict_in_generate=True)
    if name == "none":
        assert out.compression is None
    else:
        assert out.compression.kept_counts.shape == (2,)
    text_only = model.generate(input_ids=batch["input_ids"][:, -3:], **GREEDY, return_dict_in_generate=True)
    assert text_only.compression is None


@pytest.mark.parametrize("pad_left", [True, False])
def test_forward_keeps_the_callers_padding_side_so_last_logits_are_each_rows_own(pad_left):
    model = tiny_rc_model(SETTINGS["adaptive"])
    # Rows of the same length (no padding at all) and rows of different lengths.
    for lengths in ([5, 5, 5], [4, 9, 6]):
        batch = make_batch(lengths, [1, 1, 1], seed=8, pad_left=pad_left)
        out = model(**batch)
        assert len(set(out.compression.kept_counts.tolist())) > 1
        mask = out.attention_mask.bool()
        padded_right = not pad_left and len(set(lengths)) > 1
        assert bool((~mask[:, 0]).any()) == (len(set(out.compression.kept_counts.tolist())) > 1 and not padded_right)
        for row in range(3):
            alone = model(**unpad_row(batch, row, row, 1)).logits[0, -1]
            last = mask[row].nonzero().max()
            if not padded_right:
                assert last == mask.shape[1] - 1  # the caller's last position is the row's last token
            torch.testing.assert_close(out.logits[row, last], alone, rtol=1e-4, atol=1e-4)


def test_one_element_feature_layer_list_is_the_int():
    model = tiny_rc_model(SETTINGS["budget"])
    batch = make_batch([4], [1], seed=9)
    as_int = model(**batch, vision_feature_layer=-2).logits
    assert torch.equal(model(**batch, vision_feature_layer=[-2]).logits, as_int)
    listed = tiny_rc_model(SETTINGS["budget"], vision_feature_layer=[-2])
    assert torch.equal(listed(**batch).logits, as_int)


BAD_INPUTS = [
    ("empty input_ids", lambda b: {**b, "input_ids": b["input_ids"][:, :0], "attention_mask": None},
     ValueError, r"input_ids of shape \(2, 0\) is empty"),
    ("mask shape", lambda b: {**b, "attention_mask": b["attention_mask"][:, 1:]},
     ValueError, r"attention_mask has shape \(2, \d+\); expected \(2, \d+\)"),
    ("labels shape", lambda b: {**b, "labels": b["input_ids"][:1]},
     ValueError, r"labels has shape \(1, \d+\); expected \(2, \d+\)"),
    ("one channel", lambda b: {**b, "pixel_values": b["pixel_values"][:, :1]},
     ValueError, r"pixel_values has shape \(2, 1, 28, 28\); expected \(num_images, 3, 28, 28\)"),
    ("rank", lambda b: {**b, "pixel_values": b["pixel_values"][0]},
     ValueError, r"pixel_values has shape \(3, 28, 28\); expected"),
    ("not a tensor", lambda b: {**b, "pixel_values": b["pixel_values"].tolist()},
     TypeError, r"pixel_values must be a torch.Tensor, got list"),
    ("guidance rows", lambda b: {**b, "guidance_mask": b["attention_mask"][:1]},
     ValueError, r"guidance_mask has shape \(1, \d+\); expected \(2, \d+\)"),
    ("guidance ids rows", lambda b: {**b, "guidance_input_ids": torch.ones(3, 4, dtype=torch.long)},
     ValueError, r"guidance_input_ids has shape \(3, 4\); expected \(2, guidance_length\)"),
    ("feature layer", lambda b: {**b, "vision_feature_layer": 5},
     ValueError, r"vision_feature_layer=5 is out of range .* 2 layers; expected an int in \[-3, 2\]"),
    ("nan pixel", lambda b: {**b, "pixel_values": b["pixel_values"].index_put((torch.tensor(0),), torch.tensor(math.nan))},
     ValueError, r"features hold NaN or inf"),
    ("inf pixel", lambda b: {**b, "pixel_values": b["pixel_values"] * torch.tensor(math.inf)},
     ValueError, r"features hold NaN or inf"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, change, error, message):
    model = tiny_rc_model(SETTINGS["adaptive"])
    batch = make_batch([4, 7], [1, 1], seed=5)
    with pytest.raises(error, match=message):
        model(**change(batch))
    changed = change(batch)
    if "labels" not in changed:  # generate takes no labels
        with pytest.raises(error, match=message):
            model.generate(**changed, **GREEDY)


def test_next_pixel_values_with_too_few_crops_are_refused():
    model = tiny_next_model(SETTINGS["budget"])
    batch = make_next_batch([4], [[(56, 56)]], seed=6)
    batch["pixel_values"] = batch["pixel_values"][:, :2]
    with pytest.raises(ValueError, match=r"pixel_values has 2 crops per image but image_sizes .* need \[\d+\]"):
        model(**batch)


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"method": ["rc"]}, TypeError, r"compression method must be a str.*got list \['rc'\]"),
        ({"method": "rc", "text_weight": math.nan}, ValueError, r"text_weight must be a finite number, got nan"),
        ({"method": "rc", "text_weight": math.inf}, ValueError, r"text_weight must be a finite number, got inf"),
        ({"method": "gprune", "temperature": math.nan}, ValueError, r"temperature must be a finite number"),
        ({"method": "gprune", "similarity_threshold": -math.inf}, ValueError, r"similarity_threshold must be a finite"),
        ({"method": "cls_attention", "budget": math.nan}, ValueError, r"budget as a ratio must be in \(0, 1\]"),
        ({"method": "random", "seed": 2**64}, ValueError, r"seed must be in \[0, 18446744073709551615\]"),
        ({"method": "random", "seed": -1}, ValueError, r"seed must be in \[0, "),
    ],
)
def test_bad_settings_fail_in_the_config(settings, error, message):
    with pytest.raises(error, match=message):
        parse_compression(settings)
    with pytest.raises(error, match=message):
        LlavaRCConfig(**tiny_config_dict(compression=settings))


def test_largest_seed_and_numpy_numbers_are_valid():
    assert parse_compression({"method": "random", "seed": 2**64 - 1}).seed == 2**64 - 1
    settings = parse_compression({"method": "cls_attention", "budget": np.int64(7)})
    assert settings.budget == 7 and type(settings.budget) is int
    ratio = parse_compression({"method": "cls_attention", "budget": np.float32(0.5)})
    assert ratio.budget == 0.5 and type(ratio.budget) is float
    model = tiny_rc_model(SETTINGS["budget"])
    out = model(**make_batch([4], [1]), compression={"budget": np.int64(3)})
    assert out.compression.kept_counts.tolist() == [3]


def test_processor_rejects_a_guidance_text_of_the_wrong_type():
    from llava_rc import LlavaRCProcessor
    from transformers import CLIPTokenizerFast  # noqa: F401  (the guidance tokenizer's usual class)

    from tiny import random_image, tiny_processor, tiny_tokenizer

    base = tiny_processor()
    processor = LlavaRCProcessor(
        image_processor=base.image_processor, tokenizer=base.tokenizer, guidance_tokenizer=tiny_tokenizer(),
        patch_size=base.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    with pytest.raises(TypeError, match=r"guidance_text must be a str or a list of str .* got 5"):
        processor(images=[random_image(0)], text=["USER: <image> what color ? ASSISTANT:"], guidance_text=5)


def test_per_call_settings_update_the_config_of_the_same_method():
    model = tiny_rc_model({"method": "cls_attention", "budget": 5, "cls_attention_layer": 0})
    batch = make_batch([4], [1], seed=7)
    assert model.compression_settings({"budget": 3}).to_dict() == {
        **model.config.compression, "budget": 3
    }
    assert model(**batch, compression={"budget": 3}).compression.kept_counts.tolist() == [3]
    # Naming another method starts from that method's defaults, not the config's settings.
    assert model.compression_settings({"method": "gprune"}) == parse_compression({"method": "gprune"})
    # Naming the config's own method keeps its other settings (the shipped model's "clip" guidance stays).
    shipped = {"method": "rc", "guidance": "clip", "text_weight": 50.0}
    assert update_compression(shipped, {"method": "rc"}).guidance == "clip"
    assert update_compression(shipped, {"budget": 16}) == parse_compression({**shipped, "budget": 16})
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['budget'\] for compression method 'none'"):
        update_compression({"method": "none"}, {"budget": 16})


def test_report_codes_padding_and_synthetic_tokens_apart():
    model = tiny_rc_model(SETTINGS["adaptive"])
    report = model(**make_batch([5, 5, 5], [1, 1, 1], seed=1)).compression
    counts = report.kept_counts.tolist()
    assert len(set(counts)) > 1
    for image, count in enumerate(counts):
        sources = report.source_index[image]
        assert (sources[count:] == PADDING_SOURCE).all()
        extra = sources[:count] == SYNTHETIC_SOURCE
        # Exactly RC's extra token (when there are merge centres), and it absorbs patches.
        assert int(extra.sum()) <= 1 and (report.absorbed[image, :count][extra].any(-1)).all()
        assert ((sources[:count] >= 0) | extra).all()


def test_with_llava_rc_imported_the_package_serves_config_model_and_processor(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    import llava_rc
    from tiny import tiny_processor, tiny_tokenizer

    model = tiny_rc_model(SETTINGS["budget"])
    model.save_pretrained(tmp_path)
    base = tiny_processor()
    llava_rc.LlavaRCProcessor(
        image_processor=base.image_processor, tokenizer=base.tokenizer, guidance_tokenizer=tiny_tokenizer(),
        patch_size=base.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=base.chat_template,
    ).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)) is llava_rc.LlavaRCConfig
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is llava_rc.LlavaRCForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)) is llava_rc.LlavaRCProcessor


def test_stock_twin_still_matches_with_none():
    """Compression off stays the stock call, through every contract change above."""
    model = tiny_rc_model(SETTINGS["none"])
    batch = make_batch([4, 7], [1, 1], seed=2)
    assert torch.equal(model(**batch).logits, stock_twin(model)(**batch).logits)
    assert NUM_PATCHES == 16
