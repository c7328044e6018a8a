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

How it is computed, in O(N log N + N k) time and O(N k) memory per row (no (N, N) matrix), in a few dozen
operators (each a kernel launch on a GPU). In 1-D the neighbours of a value are a contiguous run of the sorted
values around it: after a stable sort per row, each value's ``k`` nearest lie among the ``k`` sorted positions on
either side, so ``2k`` candidates per value suffice, and the neighbours are the ``k`` candidates with the smallest
(distance, sample index) keys, the order of the stable top-k over all values. Copies of one value are
interchangeable (same distance, k-distance and density), so what matters at a tie is how many slots each side
gets and in which order the sums run. The right-hand candidates of a run of copies come in ascending sample index
(the stable sort's order), as the top-k over all values would take them; the left-hand ones come from the far end
of their run, so they carry the sample indices of a second stable sort of the reversed row, which lists each run's
copies in descending index: the ``u``-th left copy nearest to the value then stands for the ``u``-th lowest index of
its run. One top-k over the ``2k`` keys then picks the same neighbours, in the same order, as over all values, so the
scores are the same float32 numbers and the decisions the same. One exception: distinct values at one float32
distance from ``x`` (possible only when ``x`` exceeds their gap 2^24-fold, e.g. attention of 1e-3 next to values of
1e-12) are not interchangeable; among them the window takes the lowest keys of the window's candidates, the (N, N)
top-k the lowest sample indices over all values. Both are ties in float32 (sklearn, in float64, sees no tie there).
Values are expected finite.
"""

import torch


def lof_outlier_mask(values: torch.Tensor, valid: torch.Tensor | None = None, n_neighbors: int = 20) -> torch.Tensor:
    """(I, N) bool: which valid values of each row the Local Outlier Factor flags as outliers (score > 1.5).

    values: (I, N) float, any dtype (statistics in float32). valid: (I, N) bool, the values that belong to each
    row's sample (None: all); invalid values are neither neighbours nor outliers. n_neighbors: k, clamped per row
    to ``n_valid - 1`` as sklearn does.
    """
    outlier, order = _sorted_outliers(values, valid, n_neighbors)  # (I, N) each, in sorted order
    return torch.zeros_like(outlier).scatter_(1, order, outlier)  # (I, N) back to sample order


def lof_outlier_count(
    values: torch.Tensor,
    valid: torch.Tensor | None = None,
    n_neighbors: int = 20,
    *,
    invalid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(I,) long: how many valid values of each row are LOF outliers (see ``lof_outlier_mask``).

    invalid: (I, N) bool, the complement of ``valid``, for callers that hold it (one operator fewer); give one.
    """
    if invalid is not None:
        if valid is not None:
            raise ValueError("lof_outlier_count: give valid or invalid, not both")
        return _sorted_outliers(values, None, n_neighbors, invalid)[0].sum(dim=-1)
    return _sorted_outliers(values, valid, n_neighbors)[0].sum(dim=-1)


def _sorted_outliers(
    values: torch.Tensor, valid: torch.Tensor | None, n_neighbors: int, invalid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """((I, N) bool outlier flag per sorted position, (I, N) sample index at each sorted position).

    Valid values come first in the sorted order (ascending), invalid ones last and never flagged.
    """
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    x = values.float()  # (I, N)
    num_rows, num_values = x.shape
    if num_values < 2:
        order = torch.arange(num_values, device=x.device).expand(num_rows, num_values)
        return torch.zeros_like(x, dtype=torch.bool), order
    width = min(n_neighbors, num_values - 1)  # W: candidates on each side, and neighbour columns
    if valid is not None:
        invalid = ~valid
    if invalid is None:  # every row has N values: the neighbour count is the same for all, known on the host
        # A tensor, not a Python number: CUDA divides by a host scalar as a product with its reciprocal.
        row_neighbors = torch.full((1, 1), width, dtype=torch.float32, device=x.device)
    else:
        x = x.masked_fill(invalid, float("inf"))  # invalid values sort last
        num_valid = num_values - invalid.sum(dim=-1, keepdim=True).unsqueeze(-1)  # (I, 1, 1)
        row_neighbors = (num_valid - 1).clamp(min=1, max=n_neighbors)  # (I, 1, 1) sklearn's n_neighbors_ per row

    # Two stable sorts: equal values in ascending sample index (``order``), and in descending (``reversed_order``,
    # a stable sort of the reversed row). Both list the same sorted values.
    sorted_values, order = x.sort(dim=-1, stable=True)  # (I, N) each
    reversed_order = x.sort(dim=-1, descending=True, stable=True).indices.flip(-1)  # (I, N)

    # Candidates of sorted position p: positions p - W .. p - 1 (left, W columns), then p + 1 .. p + W (right); out
    # of the row they read +inf (padding), so their distance is +inf and they rank last.
    def windows(row: torch.Tensor, fill) -> torch.Tensor:
        """(I, N) -> (I, N, 2W): each position's left then right candidates."""
        padded = torch.nn.functional.pad(row, (width, width), value=fill)  # (I, N + 2W)
        left = padded[:, : num_values + width - 1].unfold(1, width, 1)  # (I, N, W) positions p - W .. p - 1
        right = padded[:, width + 1 :].unfold(1, width, 1)  # (I, N, W) positions p + 1 .. p + W
        return torch.cat([left, right], dim=-1)

    distance = (sorted_values.unsqueeze(-1) - windows(sorted_values, float("inf"))).abs()  # (I, N, 2W)
    left_index = torch.nn.functional.pad(reversed_order, (width, width))[:, : num_values + width - 1]
    right_index = torch.nn.functional.pad(order, (width, width))[:, width + 1 :]
    sample_index = torch.cat([left_index.unfold(1, width, 1), right_index.unfold(1, width, 1)], dim=-1)
    # Rank by (distance, sample index): float32 bits of a distance >= 0 are order-preserving integers.
    rank_key = torch.add(sample_index, distance.view(torch.int32), alpha=num_values)  # (I, N, 2W) int64
    near_column = rank_key.topk(width, dim=-1, largest=False, sorted=True).indices  # (I, N, W)
    near_distances = distance.gather(-1, near_column)  # (I, N, W)
    # Sorted position of each neighbour: column c < W is p - W + c, column c >= W is p - W + c + 1.
    first_candidate = torch.arange(-width, num_values - width, device=x.device).view(-1, 1)  # (N, 1) p - W
    near_position = (near_column + (near_column >= width)).add_(first_candidate).flatten(1)  # (I, N * W)

    # LOF, per sorted position, in the neighbour order above (the same float32 sums as over all values).
    if invalid is None:
        k_distance = near_distances[..., width - 1]  # (I, N)
        reach = torch.maximum(near_distances, k_distance.gather(1, near_position).view_as(near_distances))
        density = 1.0 / (reach.sum(dim=-1) / row_neighbors + 1e-10)  # (I, N) local reachability density
        ratios = density.gather(1, near_position).view_as(near_distances) / density.unsqueeze(-1)  # (I, N, W)
        scores = ratios.sum(dim=-1) / row_neighbors  # (I, N) the LOF score
        return scores > 1.5, order
    # Rows with fewer than two valid values have no finite neighbour, and invalid values may reach past the row;
    # their flags are dropped at the end.
    near_position = near_position.clamp_(0, num_values - 1)  # (I, N * W)
    in_neighborhood = torch.arange(width, device=x.device) < row_neighbors  # (I, 1, W)
    k_distance = near_distances.gather(-1, (row_neighbors - 1).expand(-1, num_values, 1)).squeeze(-1)  # (I, N)
    neighbor_k_distance = k_distance.gather(1, near_position).view_as(near_distances)  # (I, N, W)
    reach = torch.maximum(near_distances, neighbor_k_distance).where(in_neighborhood, 0.0)  # (I, N, W)
    row_neighbors = row_neighbors.squeeze(-1).float()  # (I, 1)
    density = 1.0 / (reach.sum(dim=-1) / row_neighbors + 1e-10)  # (I, N)
    neighbor_density = density.gather(1, near_position).view_as(near_distances)  # (I, N, W)
    ratios = (neighbor_density / density.unsqueeze(-1)).where(in_neighborhood, 0.0)  # (I, N, W)
    scores = ratios.sum(dim=-1) / row_neighbors  # (I, N)
    num_valid = num_valid.squeeze(-1)  # (I, 1)
    in_row = first_candidate.view(-1) < num_valid - width  # (I, N) sorted positions of valid values
    return (scores > 1.5) & in_row & (num_valid >= 2), order


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
