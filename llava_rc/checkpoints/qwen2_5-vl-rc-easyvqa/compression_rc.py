"""Recoverable Compression (RC, arXiv 2409.01179): keep, recover, merge.

For each image, with ``a`` the [CLS] attention to the N patches (one softmax over [CLS] + patches with all heads
concatenated, as the released code computes it) and ``s`` the text scores (cosine of each patch to the question,
divided by sqrt(``text_scale_dim``), by default sqrt(guidance_dim): see "Text scale" below); ``LOF_k(v)`` counts
the values of ``v`` that the Local Outlier Factor with ``k`` neighbours flags (``compression_lof``), and
``r = LOF_k(v) / len(v)`` is RC's dynamic ratio:

1. Visual keep: ``n_v = floor(N * r(a; lof_neighbors_visual))`` = ``LOF(a)``; ``I_v`` = the top ``n_v`` by ``a``.
2. Recovery: set ``s`` on ``I_v`` to ``min(s)``, then ``n_t = floor((N - n_v) * r(s; lof_neighbors_text))``, the
   ratio taken over all N values of the replaced ``s`` (the released code replaces, then runs LOF on the whole
   vector); ``I_t`` = the top ``n_t`` by ``s`` among the patches outside ``I_v``. No recovery (``n_t = 0``) where
   the prompt has no question or no text scores are given (``guidance=None``).
3. Kept tokens ``I_v | I_t`` in raster order.
4. Merge: of the remaining patches R, ``n_c = floor(|R| * r(a_R; lof_neighbors_merge))`` with the highest ``a``
   become cluster centres. Each centre absorbs its ``merge_neighbors`` best candidates by
   ``cosine(key_centre, key_m) + text_weight * s_m`` (text term 0 without text; all of them when fewer exist):
   ``x_centre + sum_m a_m x_m``, unnormalised as released. A centre's candidates are the other remaining patches,
   other centres included, as released (``centre_candidates="released"``), or only the non-centre ones
   (``"non_centres"``). Candidates are chosen independently per centre (an independent top-k per centre in the
   released code too), so one patch may feed several centres.
5. One extra token ``sum_m a_m x_m`` over all non-centre remaining patches; dropped with R when ``n_c = 0``.
6. At least one token per image: when steps 1-4 choose nothing (no LOF outlier anywhere: flat attention, very few
   patches), the top patch by ``a`` is kept alone (no recovery, centres or extra token).

Output per image: [kept (raster order); centres (descending ``a``); extra token]; ties in every ranking go to the
lower patch index. Floors are taken in exact integer arithmetic (``floor(N * count / N) == count``).

Fixed budget (``budget`` not None; the paper's RC is adaptive, so how a budget is shared is this project's design):
exactly ``B = resolve_budget(budget, N)`` tokens per image. The adaptive counts ``n_v, n_t, n_c`` are computed as
above; then
- ``B == N``: all patches are kept; ``B == 1``: the top patch by ``a`` alone;
- otherwise one slot is reserved for the extra token and the other ``S = B - 1`` are shared by ``recovered_share``:
  - None: in the proportions of the adaptive plan: centres ``floor(S * n_c / D)``, recovered ``floor(S * n_t / D)``
    and visual tokens the rest, ``D = n_v + n_t + n_c`` (``D == 0``: all visual). At small budgets this starves
    the recovery (on the shipped model's mosaics ~32 : 11 : 4, so 14 tokens give ~2.6 recovered ones);
  - a share ``f`` in [0, 1]: ``R = floor(S * f)`` slots are reserved for recovered tokens in every image that has
    a question and text scores (none otherwise). ``recovered_fill`` says what happens when LOF recovered fewer
    (``n_t < R``): ``"text"`` fills them with the next most text-similar patches outside the visual set (the
    recovery ranking read further), ``"visual"`` recovers only ``n_t`` and hands the other slots back. The slots
    left, ``S - recovered``, go to centres ``floor((S - recovered) * n_c / (n_v + n_c))`` and visual tokens (the
    rest).
  Without text (``guidance=None``, no question) every rule gives the same split (``n_t = 0``, nothing reserved).
  The sets are then chosen with these counts by the rankings of steps 1-4, so visual tokens beyond ``n_v`` are the
  next by ``a`` and a trim drops the lowest-ranked first. At least two patches always remain for the extra token,
  so none is lost.

Text scale. The released code divides the text cosine by a hard-coded sqrt(768), the width of the CLIP embedding
its ``"clip"`` guidance compares. We divide by sqrt(``text_scale_dim``), by default the guidance width
(``guidance_dim``), so the released rule holds for any tower. The effective weight of the cosine in a centre's
candidate score is ``text_weight / sqrt(dim)``: for LLaVA-1.5 with ``"clip"`` (768 wide) 50 / 27.7 = 1.80, the
released balance exactly; with ``"llm"`` (our option, not in the release; 4096 wide for 7B) 50 / 64 = 0.78, 2.3x
less weight on the text. Decision: the default stays ``guidance_dim``. We read the constant as the width of the
embedding the release compares (it equals it in the only released setting, which this default reproduces
exactly); ``"llm"`` guidance has no released counterpart, and the shipped model was trained with this default.
``text_scale_dim=768`` reproduces the released constant for ``"llm"`` or any other tower. The scale does not change
which tokens are recovered (LOF and the ranking are scale-free), only the merge.

Where we deviate from the released code (bugs fixed):
- the number of centres is taken from the remaining tokens |R|, not from the feature (channel) dimension;
- keys of the remaining tokens are gathered with their patch indices, not R-relative indices into the full keys;
- an image whose plan would be empty keeps its top patch (step 6) instead of vanishing from the prompt;
- LOF and the merge run on the device, vectorised (torch LOF in O(N log N + N k) instead of sklearn on the CPU;
  centre x patch similarities for all centres at once instead of a per-centre loop);
- any batch size (counts differ per image; padded to the largest count), not batch size 1 only.
Released behaviour kept as the default (the project's rule: where authors released code, the default is the
released behaviour), with our alternative as an option:
- ``centre_candidates="released"`` (default): a centre's candidates include the other centres, so a centre's vector
  may also be added into another centre. ``"non_centres"`` (the behaviour before this option existed) takes each
  centre's candidates from the non-centre remaining patches only, so no patch is both an output token of its own
  and part of another. Kept counts and sets are the same either way; merged vectors differ (about 1e-2 relative at
  576 patches, up to about 30% at 16).
"""

import math
from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_choice, check_range
from .compression_common import cls_attention, resolve_budget, stable_descending_order, stable_topk_indices
from .compression_common import GUIDANCE_CHOICES, validate_budget
from .compression_lof import lof_outlier_count

RECOVERED_FILLS = ("text", "visual")
# Default share of a budget's slots reserved for recovered tokens: the best mean accuracy at 10% and 5% of the
# patches on training-split mosaics (never the test set) with the shipped model (benchmarks/rc_budget_share.py,
# docs/rc.md, "Fixed budget").
RECOVERED_SHARE = 0.9


@dataclass(frozen=True)
class RCConfig(MethodConfig):
    """Settings of ``"rc"``.

    guidance: source of the text-patch scores: ``"auto"`` (``"clip"`` where the model has CLIP's text tower, else
        None with a warning), ``"clip"`` (the CLIP text tower vs the CLIP visual projection, as released), ``"llm"``
        (the LLM's input embedding of the question; our option, measured not to aim at the question: docs/methods.md)
        or None (vision-only: no recovery, no text term).
    lof_neighbors_visual: LOF neighbours for the visual keep ratio over the [CLS] attention (paper: 20).
    lof_neighbors_text: LOF neighbours for the recovery ratio over the text scores (paper: 20).
    lof_neighbors_merge: LOF neighbours for the number of cluster centres among the remaining tokens (paper: 10).
    merge_neighbors: remaining tokens each cluster centre absorbs (paper: 32).
    text_weight: weight of the text score next to the key cosine when a centre picks its tokens (released: 50).
    text_scale_dim: the text cosine is divided by sqrt(text_scale_dim); None = the guidance width (released rule;
        768, the released constant, for LLaVA-1.5 with ``"clip"``). Set 768 to reproduce the release's balance
        with ``"llm"`` guidance (module docstring, "Text scale").
    centre_candidates: ``"released"`` (a centre's merge candidates are all other remaining patches, other centres
        included, as released) or ``"non_centres"`` (only the remaining patches that are not centres).
    cls_attention_layer: vision layer whose [CLS] attention is read; None = the layer that reads the feature
        layer's output (for LLaVA's feature layer -2, the last layer, as released).
    budget: None = the adaptive count per image (the paper); an int count or a float ratio of the patches =
        exactly ``resolve_budget(budget, N)`` tokens per image (split described in the module docstring).
    recovered_share: with a budget, the share of the ``B - 1`` non-extra slots reserved for text-recovered tokens
        (a number in [0, 1]; default 0.9, chosen on training-split mosaics), or None for the proportions of the
        adaptive plan (the split before this setting existed). Unused without a budget or text.
    recovered_fill: with ``recovered_share``, who fills reserved slots that LOF recovery leaves empty: ``"text"``
        (the next most text-similar patches) or ``"visual"`` (they return to the visual and centre tokens).
    """

    method = "rc"
    stage = "vision"
    needs_attention = True

    guidance: str | None = "auto"
    lof_neighbors_visual: int = 20
    lof_neighbors_text: int = 20
    lof_neighbors_merge: int = 10
    merge_neighbors: int = 32
    text_weight: float = 50.0
    text_scale_dim: int | None = None
    centre_candidates: str = "released"
    cls_attention_layer: int | None = None
    budget: int | float | None = None
    recovered_share: float | None = RECOVERED_SHARE
    recovered_fill: str = "text"

    def __post_init__(self):
        if self.guidance is not None:
            check_choice("guidance (or None for vision-only)", self.guidance, GUIDANCE_CHOICES)
        check_range("lof_neighbors_visual", self.lof_neighbors_visual, 1, None, integer=True)
        check_range("lof_neighbors_text", self.lof_neighbors_text, 1, None, integer=True)
        check_range("lof_neighbors_merge", self.lof_neighbors_merge, 1, None, integer=True)
        check_range("merge_neighbors", self.merge_neighbors, 1, None, integer=True)
        check_range("text_weight", self.text_weight, 0.0, None)
        if self.text_scale_dim is not None:
            check_range("text_scale_dim (or None for the guidance width)", self.text_scale_dim, 1, None, integer=True)
        check_choice("centre_candidates", self.centre_candidates, {"released", "non_centres"})
        if self.cls_attention_layer is not None:
            check_range("cls_attention_layer", self.cls_attention_layer, integer=True)
        validate_budget(self.budget, allow_none=True)
        if self.recovered_share is not None:
            check_range("recovered_share (or None for the adaptive proportions)", self.recovered_share, 0.0, 1.0)
        check_choice("recovered_fill", self.recovered_fill, RECOVERED_FILLS)


def _descending_rank(scores: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(I, N) long: each patch's place among the eligible patches by descending score (ties: lower index first).

    Ineligible patches rank after all eligible ones, so ``rank < count`` selects the top ``count`` eligible.
    """
    return _descending_order_and_rank(scores, eligible)[1]


def _descending_order_and_rank(
    scores: torch.Tensor, eligible: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((I, N) patch at each place, (I, N) place of each patch), as in ``_descending_rank`` (None: all eligible)."""
    if eligible is not None:
        scores = scores.masked_fill(~eligible, float("-inf"))
    order = stable_descending_order(scores)  # (I, N) patch per place
    return order, order.argsort(dim=-1)  # the inverse permutation: place per patch


def _text_guidance(inputs: CompressionInputs, config: RCConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scores (I, N) float32 = cosine / sqrt(text_scale_dim or guidance_dim), has_text (I,) bool), or None."""
    if config.guidance is None or inputs.text_scores is None:
        return None
    scale_dim = config.text_scale_dim if config.text_scale_dim is not None else inputs.guidance_dim
    scores = inputs.text_scores.float() / math.sqrt(scale_dim)  # (I, N)
    has_text = inputs.has_text
    if has_text is None:
        has_text = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores, has_text.to(device=scores.device, dtype=torch.bool)


def _recover(
    text: tuple[torch.Tensor, torch.Tensor] | None, visual: torch.Tensor, recovered_count: torch.Tensor
) -> torch.Tensor:
    """(I, N) bool: the top ``recovered_count`` patches by text score outside ``visual`` (none without text)."""
    if text is None:
        return torch.zeros_like(visual)
    scores, _ = text
    return _descending_rank(scores.masked_fill(visual, float("-inf"))) < recovered_count.unsqueeze(-1)


def _budget_counts(
    budget_tokens: int,
    num_patches: int,
    visual: torch.Tensor,
    recovered: torch.Tensor,
    centres: torch.Tensor,
    recovered_share: float | None = None,
    recovered_fill: str = "text",
    can_recover: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(visual, recovered, centres, extra) counts (I,) summing to ``budget_tokens``, from the adaptive counts (I,)
    shared as ``recovered_share`` / ``recovered_fill`` say (module docstring, "Fixed budget").

    can_recover: (I,) bool, images with a question and text scores (None: none), where ``"text"`` fill reserves
    slots.
    """
    zeros = torch.zeros_like(visual)
    if budget_tokens >= num_patches:
        return torch.full_like(visual, num_patches), zeros, zeros, zeros
    if budget_tokens == 1:
        return torch.ones_like(visual), zeros, zeros, zeros
    slots = budget_tokens - 1  # one slot for the extra token
    if recovered_share is None:
        dynamic_total = (visual + recovered + centres).clamp(min=1)  # (I,)
        budget_centres = slots * centres // dynamic_total
        budget_recovered = slots * recovered // dynamic_total
    else:
        reserved = math.floor(slots * recovered_share)  # exact for the floats a user writes (0.5 * 13 = 6.5)
        if recovered_fill == "visual":
            budget_recovered = recovered.clamp(max=reserved)  # (I,)
        elif can_recover is None:
            budget_recovered = zeros
        else:
            budget_recovered = torch.where(can_recover, reserved, zeros)  # (I,)
        rest = slots - budget_recovered  # (I,)
        budget_centres = rest * centres // (visual + centres).clamp(min=1)
    budget_visual = slots - budget_centres - budget_recovered
    return budget_visual, budget_recovered, budget_centres, torch.ones_like(visual)


@torch.no_grad()
def compress_rc(inputs: CompressionInputs, config: RCConfig) -> TokenPlan:
    """Plan RC's kept, centre and extra tokens for each image.

    inputs.features: (I, N, C) feature-layer patch tokens (stage "vision"); cls_query (I, A); attention_keys
    (I, 1 + N, A); text_scores (I, N) cosine in [-1, 1] or None; has_text (I,) bool or None (all True).
    Returns a sparse merge plan (``TokenPlan``): source_index (I, K) (patch of each kept or centre token, -1 for the
    extra token and padding), counts (I,); members (I, K, 1 + M), M = min(merge_neighbors, N): a kept row its patch
    at weight 1, a centre row 1 at the centre and ``a_m`` at its absorbed patches; extra_weights (I, N) ``a_m`` at
    every non-centre remaining patch, in row ``extra_row`` (kept + centres).
    """
    attention = cls_attention(inputs, per_head=False)  # (I, N) float32
    num_images, num_patches = attention.shape
    device = attention.device
    text = _text_guidance(inputs, config)
    attention_rank = _descending_rank(attention)  # (I, N)

    # 1-2. Visual keep count from the attention's outliers; recovery count from the text scores' outliers.
    visual_count = lof_outlier_count(attention, None, config.lof_neighbors_visual)  # (I,)
    visual = attention_rank < visual_count.unsqueeze(-1)  # (I, N)
    recovered_count = torch.zeros_like(visual_count)
    if text is not None:
        scores, has_text = text
        replaced = torch.where(visual, scores.min(dim=-1, keepdim=True).values, scores)  # (I, N)
        text_outliers = lof_outlier_count(replaced, None, config.lof_neighbors_text)  # (I,)
        recovered_count = ((num_patches - visual_count) * text_outliers // num_patches).where(has_text, 0)
    recovered = _recover(text, visual, recovered_count)  # (I, N)

    # 4. Cluster centres: the attention outliers among the remaining patches.
    centre_count = lof_outlier_count(attention, n_neighbors=config.lof_neighbors_merge, invalid=visual | recovered)
    # 6. At least one token per image: an empty plan keeps the top patch by attention (nothing was recovered).
    visual_count = visual_count + ((visual_count + recovered_count + centre_count) == 0)  # (I,)
    visual = attention_rank < visual_count.unsqueeze(-1)  # (I, N)
    extra_count = centre_count > 0  # (I,) the extra token goes with R when there is no centre
    if config.budget is not None:
        budget_tokens = resolve_budget(config.budget, num_patches)
        can_recover = text[1] if text is not None else None
        visual_count, recovered_count, centre_count, extra_count = _budget_counts(
            budget_tokens, num_patches, visual_count, recovered_count, centre_count,
            config.recovered_share, config.recovered_fill, can_recover,
        )
        visual = attention_rank < visual_count.unsqueeze(-1)
        recovered = _recover(text, visual, recovered_count)
    kept = visual | recovered  # (I, N)
    remaining = ~kept
    centre_order, centre_rank = _descending_order_and_rank(attention, remaining)  # (I, N) each
    centre = centre_rank < centre_count.unsqueeze(-1)  # (I, N)
    absorbed = remaining & ~centre  # (I, N) non-centre remaining patches

    # Output rows: kept in raster order, then centres by descending attention, then the extra token.
    kept_count = kept.sum(dim=-1)  # (I,)
    extra_row = kept_count + centre_count  # (I,)
    counts = extra_row + extra_count  # (I,)
    if config.budget is not None:  # every image has exactly the budget: known on the host, no sync
        max_count = resolve_budget(config.budget, num_patches) if num_images else 0
        # One slot is the extra token's, so B - 1 bounds every centre count (no centres when B is 1 or all of N).
        max_centres = max_count - 1 if 1 < max_count < num_patches else 0
    elif num_images:
        max_count, max_centres = torch.stack([counts.max(), centre_count.max()]).tolist()  # the one host sync
    else:
        max_count = max_centres = 0

    # Patches by output row: kept ones (key: patch - N, raster order), then the others by centre rank (centres
    # first, by descending attention); rows from kept + centres on are the extra token or padding (-1).
    patch_index = torch.arange(num_patches, device=device)  # (N,)
    row_order = torch.where(kept, patch_index - num_patches, centre_rank).sort(dim=-1).indices[:, :max_count]
    if max_count > num_patches:  # every patch is an output token and there is an extra token
        row_order = torch.nn.functional.pad(row_order, (0, max_count - num_patches))
    slot = torch.arange(max_count, device=device)  # (K,)
    source_index = row_order.masked_fill(slot >= extra_row.unsqueeze(-1), -1)  # (I, K)

    # Each centre's candidates: key cosine + text_weight * text score, only for the centres: (I, C, N), C the most
    # centres of any image, never (I, N, N).
    centre_patch = centre_order[:, :max_centres]  # (I, C) patch of each centre place
    centre_slot = torch.arange(centre_patch.shape[1], device=device)  # (C,)
    is_centre_slot = centre_slot < centre_count.unsqueeze(-1)  # (I, C)
    keys = torch.nn.functional.normalize(inputs.patch_keys.float(), dim=-1)  # (I, N, A)
    centre_keys = keys.gather(1, centre_patch.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))  # (I, C, A)
    candidate_scores = centre_keys @ keys.transpose(1, 2)  # (I, C, N) centre x patch cosine
    if text is not None:
        scores, has_text = text
        text_term = config.text_weight * scores.where(has_text.unsqueeze(-1), 0.0)  # (I, N)
        candidate_scores = candidate_scores + text_term.unsqueeze(1)
    if config.centre_candidates == "released":  # every other remaining patch, other centres included
        pool = remaining.unsqueeze(1) & (patch_index != centre_patch.unsqueeze(-1))  # (I, C, N)
    else:
        pool = absorbed.unsqueeze(1)  # (I, 1, N)
    candidate_scores = candidate_scores.masked_fill(~pool, float("-inf"))
    num_candidates = min(config.merge_neighbors, num_patches)
    # Stable top-k: equal scores go to the lower patch index.
    candidates = stable_topk_indices(candidate_scores, num_candidates, largest=True)  # (I, C, M)
    pool = pool.expand(-1, centre_patch.shape[1], -1)  # (I, C, N)
    is_candidate = pool.gather(-1, candidates) & is_centre_slot.unsqueeze(-1)  # (I, C, M)
    candidate_weight = attention.gather(1, candidates.flatten(1)).view_as(candidates) * is_candidate  # (I, C, M)

    # Members of each output row: its own patch (weight 1; none for the extra token and padding), then for a
    # centre row its candidates (weight a_m); the extra token's weights a_m over the non-centre remaining patches.
    # Centre c's candidates go to row kept + c; slots past an image's centres carry weight 0 (rows past the last
    # are written to a spare row and dropped).
    centre_row = (kept_count.unsqueeze(-1) + centre_slot).clamp_(max=max_count).unsqueeze(-1)  # (I, C, 1)
    centre_row = centre_row.expand(-1, -1, num_candidates)  # (I, C, M)
    frame = (num_images, max_count + 1, num_candidates)  # (I, K + 1, M), the last row spare
    row_candidates = candidates.new_zeros(frame).scatter_(1, centre_row, candidates)
    row_weights = attention.new_zeros(frame).scatter_(1, centre_row, candidate_weight)
    row_candidates, row_weights = row_candidates[:, :max_count], row_weights[:, :max_count]  # (I, K, M) each
    own = source_index.clamp(min=0).unsqueeze(-1)  # (I, K, 1)
    own_weight = (source_index >= 0).unsqueeze(-1).float()  # (I, K, 1)
    with_extra = absorbed & extra_count.bool().unsqueeze(-1)  # (I, N) patches summed into the extra token
    return TokenPlan(
        source_index=source_index,
        counts=counts,
        member_index=torch.cat([own, row_candidates], dim=-1),  # (I, K, 1 + M)
        member_weights=torch.cat([own_weight, row_weights], dim=-1),  # (I, K, 1 + M)
        extra_weights=attention * with_extra,  # (I, N)
        extra_row=extra_row,
    )
