"""Bad input fails with a ValueError that names the bad value and what was expected."""

import pytest
import torch

from llava_rc import LlavaRCConfig, parse_compression
from tiny import IMAGE_TOKEN_ID, make_batch, tiny_config_dict, tiny_rc_model


@pytest.fixture(scope="module")
def model():
    return tiny_rc_model({"method": "cls_attention", "budget": 4})


def test_image_tokens_must_match_the_images(model):
    batch = make_batch([4, 6], [1, 1])
    batch["pixel_values"] = batch["pixel_values"][:1]
    with pytest.raises(ValueError, match=r"input_ids has 32 image tokens but pixel_values holds 1 image"):
        model.generate(**batch, max_new_tokens=2)


def test_truncated_image_run_is_rejected(model):
    batch = make_batch([4], [1])
    first_image = (batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0, 0]
    batch["input_ids"][0, first_image] = 5
    with pytest.raises(ValueError, match=r"15 image tokens .* \(expected 16 image tokens\)"):
        model(**batch)


def test_pixel_values_without_image_tokens(model):
    batch = make_batch([6], [0])
    batch["pixel_values"] = torch.randn(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"no image token \(id 3\)"):
        model.generate(**batch, max_new_tokens=2)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "cls_attention", "budget": 0}, r"budget as a token count must be >= 1, got 0"),
        ({"method": "cls_attention", "budget": 1.5}, r"budget as a ratio must be in \(0, 1\], got 1.5"),
        ({"method": "cls_attention", "budget": "all"}, r"budget must be an int .* got 'all'"),
        (
            {"method": "cls_attention", "keep": 3},
            r"unknown setting\(s\) \['keep'\] .* allowed: \['attention_layer', 'budget'",
        ),
        ({"method": "tome"}, r"unknown compression method 'tome'; expected one of \[.*'cls_attention'"),
        (["cls_attention"], r"compression must be a dict .* or a method name"),
    ],
)
def test_bad_settings(settings, message, model):
    with pytest.raises(ValueError, match=message):
        parse_compression(settings)
    with pytest.raises(ValueError, match=message):
        LlavaRCConfig(**tiny_config_dict(compression=settings))
    with pytest.raises(ValueError, match=message):
        model.generate(**make_batch([4], [1]), compression=settings, max_new_tokens=2)


def test_cls_attention_layer_out_of_range(model):
    with pytest.raises(ValueError, match=r"cls_attention_layer=7 is out of range .* 2 layers"):
        model(**make_batch([4], [1]), compression={"method": "cls_attention", "budget": 3, "cls_attention_layer": 7})


def test_multi_layer_features_are_rejected_with_compression():
    model = tiny_rc_model({"method": "cls_attention", "budget": 3}, vision_feature_layer=[-2, -1])
    with pytest.raises(ValueError, match=r"single vision_feature_layer .* got \[-2, -1\]"):
        model(**make_batch([4], [1]))
