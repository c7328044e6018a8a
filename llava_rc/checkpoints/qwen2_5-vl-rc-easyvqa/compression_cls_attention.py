"""Keep the patches the vision encoder's [CLS] attends to most (FasterVLM, arXiv 2412.01818).

Steps, as FasterVLM's released code does them:
1. [CLS] attention of the layer that PRODUCES the feature layer (``attention_layer="producing"``: FasterVLM reads
   the encoder's ``attentions[select_layer]``, layer 22 for LLaVA-1.5's feature layer -2), recomputed from the
   stored hidden states: softmax per head, mean over heads. ``attention_layer="consuming"`` reads the layer that
   reads the feature layer instead (layer 23 for -2; our earlier default, kept as an option); an explicit
   ``cls_attention_layer`` overrides both. For the final layer's features (-1) both name the last layer; for the
   embedding output (0) there is no producing layer and the first layer is read.
2. Keep the top ``budget`` patches in raster order. No merging.

LLaVA-NeXT (anyres): FasterVLM keeps the same count in every crop. The N tokens of an image reach a method as
views (``inputs.views``: the base view, then the unpadded high-resolution grid, which joins the high-resolution
crops and drops their padding), so a per-crop count cannot be expressed on them; with
``budget_scope="view"`` (default) each view keeps its share and is ranked on its own: a ratio keeps
``resolve_budget(ratio, n_v)`` of view v (the released per-crop rule, as far as the views express it), an int
count is split over the views in proportion to their sizes (``compression_gprune.split_budget``).
``budget_scope="image"`` ranks all the image's tokens together (our earlier behaviour). Single-view images: the
two are the same.
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_choice, check_range, cls_attention
from .compression_common import plan_from_mask, resolve_budget, select_mask, select_plan, validate_budget
from .compression_gprune import split_budget

ATTENTION_LAYERS = ("producing", "consuming")
BUDGET_SCOPES = ("view", "image")


@dataclass(frozen=True)
class ClsAttentionConfig(MethodConfig):
    """Settings of ``"cls_attention"``.

    budget: tokens kept per image, an int count or a float ratio of the patches.
    attention_layer: which layer's [CLS] attention ranks the patches when ``cls_attention_layer`` is None:
        ``"producing"`` (the layer whose output is the feature layer, as FasterVLM) or ``"consuming"`` (the layer
        that reads it).
    budget_scope: ``"view"`` (each view of a multi-view image keeps its share, ranked on its own; FasterVLM's
        per-crop budget) or ``"image"`` (one ranking over the whole image).
    cls_attention_layer: an explicit vision layer index, overriding ``attention_layer``.
    """

    method = "cls_attention"
    needs_attention = True

    budget: int | float = 0.25
    attention_layer: str = "producing"
    budget_scope: str = "view"
    cls_attention_layer: int | None = None

    def __post_init__(self):
        validate_budget(self.budget, allow_none=False)
        check_choice("attention_layer", self.attention_layer, ATTENTION_LAYERS)
        check_choice("budget_scope", self.budget_scope, BUDGET_SCOPES)
        if self.cls_attention_layer is not None:
            check_range("cls_attention_layer", self.cls_attention_layer, integer=True)

    def fixed_count(self, views: tuple[tuple[int, int], ...]) -> int:
        """Always fixed: the sum of the per-view counts (``budget_scope="view"``) or the image's budget."""
        sizes = [rows * cols for rows, cols in views]
        if self.budget_scope == "view":
            return sum(split_budget(self.budget, sizes))
        return resolve_budget(self.budget, sum(sizes))


@torch.no_grad()
def compress_cls_attention(inputs: CompressionInputs, config: ClsAttentionConfig) -> TokenPlan:
    """Plan keeping the top-``budget`` patches by [CLS] attention.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A) (or the precomputed
    ``attention_per_head`` of multi-crop images); inputs.views for several views.
    Returns a selection plan with K = ``config.fixed_count(views)`` tokens per image, in raster order.
    """
    attention = cls_attention(inputs, per_head=True)  # (I, N)
    if inputs.views is None or config.budget_scope == "image":
        return select_plan(attention, resolve_budget(config.budget, inputs.num_patches))
    sizes = [rows * cols for rows, cols in inputs.views]
    if sum(sizes) != inputs.num_patches:
        raise ValueError(f"cls_attention: views {inputs.views} hold {sum(sizes)} tokens, the features "
                         f"{inputs.num_patches}")
    counts = split_budget(config.budget, sizes)
    # One ranking per view (a short loop over the views, two on LLaVA-NeXT).
    chosen = [select_mask(view, count) for view, count in zip(attention.split(sizes, dim=1), counts)]  # (I, n_v)
    return plan_from_mask(torch.cat(chosen, dim=1), sum(counts))
