"""Local Outlier Factor of 1-D values, batched, in torch: the outlier statistic that sets RC's dynamic ratios.

Reproduces ``sklearn.neighbors.LocalOutlierFactor(n_neighbors=k, contamination="auto").fit_predict`` on each row
of values (one feature per sample), vectorised over rows and samples, on the values' device, in float32:

- k-neighbourhood: each valid value's ``k`` nearest other valid values by ``|x_i - x_j|``, the value itself
  excluded (sklearn's ``kneighbors()`` without ``X``). With ``n`` valid values and ``k >= n`` sklearn warns and
  uses ``k = n - 1``; so do we, per row. A row with a single valid value has no outliers (sklearn raises there).
- k-distance of a value: the distance to its k-th neighbour. Reachability distance of ``i`` from a neighbour
  ``j``: ``max(|x_i - x_j|, k_distance(j))``. Local reachability density: ``1 / (mean reachability + 1e-10)``.
- LOF score: the mean over the neighbours of ``lrd(j) / lrd(i)``; with ``contamination="auto"`` a value is an
  outlier when its score exceeds 1.5 (sklearn: ``negative_outlier_factor_ < offset_ = -1.5``).

Ties. Which of several equidistant values fills the last neighbour slot changes the result only through their
k-distances. Equal values have equal k-distances, so a tie among duplicates of one value is harmless, as is the
choice of which duplicate stands in for the value itself. The one tie that matters in 1-D is two-sided: the
values ``x - d`` and ``x + d`` both present at the k-th distance ``d``. sklearn settles it by the visiting order
of its kd-tree (``algorithm="auto"`` picks a kd-tree for 1-D data unless ``k >= n // 2``, then brute force) and
the internal order of its bounded max-heap, which depend on ``std::nth_element``'s layout of the tree leaves; it
favours neither side nor the lower index. We break the tie towards the lower sample index (a stable sort), which
is deterministic and independent of the other rows. Such ties need three values in exact arithmetic progression,
which continuous features essentially never produce; outside them the outlier decisions equal sklearn's (for
float32 or float64 input to sklearn), barring scores within float32 rounding of exactly 1.5.

How it is computed, in O(N log N + N k) time and O(N k) memory per row (no (N, N) matrix). In 1-D the neighbours
of a value are a contiguous run of the sorted values around it: after one stable sort per row, each value's
``k`` nearest lie among the ``k`` sorted positions on either side, so ``2k`` candidates per value suffice. Its
k-distance ``d`` is the k-th smallest candidate distance; every candidate closer than ``d`` is a neighbour, and the
remaining ``m`` slots go to the values at distance exactly ``d``: copies of ``x - d`` on the left and of ``x + d``
on the right. Copies of one value are interchangeable (same distance, k-distance and density), so only how many
slots each side gets matters; as in the stable top-k over all values, they go to the ``m`` lowest sample indices of
the two runs of copies (a searchsorted of one run's sorted indices in the other's). The neighbours are then ranked
in the same (distance, sample index) order as that top-k and the sums taken in that order, so the scores are the same
float32 numbers and the decisions the same. One exception: distinct values at one float32 distance from ``x``
(possible only when ``x`` exceeds their gap 2^24-fold, e.g. attention of 1e-3 next to values of 1e-12) are not
interchangeable; among them the window takes the nearest in sorted order, the (N, N) top-k took the lowest sample
indices. Both are ties in float32 (sklearn, in float64, sees no tie there). Values are expected finite.
"""

import torch

_SENTINEL_KEY = 2**62  # sorts after every (distance bits, index) key of a real candidate


def lof_outlier_mask(values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20) -> torch.Tensor:
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


def lof_outlier_count(values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20) -> torch.Tensor:
    """(I,) long: how many valid values of each row are LOF outliers (see ``lof_outlier_mask``)."""
    return lof_outlier_mask(values, valid, n_neighbors).sum(dim=-1)


def lof_outlier_fraction(
    values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20
) -> torch.Tensor:
    """(I,) float32: the fraction of each row's valid values that are LOF outliers; 0 for rows without values.

    values: (I, N); valid: (I, N) bool or None (all valid). Equals
    ``(LocalOutlierFactor(n_neighbors).fit_predict(row.reshape(-1, 1)) == -1).mean()`` over the valid values.
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    count = lof_outlier_count(values, valid, n_neighbors)  # (I,)
    return count.float() / valid.sum(dim=-1).clamp(min=1).float()
