"""PruMerge and PruMerge+: keep the [CLS]-attention outliers, merge similar patches into them (arXiv 2403.15388).

Steps (PruMerge):
1. Recompute the [CLS] attention ``a`` (I, N) at the attention layer (softmax per head, mean over heads).
2. Keep the patches whose attention is an IQR outlier, ``a > Q3 + 1.5 * IQR``, with the quartiles taken over the
   image's N values by linear interpolation (numpy's default percentile). The count is adaptive: the paper keeps
   about 32 of 576 tokens (5.5%) on LLaVA-1.5.
3. Each kept patch p absorbs its ``merge_neighbors`` (32 in the paper) most key-similar patches: cosine of the
   attention layer's keys, against every other patch (p itself excluded, as in the released code). Other kept
   patches may be among them, so a patch can contribute to several output tokens.
4. The output token is the attention-weighted mean over {p} and its neighbours: ``y_p = sum_m w_m x_m`` with
   ``w_m = a_m / sum_{m'} a_{m'}`` over that set. The paper describes the merge as a weighted average by [CLS]
   attention; the released code instead adds ``x_p + sum_m a_m x_m`` without normalising and appends one extra
   token (the attention-weighted sum of the pruned patches). Normalised weights keep the merged token on the
   feature scale the projector was trained on; the extra token is not produced.

On LLaVA-NeXT (anyres) the image's tokens are its base view and high-resolution grid (``inputs.views``): the
[CLS] attention is each crop's own (precomputed by the model), outliers are taken over the whole image, and
PruMerge+ lays one lattice on each view.

PruMerge+ adds spatially uniform samples to the outliers: a lattice on the patch grid with about
``uniform_ratio * N`` points (cell centres of ``round(rows * sqrt(uniform_ratio))`` x
``round(cols * sqrt(uniform_ratio))`` cells, so the stride along each axis is about ``1 / sqrt(uniform_ratio)``).
The paper's PruMerge+ keeps about 25% of the tokens; outliers (~5.5%) plus a 20% lattice, less their overlap, give
about that. The released code samples a 1-D stride over raster indices instead; a 2-D lattice is uniform in both
directions on any grid. Uniform samples merge their neighbours exactly like the outliers.

Kept tokens come out in raster order (the released code emits them in descending attention).

Budget: with ``budget`` set, the count per image is exactly ``resolve_budget(budget, N)``. PruMerge then keeps the
top-``budget`` patches by attention instead of the outliers. PruMerge+ ranks its outlier-and-lattice set first (by
attention within it, so outliers lead), then the remaining patches by attention, and keeps the first ``budget``:
the set is trimmed by attention when too large and filled by attention when too small.
"""

import math
from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, cls_attention, plan_from_mask
from .compression_common import check_range, resolve_budget, select_plan, stable_descending_order, validate_budget


@dataclass(frozen=True)
class PruMergeConfig(MethodConfig):
    """Settings of ``"prumerge"``.

    budget: None for the adaptive IQR-outlier count (the paper's method); or a fixed number of tokens per image,
        an int count or a float ratio of the patches, filled with the top patches by [CLS] attention.
    merge_neighbors: how many most key-similar patches each kept patch absorbs (32 in the paper); clamped to N - 1.
    cls_attention_layer: vision layer whose [CLS] attention and keys are read; None = the layer that reads the
        feature layer's output (for LLaVA's feature layer -2, the last layer, as in the released code).
    """

    method = "prumerge"
    needs_attention = True

    budget: int | float | None = None
    merge_neighbors: int = 32
    cls_attention_layer: int | None = None

    def __post_init__(self):
        validate_budget(self.budget, allow_none=True)
        check_range("merge_neighbors", self.merge_neighbors, 0, integer=True)
        if self.cls_attention_layer is not None:
            check_range("cls_attention_layer", self.cls_attention_layer, integer=True)


@dataclass(frozen=True)
class PruMergePlusConfig(PruMergeConfig):
    """Settings of ``"prumerge_plus"``: those of ``"prumerge"`` and

    uniform_ratio: fraction of the patches added as a spatially uniform lattice on the patch grid, in (0, 1];
        0.2 with ~5.5% outliers gives the paper's ~25% of tokens in total.
    """

    method = "prumerge_plus"

    uniform_ratio: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        ratio = self.uniform_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"uniform_ratio must be a number in (0, 1], got {ratio!r}")


@torch.no_grad()
def compress_prumerge(inputs: CompressionInputs, config: PruMergeConfig) -> TokenPlan:
    """Plan keeping the IQR outliers of [CLS] attention (or the top ``budget``), each merged with its neighbours.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A).
    Returns a merging plan: K = the largest kept count in the batch (exactly ``resolve_budget(budget, N)`` when
    ``budget`` is set), tokens in raster order, merge_weights (I, K, N) attention-normalised over each token's set.
    """
    attention = cls_attention(inputs, per_head=True)  # (I, N)
    if config.budget is None:
        plan = plan_from_mask(iqr_outliers(attention))
    else:
        keep = resolve_budget(config.budget, inputs.num_patches)
        plan = select_plan(attention, keep)
    return with_neighbour_merge(plan, attention, inputs.patch_keys, config.merge_neighbors)


@torch.no_grad()
def compress_prumerge_plus(inputs: CompressionInputs, config: PruMergePlusConfig) -> TokenPlan:
    """Plan keeping the IQR outliers plus a uniform lattice on the patch grid, each merged with its neighbours.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A); inputs.grid
    (rows, cols) with rows * cols == N, or inputs.views (one lattice per view).
    Returns a merging plan as ``compress_prumerge`` does; with ``budget`` set, exactly ``resolve_budget(budget, N)``
    tokens per image (the outlier-and-lattice set trimmed or filled by attention).
    """
    attention = cls_attention(inputs, per_head=True)  # (I, N)
    # One lattice per view (LLaVA-NeXT: the base view and the high-resolution grid), in token order.
    lattices = [uniform_lattice(grid, view_size(grid, inputs), config.uniform_ratio, attention.device)
                for grid in inputs.view_grids]
    lattice = torch.cat(lattices)  # (N,)
    if lattice.shape[0] != inputs.num_patches:
        raise ValueError(f"prumerge_plus: views {inputs.view_grids} hold {lattice.shape[0]} tokens, the features "
                         f"{inputs.num_patches}")
    chosen = iqr_outliers(attention) | lattice  # (I, N)
    if config.budget is None:
        plan = plan_from_mask(chosen)
    else:
        keep = resolve_budget(config.budget, inputs.num_patches)
        # Attention is a probability (<= 1): adding 2 ranks every chosen patch above every other one.
        priority = attention + 2.0 * chosen.float()  # (I, N)
        plan = select_plan(priority, keep)
    return with_neighbour_merge(plan, attention, inputs.patch_keys, config.merge_neighbors)


def iqr_outliers(attention: torch.Tensor) -> torch.Tensor:
    """(I, N) bool: ``attention > Q3 + 1.5 * IQR`` per image, plus the top patch so that no image keeps nothing.

    Quartiles use linear interpolation, as numpy's default percentile. The top patch is an outlier whenever any
    patch is, so adding it only matters for images without outliers (e.g. uniform attention).
    """
    quartiles = torch.quantile(attention, attention.new_tensor([0.25, 0.75]), dim=-1, keepdim=True)  # (2, I, 1)
    first, third = quartiles[0], quartiles[1]  # (I, 1) each
    outliers = attention > third + 1.5 * (third - first)  # (I, N)
    top = attention.argmax(dim=-1, keepdim=True)  # (I, 1), the first maximum: ties go to the lower index
    return outliers.scatter(1, top, True)


def view_size(grid: tuple[int, int] | None, inputs: CompressionInputs) -> int:
    """Tokens of one view: rows * cols, or all N without a grid (``uniform_lattice`` then raises)."""
    return grid[0] * grid[1] if grid is not None else inputs.num_patches


def uniform_lattice(grid: tuple[int, int] | None, num_patches: int, ratio: float, device) -> torch.Tensor:
    """(N,) bool: the centres of a ``round(rows * sqrt(ratio))`` x ``round(cols * sqrt(ratio))`` lattice of cells."""
    if grid is None or grid[0] * grid[1] != num_patches:
        raise ValueError(f"prumerge_plus needs inputs.grid (rows, cols) with rows * cols == {num_patches}, got {grid}")
    rows, cols = grid
    row_samples = min(rows, max(1, round(rows * math.sqrt(ratio))))
    col_samples = min(cols, max(1, round(cols * math.sqrt(ratio))))
    # Cell centres in integer arithmetic: floor((j + 0.5) * size / samples).
    row_ids = (2 * torch.arange(row_samples, device=device) + 1) * rows // (2 * row_samples)  # (R,)
    col_ids = (2 * torch.arange(col_samples, device=device) + 1) * cols // (2 * col_samples)  # (S,)
    raster = (row_ids.unsqueeze(-1) * cols + col_ids).flatten()  # (R * S,)
    return torch.zeros(num_patches, dtype=torch.bool, device=device).index_fill(0, raster, True)


def with_neighbour_merge(plan: TokenPlan, attention: torch.Tensor, keys: torch.Tensor, neighbours: int) -> TokenPlan:
    """``plan`` with merge weights: each kept patch averages itself and its most key-similar patches by attention.

    plan.source_index: (I, K); attention: (I, N) float32; keys: (I, N, A). The weights are built for all N patches
    (an N x N table, small next to the encoder) so that the kept tokens' rows are one gather.
    """
    num_patches = attention.shape[1]
    unit_keys = torch.nn.functional.normalize(keys.float(), dim=-1)  # (I, N, A)
    similarity = unit_keys @ unit_keys.transpose(1, 2)  # (I, N, N)
    # A patch is never its own neighbour: -inf sorts it last, behind every other patch.
    similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    nearest = stable_descending_order(similarity)[..., : min(neighbours, num_patches - 1)]  # (I, N, M)
    members = torch.zeros_like(similarity, dtype=torch.bool).scatter(2, nearest, True)  # (I, N, N)
    members |= torch.eye(num_patches, dtype=torch.bool, device=attention.device)  # row p: {p} and its neighbours
    weights = members * attention.unsqueeze(1)  # (I, N, N)
    total = weights.sum(dim=-1, keepdim=True)  # (I, N, 1)
    # A set whose attention all underflowed to 0 falls back to a plain mean instead of 0 / 0.
    plain_mean = members / members.sum(dim=-1, keepdim=True)  # (I, N, N)
    weights = torch.where(total > 0, weights / total.clamp(min=torch.finfo(total.dtype).tiny), plain_mean)
    rows = plan.source_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, num_patches)  # (I, K, N)
    merge_weights = weights.gather(1, rows) * (plan.source_index >= 0).unsqueeze(-1)  # (I, K, N)
    return TokenPlan(source_index=plan.source_index, counts=plan.counts, merge_weights=merge_weights)
