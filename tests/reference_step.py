"""The compression step as it was before issue 28 (few launches, sparse plans, bounded G-Prune), kept verbatim as
the reference the new code must reproduce: the window LOF, RC and PruMerge(+) with dense (I, K, N) merge weights,
and G-Prune's dense graph scores. Only names changed (``reference_`` prefix); the helpers they call from
``compression_common`` are unchanged.
"""

import math
from typing import NamedTuple

import torch

from llava_rc.compression_common import CompressionInputs, cls_attention, plan_from_mask, resolve_budget
from llava_rc.compression_common import select_mask, stable_descending_order, stable_topk_indices
from llava_rc.compression_prumerge import PruMergeConfig, PruMergePlusConfig, raster_samples, strict_iqr_outliers
from llava_rc.compression_prumerge import iqr_outliers, uniform_lattice, view_size, with_top_patch
from llava_rc.compression_rc import RCConfig


class ReferencePlan(NamedTuple):
    """A plan with dense merge weights, as ``TokenPlan`` was: (I, K) source index, (I,) counts, (I, K, N) weights."""

    source_index: torch.Tensor
    counts: torch.Tensor
    merge_weights: torch.Tensor | None = None


_SENTINEL_KEY = 2**62  # sorts after every (distance bits, index) key of a real candidate


def reference_lof_outlier_mask(values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20) -> torch.Tensor:
    """(I, N) bool: which valid values of each row the Local Outlier Factor flags as outliers (score > 1.5).

    values: (I, N) float, any dtype (statistics in float32). valid: (I, N) bool, the values that belong to each
    row's sample (None: all); invalid values are neither neighbours nor outliers. n_neighbors: k, clamped per row
    to ``n_valid - 1`` as sklearn does.
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    x = values.float()  # (I, N)
    num_rows, num_values = x.shape
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    if num_values < 2:
        return torch.zeros_like(valid)
    device = x.device
    num_valid = valid.sum(dim=-1)  # (I,)
    row_neighbors = (num_valid - 1).clamp(min=1, max=n_neighbors)  # (I,) sklearn's n_neighbors_ per row
    width = min(n_neighbors, num_values - 1)  # W: neighbour columns, and candidates on each side

    # One stable sort per row; invalid values go last. Positions below num_valid hold the valid values ascending.
    sorted_values, order = x.masked_fill(~valid, float("inf")).sort(dim=-1, stable=True)  # (I, N) each
    positions = torch.arange(num_values, device=device)  # (N,)
    # Runs of equal sorted values: each position's run start and (exclusive) end.
    changes = sorted_values[:, 1:] != sorted_values[:, :-1]  # (I, N - 1)
    edge = torch.ones(num_rows, 1, dtype=torch.bool, device=device)
    run_start = torch.where(torch.cat([edge, changes], dim=-1), positions, 0).cummax(dim=-1).values  # (I, N)
    run_end = torch.where(torch.cat([changes, edge], dim=-1), positions + 1, num_values)  # (I, N)
    run_end = run_end.flip(-1).cummin(dim=-1).values.flip(-1)  # (I, N)

    # Candidates: W sorted positions on the left (columns 0..W-1, offset -1..-W), then W on the right.
    steps = torch.arange(1, width + 1, device=device)  # (W,)
    offsets = torch.cat([-steps, steps])  # (2W,)
    candidate = positions.view(-1, 1) + offsets  # (N, 2W) sorted position of each candidate
    in_row = (candidate >= 0) & (candidate < num_valid.view(-1, 1, 1))  # (I, N, 2W)
    candidate = candidate.clamp(0, num_values - 1).expand(num_rows, -1, -1)  # (I, N, 2W)
    candidate_values = sorted_values.gather(1, candidate.flatten(1)).view_as(candidate)  # (I, N, 2W)
    distance = (sorted_values.unsqueeze(-1) - candidate_values).abs().masked_fill(~in_row, float("inf"))

    # k-distance d, the candidates closer than d on each side, and the m slots left for values at distance d.
    kth = (row_neighbors - 1).view(-1, 1, 1).expand(-1, num_values, 1)  # (I, N, 1)
    k_distance_all = distance.sort(dim=-1).values.gather(-1, kth)  # (I, N, 1)
    closer = distance < k_distance_all  # (I, N, 2W)
    closer_left, closer_right = closer[..., :width].sum(-1), closer[..., width:].sum(-1)  # (I, N) each
    slots = row_neighbors.view(-1, 1) - closer_left - closer_right  # (I, N) m >= 1
    at_k = (distance == k_distance_all) & k_distance_all.isfinite()  # (I, N, 2W)
    # The run of copies at distance d on each side (the first candidate past the closer ones, if it is at d).
    has_left = at_k[..., :width].gather(-1, closer_left.clamp(max=width - 1).unsqueeze(-1)).squeeze(-1)
    has_right = at_k[..., width:].gather(-1, closer_right.clamp(max=width - 1).unsqueeze(-1)).squeeze(-1)
    left_end = positions - closer_left  # (I, N) exclusive end of the left run
    left_start = run_start.gather(1, (left_end - 1).clamp(min=0))  # (I, N)
    right_start = (positions + closer_right + 1).clamp(max=num_values - 1)  # (I, N)
    left_size = torch.where(has_left, left_end - left_start, 0)  # (I, N) L
    right_size = torch.where(has_right, run_end.gather(1, right_start) - right_start, 0)  # (I, N) R

    # Left share l of the m slots: how many left copies are among the m lowest sample indices of both runs. Each
    # run's indices ascend with position, so the u-th left copy's place in the union is u + (right copies with a
    # lower index), a searchsorted; l counts the left copies placed below m. Only the first W of a run can matter.
    left_place = (left_start.unsqueeze(-1) + steps - 1).clamp(max=num_values - 1)  # (I, N, W) u-th left copy
    right_place = (right_start.unsqueeze(-1) + steps - 1).clamp(max=num_values - 1)  # (I, N, W) v-th right copy
    left_index = order.gather(1, left_place.flatten(1)).view_as(left_place)  # (I, N, W)
    right_index = order.gather(1, right_place.flatten(1)).view_as(right_place)  # (I, N, W)
    right_index = right_index.masked_fill(steps > right_size.unsqueeze(-1), num_values)  # past the run: last
    union_place = steps - 1 + torch.searchsorted(right_index, left_index)  # (I, N, W)
    in_left_run = steps <= left_size.unsqueeze(-1)  # (I, N, W)
    left_share = ((union_place < slots.unsqueeze(-1)) & in_left_run).sum(dim=-1)  # (I, N) l
    # Distinct values can share one float32 distance (x much larger than their gap: x - y rounds to the same d);
    # then the runs of equal values undercount the candidates at d. Keep l within what each side holds at d, so
    # every neighbour is at most d away; the choice among such distinct values is the nearest in sorted order.
    at_k_left, at_k_right = at_k[..., :width].sum(-1), at_k[..., width:].sum(-1)  # (I, N) each, within the window
    left_share = torch.minimum(torch.maximum(left_share, slots - at_k_right), at_k_left)  # (I, N)
    left_count = closer_left + left_share  # (I, N) neighbours on the left; the rest, k - left_count, on the right

    # Rank the chosen candidates as the stable top-k over all values would: by (distance, sample index). The left
    # copies at distance d stand for the lowest-indexed copies of their run, whose indices they take.
    chosen = torch.cat(
        [steps <= left_count.unsqueeze(-1), steps <= (row_neighbors.view(-1, 1) - left_count).unsqueeze(-1)], dim=-1
    )  # (I, N, 2W)
    sample_index = order.gather(1, candidate.flatten(1)).view_as(candidate)  # (I, N, 2W)
    run_rank = (steps - 1 - closer_left.unsqueeze(-1)).clamp(min=0)  # (I, N, W) place of a left copy in its run
    stand_in = order.gather(1, (left_start.unsqueeze(-1) + run_rank).clamp(max=num_values - 1).flatten(1))
    left_at_k = steps > closer_left.unsqueeze(-1)  # (I, N, W)
    sample_index[..., :width] = torch.where(left_at_k, stand_in.view_as(run_rank), sample_index[..., :width])
    distance_bits = distance.masked_fill(~in_row, 0.0).view(torch.int32).long()  # (I, N, 2W) >= 0, order-preserving
    rank_key = (distance_bits * num_values + sample_index).masked_fill(~chosen, _SENTINEL_KEY)  # (I, N, 2W)
    near_column = rank_key.topk(width, dim=-1, largest=False, sorted=True).indices  # (I, N, W)
    near_position = candidate.gather(-1, near_column)  # (I, N, W) sorted position of each neighbour
    near_distances = distance.gather(-1, near_column)  # (I, N, W)

    # LOF from here, per sorted position, in the neighbour order above (the same float32 sums as over all values).
    in_neighborhood = torch.arange(width, device=device) < row_neighbors.view(-1, 1, 1)  # (I, 1, W)
    # Rows with fewer than two valid values have no finite neighbour; zero them so no inf/nan spreads.
    near_distances = near_distances.where(in_neighborhood & near_distances.isfinite(), 0.0)
    k_distance = near_distances.gather(-1, kth).squeeze(-1)  # (I, N)
    neighbor_k_distance = k_distance.gather(1, near_position.flatten(1)).view_as(near_position)  # (I, N, W)
    reach = torch.maximum(near_distances, neighbor_k_distance).where(in_neighborhood, 0.0)  # (I, N, W)
    row_neighbors = row_neighbors.view(-1, 1).float()  # (I, 1)
    density = 1.0 / (reach.sum(dim=-1) / row_neighbors + 1e-10)  # (I, N) local reachability density

    neighbor_density = density.gather(1, near_position.flatten(1)).view_as(near_position)  # (I, N, W)
    ratios = (neighbor_density / density.unsqueeze(-1)).where(in_neighborhood, 0.0)  # (I, N, W)
    scores = ratios.sum(dim=-1) / row_neighbors  # (I, N) the LOF score, per sorted position
    outlier = (scores > 1.5) & (positions < num_valid.unsqueeze(-1))  # (I, N)
    outlier = torch.zeros_like(outlier).scatter_(1, order, outlier)  # (I, N) back to sample order
    return valid & outlier & (num_valid >= 2).unsqueeze(-1)


def reference_lof_outlier_count(values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20) -> torch.Tensor:
    """(I,) long: how many valid values of each row are LOF outliers (see ``lof_outlier_mask``)."""
    return reference_lof_outlier_mask(values, valid, n_neighbors).sum(dim=-1)




def _descending_rank(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """(I, N) long: each patch's place among the eligible patches by descending score (ties: lower index first).

    Ineligible patches rank after all eligible ones, so ``rank < count`` selects the top ``count`` eligible.
    """
    return _descending_order_and_rank(scores, eligible)[1]


def _descending_order_and_rank(scores: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((I, N) patch at each place, (I, N) place of each patch), as in ``_descending_rank``."""
    order = stable_descending_order(scores.masked_fill(~eligible, float("-inf")))  # (I, N) patch per place
    places = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)  # (I, N)
    return order, torch.empty_like(order).scatter_(1, order, places)


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
    return _descending_rank(scores, ~visual) < recovered_count.unsqueeze(-1)


def _budget_counts(
    budget_tokens: int, num_patches: int, visual: torch.Tensor, recovered: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(visual, recovered, centres, extra) counts (I,) summing to ``budget_tokens``, in the proportions of the
    adaptive counts (see the module docstring)."""
    zeros = torch.zeros_like(visual)
    if budget_tokens >= num_patches:
        return torch.full_like(visual, num_patches), zeros, zeros, zeros
    if budget_tokens == 1:
        return torch.ones_like(visual), zeros, zeros, zeros
    slots = budget_tokens - 1  # one slot for the extra token
    dynamic_total = (visual + recovered + centres).clamp(min=1)  # (I,)
    budget_centres = slots * centres // dynamic_total
    budget_recovered = slots * recovered // dynamic_total
    budget_visual = slots - budget_centres - budget_recovered
    return budget_visual, budget_recovered, budget_centres, torch.ones_like(visual)


@torch.no_grad()
def reference_compress_rc(inputs: CompressionInputs, config: RCConfig) -> ReferencePlan:
    """Plan RC's kept, centre and extra tokens for each image.

    inputs.features: (I, N, C) feature-layer patch tokens (stage "vision"); cls_query (I, A); attention_keys
    (I, 1 + N, A); text_scores (I, N) cosine in [-1, 1] or None; has_text (I,) bool or None (all True).
    Returns a merge plan: source_index (I, K) (patch of each kept or centre token, -1 for the extra token and
    padding), counts (I,), merge_weights (I, K, N) float32 (kept rows one-hot; a centre row 1 at the centre and
    ``a_m`` at its absorbed patches; the extra row ``a_m`` at every non-centre remaining patch).
    """
    attention = cls_attention(inputs, per_head=False)  # (I, N) float32
    num_images, num_patches = attention.shape
    device = attention.device
    text = _text_guidance(inputs, config)
    attention_rank = _descending_rank(attention, torch.ones_like(attention, dtype=torch.bool))  # (I, N)

    # 1-2. Visual keep count from the attention's outliers; recovery count from the text scores' outliers.
    visual_count = reference_lof_outlier_count(attention, None, config.lof_neighbors_visual)  # (I,)
    visual = attention_rank < visual_count.unsqueeze(-1)  # (I, N)
    recovered_count = torch.zeros_like(visual_count)
    if text is not None:
        scores, has_text = text
        replaced = scores.where(~visual, scores.min(dim=-1, keepdim=True).values)  # (I, N)
        text_outliers = reference_lof_outlier_count(replaced, None, config.lof_neighbors_text)  # (I,)
        recovered_count = ((num_patches - visual_count) * text_outliers // num_patches).where(has_text, 0)
    recovered = _recover(text, visual, recovered_count)  # (I, N)

    # 4. Cluster centres: the attention outliers among the remaining patches.
    centre_count = reference_lof_outlier_count(attention, ~(visual | recovered), config.lof_neighbors_merge)  # (I,)
    # 6. At least one token per image: an empty plan keeps the top patch by attention (nothing was recovered).
    visual_count = visual_count + ((visual_count + recovered_count + centre_count) == 0).long()  # (I,)
    visual = attention_rank < visual_count.unsqueeze(-1)  # (I, N)
    extra_count = (centre_count > 0).long()  # (I,) the extra token goes with R when there is no centre
    if config.budget is not None:
        budget_tokens = resolve_budget(config.budget, num_patches)
        visual_count, recovered_count, centre_count, extra_count = _budget_counts(
            budget_tokens, num_patches, visual_count, recovered_count, centre_count
        )
        visual = attention_rank < visual_count.unsqueeze(-1)
        recovered = _recover(text, visual, recovered_count)
    kept = visual | recovered  # (I, N)
    remaining = ~kept
    centre_order, centre_rank = _descending_order_and_rank(attention, remaining)  # (I, N) each
    centre = centre_rank < centre_count.unsqueeze(-1)  # (I, N)
    absorbed = remaining & ~centre  # (I, N) non-centre remaining patches
    with_extra = absorbed & (extra_count > 0).unsqueeze(-1)  # (I, N) patches summed into the extra token

    # Output rows: kept in raster order, then centres by descending attention, then the extra token.
    kept_count = kept.sum(dim=-1)  # (I,)
    counts = kept_count + centre_count + extra_count  # (I,)
    if config.budget is not None:  # every image has exactly the budget: known on the host, no sync
        max_count = resolve_budget(config.budget, num_patches) if num_images else 0
        # One slot is the extra token's, so B - 1 bounds every centre count (no centres when B is 1 or all of N).
        max_centres = max_count - 1 if 1 < max_count < num_patches else 0
    elif num_images:
        max_count, max_centres = torch.stack([counts.max(), centre_count.max()]).tolist()  # the one host sync
    else:
        max_count = max_centres = 0

    # Each centre's candidates: key cosine + text_weight * text score, only for the centres: (I, C, N), C the most
    # centres of any image, never (I, N, N).
    centre_patch = centre_order[:, :max_centres]  # (I, C) patch of each centre place
    is_centre_slot = torch.arange(centre_patch.shape[1], device=device) < centre_count.unsqueeze(-1)  # (I, C)
    keys = torch.nn.functional.normalize(inputs.patch_keys.float(), dim=-1)  # (I, N, A)
    centre_keys = keys.gather(1, centre_patch.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))  # (I, C, A)
    candidate_scores = centre_keys @ keys.transpose(1, 2)  # (I, C, N) centre x patch cosine
    if text is not None:
        scores, has_text = text
        text_term = config.text_weight * scores.where(has_text.unsqueeze(-1), 0.0)  # (I, N)
        candidate_scores = candidate_scores + text_term.unsqueeze(1)
    if config.centre_candidates == "released":  # every other remaining patch, other centres included
        patch_index = torch.arange(num_patches, device=device)  # (N,)
        pool = remaining.unsqueeze(1) & (patch_index != centre_patch.unsqueeze(-1))  # (I, C, N)
    else:
        pool = absorbed.unsqueeze(1)  # (I, 1, N)
    candidate_scores = candidate_scores.masked_fill(~pool, float("-inf"))
    num_candidates = min(config.merge_neighbors, num_patches)
    # Stable top-k: equal scores go to the lower patch index.
    candidates = stable_topk_indices(candidate_scores, num_candidates, largest=True)  # (I, C, M)
    pool = pool.expand(-1, centre_patch.shape[1], -1)  # (I, C, N)
    is_candidate = pool.gather(-1, candidates) & is_centre_slot.unsqueeze(-1)  # (I, C, M)

    spare_row = max_count  # rows written here are dropped
    kept_row = kept.long().cumsum(dim=-1) - 1  # (I, N)
    centre_row = kept_count.unsqueeze(-1) + centre_rank  # (I, N)
    extra_row = (kept_count + centre_count).unsqueeze(-1).expand(-1, num_patches)  # (I, N)
    row = torch.full_like(kept_row, spare_row)
    row = torch.where(with_extra, extra_row, row)
    row = torch.where(centre, centre_row, row)
    row = torch.where(kept, kept_row, row)  # (I, N) output row of each patch's own weight
    own_weight = torch.where(kept | centre, 1.0, torch.where(with_extra, attention, 0.0))  # (I, N)

    merge_weights = torch.zeros(num_images, max_count + 1, num_patches, device=device)  # (I, K + 1, N)
    merge_weights.scatter_(1, row.unsqueeze(1), own_weight.unsqueeze(1))
    # Each absorbed patch adds a_m in its centre's row; empty centre slots and non-candidates go to the spare row.
    centre_slot_row = kept_count.unsqueeze(-1) + torch.arange(centre_patch.shape[1], device=device)  # (I, C)
    candidate_row = torch.where(is_candidate, centre_slot_row.unsqueeze(-1), spare_row)  # (I, C, M)
    flat_index = candidate_row * num_patches + candidates  # (I, C, M) into the (K + 1) * N flattened weights
    candidate_weight = attention.gather(1, candidates.flatten(1)).view_as(candidates) * is_candidate  # (I, C, M)
    flat_weights = merge_weights.view(num_images, (max_count + 1) * num_patches)  # (I, (K + 1) * N)
    flat_weights.scatter_add_(1, flat_index.flatten(1), candidate_weight.flatten(1))

    source_row = torch.where(kept | centre, row, spare_row)  # (I, N)
    source_index = torch.full((num_images, max_count + 1), -1, dtype=torch.long, device=device)
    patch_index = torch.arange(num_patches, device=device).expand(num_images, num_patches)  # (I, N)
    source_index.scatter_(1, source_row, patch_index)
    return ReferencePlan(
        source_index=source_index[:, :max_count], counts=counts, merge_weights=merge_weights[:, :max_count].contiguous()
    )


@torch.no_grad()
def reference_compress_prumerge(inputs: CompressionInputs, config: PruMergeConfig) -> ReferencePlan:
    """Plan keeping the IQR outliers of [CLS] attention (or the top ``budget``), each merged with its neighbours.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A) (or the precomputed
    attention and ``keys`` of multi-crop images).
    Returns a merging plan (see ``merge_plan``).
    """
    attention = cls_attention(inputs, per_head=config.attention == "per_head")  # (I, N)
    outliers = iqr_outliers(attention)  # (I, N)
    return reference_merge_plan(inputs, config, attention, outliers, attention)


@torch.no_grad()
def reference_compress_prumerge_plus(inputs: CompressionInputs, config: PruMergePlusConfig) -> ReferencePlan:
    """Plan keeping the IQR outliers plus sampled patches (released raster rule or a lattice), merged as PruMerge.

    inputs as for ``compress_prumerge``; ``sampling="lattice"`` also needs inputs.grid (rows, cols) with
    rows * cols == N, or inputs.views. Returns a merging plan (see ``merge_plan``).
    """
    attention = cls_attention(inputs, per_head=config.attention == "per_head")  # (I, N)
    strict = strict_iqr_outliers(attention)  # (I, N)
    outliers = with_top_patch(strict, attention)  # (I, N)
    if config.sampling == "raster":
        sampled = raster_samples(strict.sum(dim=-1), inputs.num_patches)  # (I, N)
    else:
        lattices = [uniform_lattice(grid, view_size(grid, inputs), config.uniform_ratio, attention.device)
                    for grid in inputs.view_grids]  # one lattice per view, in token order
        lattice = torch.cat(lattices)  # (N,)
        if lattice.shape[0] != inputs.num_patches:
            raise ValueError(f"prumerge_plus: views {inputs.view_grids} hold {lattice.shape[0]} tokens, the "
                             f"features {inputs.num_patches}")
        sampled = lattice.expand_as(outliers)  # (I, N)
    chosen = outliers | sampled  # (I, N)
    # Attention is a probability (<= 1): adding 2 ranks every chosen patch above every other one.
    return reference_merge_plan(inputs, config, attention, chosen, attention + 2.0 * chosen.float())


def reference_merge_plan(inputs: CompressionInputs, config: PruMergeConfig, attention: torch.Tensor, chosen: torch.Tensor,
               priority: torch.Tensor) -> ReferencePlan:
    """The plan of the kept patches (``chosen``, or the top-``priority`` ones under a budget), merged.

    attention: (I, N) float32; chosen: (I, N) bool, the adaptive set; priority: (I, N) ranking for a budget.
    Returns K output rows per image: the kept patches in raster order, then the extra token (source_index -1),
    then padding; merge_weights (I, K, N). K = ``resolve_budget(budget, N)`` with a budget (known on the host),
    else the largest count in the batch (one host sync).
    """
    num_images, num_patches = attention.shape
    if config.budget is None:
        kept = chosen
        extra = (kept.sum(dim=-1) < num_patches) & config.extra_token  # (I,)
        max_count = int((kept.sum(dim=-1) + extra).max()) if num_images else 0  # the one host sync
    else:
        max_count = resolve_budget(config.budget, num_patches)
        with_extra = config.extra_token and 2 <= max_count < num_patches
        kept = select_mask(priority, max_count - with_extra)  # (I, N)
        extra = torch.full((num_images,), with_extra, dtype=torch.bool, device=attention.device)  # (I,)
    plan = plan_from_mask(kept, max_count)  # (I, K), -1 past the kept patches
    weights = reference_neighbour_weights(plan.source_index, attention, inputs.patch_keys, config)  # (I, K, N)
    # The extra token: sum of the pruned patches weighted by attention, in the row after the kept ones.
    extra_row = (attention * ~kept * extra.unsqueeze(-1)).unsqueeze(1)  # (I, 1, N)
    extra_slot = plan.counts.clamp(max=max(max_count - 1, 0)).view(num_images, 1, 1).expand(-1, 1, num_patches)
    if max_count:
        weights = weights.scatter_add(1, extra_slot, extra_row)  # adds zeros where an image has no extra token
    return ReferencePlan(source_index=plan.source_index, counts=plan.counts + extra, merge_weights=weights)


def reference_neighbour_weights(source_index: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor,
                      config: PruMergeConfig) -> torch.Tensor:
    """(I, K, N) float32 merge weights of the kept patches ``source_index`` (I, K) (-1: a zero row).

    attention: (I, N) float32; keys: (I, N, A). Similarities are kept-patch x all-patch, (I, K, N): no N x N.
    """
    num_images, num_patches = attention.shape
    valid = (source_index >= 0).unsqueeze(-1)  # (I, K, 1)
    anchor = source_index.clamp(min=0)  # (I, K)
    own = torch.zeros(*source_index.shape, num_patches, device=attention.device)  # (I, K, N)
    own.scatter_(2, anchor.unsqueeze(-1), 1.0)  # each kept patch at weight 1
    neighbours = config.neighbours_for(num_patches)
    if config.merge == "none" or neighbours == 0:
        return own * valid
    unit_keys = torch.nn.functional.normalize(keys.float(), dim=-1)  # (I, N, A)
    anchor_keys = unit_keys.gather(1, anchor.unsqueeze(-1).expand(-1, -1, unit_keys.shape[-1]))  # (I, K, A)
    similarity = anchor_keys @ unit_keys.transpose(1, 2)  # (I, K, N)
    # A patch is never its own neighbour: -inf ranks it last, behind every other patch.
    similarity.scatter_(2, anchor.unsqueeze(-1), -math.inf)
    nearest = stable_topk_indices(similarity, neighbours, largest=True)  # (I, K, k)
    members = torch.zeros_like(similarity).scatter_(2, nearest, 1.0)  # (I, K, N) the neighbours
    neighbour_attention = members * attention.unsqueeze(1)  # (I, K, N)
    if config.merge == "released":
        return (own + neighbour_attention) * valid
    # "average": {p} and its neighbours, weighted by attention and normalised.
    weights = neighbour_attention + own * attention.unsqueeze(1)  # (I, K, N)
    total = weights.sum(dim=-1, keepdim=True)  # (I, K, 1)
    plain_mean = (members + own) / (neighbours + 1)  # (I, K, N)
    weights = torch.where(total > 0, weights / total.clamp(min=torch.finfo(total.dtype).tiny), plain_mean)
    return weights * valid



def reference_graph_scores(features: torch.Tensor, threshold: float, temperature: float, steps: int) -> torch.Tensor:
    """(I, N) float32 G-Prune score of each token: (w^T P^steps)_j / degree_j, with w the token norms."""
    features = features.float()  # (I, N, D)
    units = torch.nn.functional.normalize(features, dim=-1)  # (I, N, D)
    similarity = units @ units.transpose(1, 2)  # (I, N, N)
    self_loops = torch.eye(similarity.shape[-1], dtype=torch.bool, device=similarity.device)  # (N, N)
    edges = (similarity >= threshold) | self_loops  # (I, N, N)
    logits = (similarity / temperature).masked_fill(~edges, float("-inf"))
    transition = logits.softmax(dim=-1)  # (I, N, N), rows sum to 1
    signal = features.norm(dim=-1).unsqueeze(1)  # (I, 1, N)
    for _ in range(steps):
        signal = signal @ transition  # (I, 1, N)
    degree = edges.sum(dim=1)  # (I, N): edges ending at each node
    return signal.squeeze(1) / degree
