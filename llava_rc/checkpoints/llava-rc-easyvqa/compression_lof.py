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

Cost: an (I, N, N) distance matrix and a top-k of its rows per call (N = 576: 330k entries per image).
"""

import torch

from .compression_common import stable_topk_indices


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
    num_valid = valid.sum(dim=-1)  # (I,)
    row_neighbors = (num_valid - 1).clamp(min=1, max=n_neighbors)  # (I,) sklearn's n_neighbors_ per row
    width = min(n_neighbors, num_values - 1)  # columns that can hold a neighbour in any row

    # Pairwise distances; a value is not its own neighbour and invalid values are nobody's.
    distances = (x.unsqueeze(-1) - x.unsqueeze(-2)).abs()  # (I, N, N)
    itself = torch.eye(num_values, dtype=torch.bool, device=x.device)  # (N, N)
    distances = distances.masked_fill(itself | ~valid.unsqueeze(-2), float("inf"))
    # The W nearest in stable-sort order (equidistant neighbours in ascending index order), without a full sort.
    near_index = stable_topk_indices(distances, width, largest=False)  # (I, N, W)
    near_distances = distances.gather(-1, near_index)  # (I, N, W)
    in_neighborhood = torch.arange(width, device=x.device) < row_neighbors.view(-1, 1, 1)  # (I, 1, W)
    # Rows with fewer than two valid values have no finite neighbour; zero them so no inf/nan spreads.
    near_distances = near_distances.where(in_neighborhood & near_distances.isfinite(), 0.0)

    k_distance = near_distances.gather(-1, (row_neighbors - 1).view(-1, 1, 1).expand(-1, num_values, 1))  # (I, N, 1)
    k_distance = k_distance.squeeze(-1)  # (I, N)
    neighbor_k_distance = k_distance.gather(1, near_index.flatten(1)).view(num_rows, num_values, width)  # (I, N, W)
    reach = torch.maximum(near_distances, neighbor_k_distance).where(in_neighborhood, 0.0)  # (I, N, W)
    row_neighbors = row_neighbors.view(-1, 1).float()  # (I, 1)
    density = 1.0 / (reach.sum(dim=-1) / row_neighbors + 1e-10)  # (I, N) local reachability density

    neighbor_density = density.gather(1, near_index.flatten(1)).view(num_rows, num_values, width)  # (I, N, W)
    ratios = (neighbor_density / density.unsqueeze(-1)).where(in_neighborhood, 0.0)  # (I, N, W)
    scores = ratios.sum(dim=-1) / row_neighbors  # (I, N) the LOF score
    return valid & (scores > 1.5) & (num_valid >= 2).unsqueeze(-1)


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
