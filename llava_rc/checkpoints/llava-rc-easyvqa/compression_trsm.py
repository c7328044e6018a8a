"""TRSM: the text prompt retrieves the visual tokens to keep, the rest merge into them (arXiv 2410.07278, v1).

The paper has no public code; this is a reconstruction from its description. Steps:
1. Rank the patches by their similarity to the question, ``inputs.text_scores`` (cosine in [-1, 1], computed by the
   model in the space chosen by ``guidance``: the LLM's embeddings or CLIP's text tower).
2. Keep the top ``budget`` patches (exactly ``resolve_budget(budget, N)`` per image), in raster order.
3. Every other patch merges into the kept patch it is most similar to (cosine of ``inputs.features``, the vision
   features being compressed; ties go to the lower patch index). Token similarity uses the features rather than
   the attention keys so that the method needs no attention pass.
4. Each output token is the uniform mean of its kept patch and the patches merged into it; every patch counts in
   exactly one output token.

Images without a question (``has_text`` False, or no ``text_scores`` at all) are ranked vision-only by the L2 norm
of their features: in ViT features, high-norm patches carry much of the global information (Darcet et al.,
"Vision Transformers Need Registers", arXiv 2309.16588).

Default budget 0.8: v1 "compresses visual tokens by 20%". The same authors' v2 reports "89% compression" for
keeping 11% of the tokens, so "by 20%" reads as removing 20%, i.e. keeping 80%. Set ``budget`` lower to compare
with other methods at equal token counts.
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_choice, resolve_budget, select_plan
from .compression_common import validate_budget

GUIDANCE_SOURCES = ("llm", "clip")


@dataclass(frozen=True)
class TrsmConfig(MethodConfig):
    """Settings of ``"trsm"``.

    budget: tokens kept per image, an int count or a float ratio of the patches (0.8: the paper's 20% reduction).
    guidance: where the question is embedded to score the patches: ``"llm"`` (the language model's input
        embeddings) or ``"clip"`` (CLIP's text tower).
    """

    method = "trsm"
    needs_attention = False

    budget: int | float = 0.8
    guidance: str = "llm"

    def __post_init__(self):
        validate_budget(self.budget, allow_none=False)
        check_choice("guidance", self.guidance, GUIDANCE_SOURCES)


@torch.no_grad()
def compress_trsm(inputs: CompressionInputs, config: TrsmConfig) -> TokenPlan:
    """Plan keeping the top-``budget`` patches by text similarity, the others merged into their nearest kept patch.

    inputs.features: (I, N, C); inputs.text_scores: (I, N) or None; inputs.has_text: (I,) bool or None (None with
    text scores present means every image has a question).
    Returns a merging plan with K = resolve_budget(budget, N) tokens per image in raster order and merge_weights
    (I, K, N) holding 1 / cluster size over each token's cluster.
    """
    features = inputs.features.float()  # (I, N, C)
    ranking = features.norm(dim=-1)  # (I, N): the vision-only fallback
    if inputs.text_scores is not None:
        has_text = inputs.has_text if inputs.has_text is not None else torch.ones_like(ranking[:, 0], dtype=torch.bool)
        ranking = torch.where(has_text.unsqueeze(-1), inputs.text_scores.float(), ranking)
    keep = resolve_budget(config.budget, inputs.num_patches)
    plan = select_plan(ranking, keep)
    kept = torch.zeros_like(ranking, dtype=torch.bool).scatter(1, plan.source_index, True)  # (I, N)

    units = torch.nn.functional.normalize(features, dim=-1)  # (I, N, C)
    similarity = (units @ units.transpose(1, 2)).masked_fill(~kept.unsqueeze(1), float("-inf"))  # (I, N, N)
    # argmax returns the first maximum, so ties go to the lower patch index; kept patches stay their own anchor.
    positions = torch.arange(inputs.num_patches, device=features.device)  # (N,)
    anchor = torch.where(kept, positions, similarity.argmax(dim=-1))  # (I, N)
    clusters = anchor.unsqueeze(1) == plan.source_index.unsqueeze(-1)  # (I, K, N)
    merge_weights = clusters.float() / clusters.sum(dim=-1, keepdim=True)  # (I, K, N)
    return TokenPlan(source_index=plan.source_index, counts=plan.counts, merge_weights=merge_weights)
