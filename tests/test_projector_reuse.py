"""With "llm" guidance the projector already ran on every patch: a selection plan gathers from that projection.

A method that keeps patches by their text scores is registered twice for the test: once returning a selection plan
(the gather path) and once returning the same decision as a one-hot merge plan (the projector runs on the kept
features, which is what happened for selections before). Both must give the same embeddings, and the selection must
run the projector once (on all patches, for the scores) instead of twice.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from llava_rc import compression_registry
from llava_rc.compression_common import CompressionInputs, MethodConfig, TokenPlan, plan_from_mask, resolve_budget
from llava_rc.compression_common import select_plan
from tiny import make_batch, tiny_rc_model
from tiny_next import make_next_batch, tiny_next_model


@dataclass(frozen=True)
class TextSelectionConfig(MethodConfig):
    """budget: tokens per image by text score, or None = the patches scoring above the image's mean (adaptive)."""

    method = "test_text_selection"
    guidance: str = "llm"
    budget: int | None = 5


@dataclass(frozen=True)
class TextMergeConfig(TextSelectionConfig):
    method = "test_text_merge"


def text_selection(inputs: CompressionInputs, config: TextSelectionConfig) -> TokenPlan:
    scores = inputs.text_scores  # (I, N)
    if config.budget is None:
        return plan_from_mask(scores > scores.mean(dim=-1, keepdim=True))
    return select_plan(scores, resolve_budget(config.budget, inputs.num_patches))


def text_merge(inputs: CompressionInputs, config: TextMergeConfig) -> TokenPlan:
    """The same decision as ``text_selection``, written as one-hot merge weights."""
    plan = text_selection(inputs, config)
    one_hot = nn.functional.one_hot(plan.source_index.clamp(min=0), inputs.num_patches).float()  # (I, K, N)
    weights = one_hot * (plan.source_index >= 0).unsqueeze(-1)
    return TokenPlan(source_index=plan.source_index, counts=plan.counts, merge_weights=weights)


class CountingProjector(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, features):
        self.calls += 1
        return self.inner(features)


def llava_case():
    return tiny_rc_model({"method": "none"}), make_batch([6, 11, 3], [1, 2, 0], seed=5)


def next_case():
    image_sizes = [[(56, 56)], [(20, 56), (60, 30)], []]
    return tiny_next_model({"method": "none"}), make_next_batch([6, 11, 3], image_sizes, seed=5)


@pytest.mark.parametrize("budget", [5, None], ids=["budget", "adaptive"])
@pytest.mark.parametrize("case", [llava_case, next_case], ids=["llava", "next"])
def test_a_selection_gathers_the_guidance_projection(case, budget, monkeypatch):
    monkeypatch.setitem(compression_registry.METHODS, TextSelectionConfig.method, (TextSelectionConfig, text_selection))
    monkeypatch.setitem(compression_registry.METHODS, TextMergeConfig.method, (TextMergeConfig, text_merge))
    model, batch = case()
    projector = CountingProjector(model.model.multi_modal_projector)
    model.model.multi_modal_projector = projector
    results = {}
    with torch.no_grad():
        for config in (TextSelectionConfig(budget=budget), TextMergeConfig(budget=budget)):
            projector.calls = 0
            results[config.method] = model.compress_inputs(
                batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"], settings=config,
                pad_left=True, image_sizes=batch.get("image_sizes"),
            ), projector.calls
    (selection, selection_calls), (merge, merge_calls) = results.values()
    assert selection_calls == 1 and merge_calls > 1  # merges: once for the scores, then once per layout group
    assert torch.equal(selection.packed.input_ids, merge.packed.input_ids)
    assert torch.equal(selection.report.source_index, merge.report.source_index)
    is_image = selection.packed.image_slot >= 0
    assert is_image.any()
    torch.testing.assert_close(selection.inputs_embeds, merge.inputs_embeds, rtol=1e-6, atol=1e-6)
    if budget is None:  # adaptive counts differ between images: padding rows exist and are never read
        assert len(set(selection.report.kept_counts.tolist())) > 1
