"""The family seam (docs/design.md): the planning and the transformers plumbing are one implementation; a family only
answers hooks and restates its stock ``forward`` signature."""

import inspect

import pytest

from llava_rc import (
    LlavaNextRCForConditionalGeneration,
    LlavaOnevisionRCForConditionalGeneration,
    LlavaRCForConditionalGeneration,
    Qwen2_5_VLRCForConditionalGeneration,
    Qwen3VLRCForConditionalGeneration,
)
from llava_rc.compressed_generation import CompressedGenerationMixin
from llava_rc.planning import CompressionPlanner

FAMILIES = [
    LlavaRCForConditionalGeneration,
    LlavaNextRCForConditionalGeneration,
    LlavaOnevisionRCForConditionalGeneration,
    Qwen2_5_VLRCForConditionalGeneration,
    Qwen3VLRCForConditionalGeneration,
]
SHARED = (CompressedGenerationMixin, CompressionPlanner)
# What every family must leave to the shared modules, and the hooks it must answer itself.
SHARED_METHODS = ("compress_inputs", "_plan_images", "_compress_group", "_compressed_forward", "generate")
FAMILY_HOOKS = ("_encode_images", "_crop_signals", "_guidance_patches", "forward")


def owner(model_class, name: str) -> type:
    return next(klass for klass in model_class.__mro__ if name in vars(klass))


@pytest.mark.parametrize("model_class", FAMILIES, ids=lambda model_class: model_class.__name__)
def test_a_family_answers_the_hooks_and_overrides_no_shared_method(model_class):
    for name in SHARED_METHODS:
        assert owner(model_class, name) in SHARED, f"{model_class.__name__}.{name} is overridden by " \
            f"{owner(model_class, name).__name__}; the shared one must serve every family"
    for name in FAMILY_HOOKS:
        assert owner(model_class, name) not in SHARED and owner(model_class, name).__module__.startswith("llava_rc"), \
            f"{model_class.__name__} does not answer {name}"


@pytest.mark.parametrize("model_class", FAMILIES, ids=lambda model_class: model_class.__name__)
def test_the_input_names_a_family_declares_are_its_forward_arguments(model_class):
    """The plumbing sorts the caller's arguments by these names: a name forward() does not take (a typo) would leave
    that input out of the pre-pass or the refusals without an error."""
    ours = set(inspect.signature(model_class.forward).parameters)
    declared = {*model_class._image_inputs, *model_class._video_inputs, *model_class._embedding_inputs}
    assert declared <= ours, sorted(declared - ours)
    assert set(model_class._continuation_inputs) <= ours | {"pixel_values"}
    assert {"compression", "guidance_mask", "guidance_input_ids", "guidance_attention_mask"} <= ours
