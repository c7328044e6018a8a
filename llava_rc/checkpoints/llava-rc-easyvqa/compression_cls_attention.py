"""Keep the patches the vision encoder's [CLS] attends to most (FasterVLM, arXiv 2412.01818).

Steps: recompute the [CLS] attention at the attention layer (softmax per head, mean over heads) from the stored
hidden states, then keep the top ``budget`` patches of each image in raster order. No merging.
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, cls_attention, resolve_budget, select_plan
from .compression_common import check_range, validate_budget


@dataclass(frozen=True)
class ClsAttentionConfig(MethodConfig):
    """Settings of ``"cls_attention"``.

    budget: tokens kept per image, an int count or a float ratio of the patches.
    cls_attention_layer: vision layer whose [CLS] attention ranks the patches; None = the layer that reads the
        feature layer's output (for LLaVA's feature layer -2, the last layer).
    """

    method = "cls_attention"
    needs_attention = True

    budget: int | float = 0.25
    cls_attention_layer: int | None = None

    def __post_init__(self):
        validate_budget(self.budget, allow_none=False)
        if self.cls_attention_layer is not None:
            check_range("cls_attention_layer", self.cls_attention_layer, integer=True)


@torch.no_grad()
def compress_cls_attention(inputs: CompressionInputs, config: ClsAttentionConfig) -> TokenPlan:
    """Plan keeping the top-``budget`` patches by [CLS] attention.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A).
    Returns a selection plan with K = resolve_budget(budget, N) tokens per image, in raster order.
    """
    attention = cls_attention(inputs, per_head=True)  # (I, N)
    keep = resolve_budget(config.budget, inputs.num_patches)
    return select_plan(attention, keep)
