"""TRSM: the text prompt retrieves the visual tokens to keep (arXiv 2410.07278; v1 "TRSM", v2 "PAR").

The paper has no public code and its method is only described in prose; this follows it and adds nothing by
default. Where each step comes from (paraphrased):
1. Score every patch by its similarity to the question, ``inputs.text_scores`` (cosine in [-1, 1], computed by
   the model in the space chosen by ``guidance``: the LLM's embeddings or CLIP's text tower). v1's abstract: the
   text prompt serves as a query vector that retrieves the most similar vectors of the visual prompt; v2's
   abstract: external redundancy is removed by semantic retrieval.
2. Keep the top ``budget`` patches (exactly ``resolve_budget(budget, N)`` per image), in raster order; the
   discarded patches are dropped. v1 reports compressing the visual tokens by 20%; v2 reports a compression ratio
   of 89% (keeping 11%), so "by 20%" reads as removing 20%, i.e. the default ``budget=0.8`` keeps 80%.

Not reproduced, because the paper does not pin them down: v1's abstract says the retrieved visual vectors are
merged *with the text tokens*, without saying how (a concatenation is what every LLaVA prompt already does, so
nothing is added for it); v2 adds a token-routing step that clusters the retained set to remove internal
redundancy, with no rule we could reconstruct from the text available to us (its abstracts only), so it is not
offered as an option.

Variant (ours, off by default): ``merge="nearest"`` merges every discarded patch into the kept patch it is most
similar to (cosine of ``inputs.features``; ties to the lower patch index), each output token being the uniform
mean of its kept patch and the patches merged into it. Neither version of the paper describes this step.

Images without a question (``has_text`` False, or no ``text_scores`` at all) are ranked vision-only by the L2 norm
of their features: in ViT features, high-norm patches carry much of the global information (Darcet et al.,
"Vision Transformers Need Registers", arXiv 2309.16588). This fallback is ours; the paper always has a prompt.
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_choice, resolve_budget, select_plan
from .compression_common import GUIDANCE_CHOICES, validate_budget

MERGES = ("none", "nearest")


@dataclass(frozen=True)
class TrsmConfig(MethodConfig):
    """Settings of ``"trsm"``.

    budget: tokens kept per image, an int count or a float ratio of the patches (0.8: the paper's 20% reduction).
    guidance: where the question is embedded to score the patches: ``"auto"`` (``"clip"`` where the model has
        CLIP's text tower, else None with a warning), ``"clip"`` (CLIP's text tower), ``"llm"`` (the language model's
        input embeddings; measured not to aim at the question: docs/methods.md) or None (no question: every patch
        ranked by its feature norm, the fallback below).
    merge: ``"none"`` (the paper: discarded patches are dropped) or ``"nearest"`` (our variant: each discarded
        patch joins its most similar kept patch, uniform mean per token).
    """

    method = "trsm"
    needs_attention = False

    budget: int | float = 0.8
    guidance: str | None = "auto"
    merge: str = "none"

    def __post_init__(self):
        validate_budget(self.budget, allow_none=False)
        if self.guidance is not None:
            check_choice("guidance (or None for the vision-only ranking)", self.guidance, GUIDANCE_CHOICES)
        check_choice("merge", self.merge, MERGES)


@torch.no_grad()
def compress_trsm(inputs: CompressionInputs, config: TrsmConfig) -> TokenPlan:
    """Plan keeping the top-``budget`` patches by text similarity (``merge="nearest"``: the others merged in).

    inputs.features: (I, N, C); inputs.text_scores: (I, N) or None; inputs.has_text: (I,) bool or None (None with
    text scores present means every image has a question).
    Returns a plan with K = resolve_budget(budget, N) tokens per image in raster order: a selection plan, or with
    ``merge="nearest"`` merge_weights (I, K, N) holding 1 / cluster size over each token's cluster.
    """
    features = inputs.features.float()  # (I, N, C)
    ranking = features.norm(dim=-1)  # (I, N): the vision-only fallback
    if inputs.text_scores is not None:
        has_text = inputs.has_text if inputs.has_text is not None else torch.ones_like(ranking[:, 0], dtype=torch.bool)
        ranking = torch.where(has_text.unsqueeze(-1), inputs.text_scores.float(), ranking)
    keep = resolve_budget(config.budget, inputs.num_patches)
    plan = select_plan(ranking, keep)
    if config.merge == "none":
        return plan

    kept = torch.zeros_like(ranking, dtype=torch.bool).scatter(1, plan.source_index, True)  # (I, N)
    units = torch.nn.functional.normalize(features, dim=-1)  # (I, N, C)
    kept_units = units.gather(1, plan.source_index.unsqueeze(-1).expand(-1, -1, units.shape[-1]))  # (I, K, C)
    similarity = units @ kept_units.transpose(1, 2)  # (I, N, K): every patch x kept patches, no N x N
    # argmax returns the first maximum; the kept patches are in raster order, so ties go to the lower patch index.
    nearest = similarity.argmax(dim=-1)  # (I, N) slot of the nearest kept patch
    slots = torch.arange(keep, device=features.device)  # (K,)
    patches = torch.arange(inputs.num_patches, device=features.device)  # (N,)
    own_slot = (plan.source_index.unsqueeze(-1) == patches).float().argmax(dim=1)  # (I, N) slot of a kept patch
    anchor_slot = torch.where(kept, own_slot, nearest)  # (I, N) kept patches stay their own anchor
    clusters = anchor_slot.unsqueeze(1) == slots.view(1, -1, 1)  # (I, K, N)
    merge_weights = clusters.float() / clusters.sum(dim=-1, keepdim=True)  # (I, K, N)
    return TokenPlan(source_index=plan.source_index, counts=plan.counts, merge_weights=merge_weights)
