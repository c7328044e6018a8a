"""PruMerge and PruMerge+: keep the [CLS]-attention outliers, merge similar patches into them (arXiv 2403.15388).

The defaults follow the authors' released code (LLaVA-PruMerge), which produced the published numbers; where the
paper reads differently, the paper's reading is a named option.

Steps (PruMerge):
1. [CLS] attention ``a`` (I, N) at the attention layer (the layer that reads the feature layer, layer 23 for
   LLaVA-1.5's -2, as the released code hooks): ``attention="joint"`` (default, released) is ONE softmax of
   ``q_cls . k_n`` over all heads concatenated, scaled by ``A ** -0.5``; ``"per_head"`` is the mean of the
   per-head softmaxes (the layer's own attention).
2. Keep the patches whose attention is an IQR outlier, ``a > Q3 + 1.5 * IQR``, quartiles by linear interpolation
   (numpy's default percentile) over the image's N values. The count is adaptive (~32 of 576 in the paper).
3. Merge (``merge``): each kept patch p finds its ``k`` most key-similar *other* patches (cosine of the attention
   layer's keys; other kept patches included, so a patch may feed several tokens), k = ``merge_neighbors`` (32)
   clamped to N - 1, or ``round(neighbors_ratio * N)`` when ``neighbors_ratio`` is set.
   - ``"released"`` (default): ``y_p = x_p + sum_m a_m x_m`` over the k neighbours, raw attention, no division
     by the total (the released code has that division commented out).
   - ``"average"``: the paper's wording, the attention-weighted mean over {p} and its neighbours,
     ``y_p = sum_m a_m x_m / sum_m a_m`` (a plain mean if every weight underflowed to 0).
   - ``"none"``: no merge, ``y_p = x_p`` (selection only).
4. ``extra_token`` (default True, released): one more token, ``sum_n a_n x_n`` over every patch not kept.

PruMerge+ adds sampled patches to the outliers before the merge (``sampling``):
- ``"raster"`` (default, released): with ``r`` = outliers / N, the raster positions
  ``0, s, 2s, ... < N - 1`` with ``s = floor(floor(1 / r) / 3)`` (computed exactly as ``(N // outliers) // 3``).
  The released code hard-codes 575 for N - 1 and crashes where ``s`` is undefined; here: any N uses N - 1;
  ``r = 0`` (no outlier) takes the limit ``s = infinity``, i.e. position 0 only; ``r > 1/3`` would give
  ``s = 0`` and is clamped to 1 (every position ``< N - 1`` sampled), but IQR outliers never reach it: at most
  about a quarter of the values lie above Q3.
- ``"lattice"`` (our variation): the cell centres of a ``round(rows * sqrt(uniform_ratio))`` x
  ``round(cols * sqrt(uniform_ratio))`` lattice on each view's patch grid, about ``uniform_ratio * N`` points,
  uniform in both directions on any grid.
The paper reports ~25% of the tokens for PruMerge+ on LLaVA-1.5; the raster rule keeps more when outliers are few.

Output order (``token_order``): ``"released"`` (default) emits the kept tokens as the release does, the outliers in
descending [CLS] attention (ties: lower index first), then (PruMerge+) the sampled patches in raster order, then
(under a budget) the patches that fill it, by descending attention; then the extra token. ``"raster"`` (ours)
emits the kept tokens in raster order (reading order), then the extra token. The merged vectors are the same
either way; only their order in the prompt differs, which the language model reads through its positions (on the
shipped model the released order costs much of the accuracy on position questions: docs/easyvqa.md). Layouts with
row-end newline tokens (LLaVA-NeXT) always put tokens in reading order, which the newlines need.

Remaining differences from the released code, each on purpose:
- The top patch by attention is always kept (released: an image without outliers keeps no patch, only the extra
  token), so that every image keeps at least one patch.
- Outliers are taken per image (released: over the whole batch flattened, which is per image at its batch size 1),
  and the count is the number of outliers (released: ``int(N * (outliers / N))``, which float rounding can make
  one less).
- No extra token when nothing was pruned (released: a zero token).
- Ties in the neighbour ranking go to the lower patch index (released: ``topk``'s unspecified order).

On LLaVA-NeXT (anyres) the image's tokens are its base view and high-resolution grid (``inputs.views``): the
[CLS] attention is each crop's own (precomputed by the model), outliers are taken over the whole image, the raster
rule runs over the image's N tokens in reading order and the lattice is laid on each view.

Budget: with ``budget`` set the count per image is exactly ``B = resolve_budget(budget, N)``. With the extra token
(and 2 <= B < N), B - 1 patches plus the extra token; else B patches. PruMerge keeps the top patches by
attention; PruMerge+ ranks its outlier-and-sample set first (by attention within it), then the remaining patches
by attention, and keeps the first ones: the set is trimmed by attention when too large and filled when too small.
"""

import math
from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_choice, check_range, cls_attention
from .compression_common import plan_from_mask, resolve_budget, select_mask, stable_descending_order, stable_topk_indices
from .compression_common import validate_budget

MERGES = ("released", "average", "none")
ATTENTIONS = ("joint", "per_head")
SAMPLINGS = ("raster", "lattice")
TOKEN_ORDERS = ("released", "raster")


@dataclass(frozen=True)
class PruMergeConfig(MethodConfig):
    """Settings of ``"prumerge"``.

    budget: None for the adaptive IQR-outlier count (the paper's method); or a fixed number of tokens per image,
        an int count or a float ratio of the patches, filled with the top patches by [CLS] attention.
    merge_neighbors: how many most key-similar patches each kept patch absorbs (32 in the released code, at any
        N); clamped to N - 1.
    neighbors_ratio: None, or a fraction in (0, 1] of N that replaces ``merge_neighbors`` (k = round(ratio * N),
        at least 1): the neighbourhood scaled with the image (32 / 576 ~ 0.056 matches LLaVA-1.5).
    merge: ``"released"`` (kept patch + raw-attention-weighted neighbours), ``"average"`` (attention-weighted mean,
        the paper's wording) or ``"none"`` (no merge).
    attention: ``"joint"`` (one softmax over all heads, the released formula) or ``"per_head"`` (mean of per-head
        softmaxes).
    extra_token: add the attention-weighted sum of the pruned patches as one more token (released: True).
    cls_attention_layer: vision layer whose [CLS] attention and keys are read; None = the layer that reads the
        feature layer's output (for LLaVA's feature layer -2, the last layer, as in the released code).
    token_order: ``"released"`` (outliers by descending [CLS] attention, then PruMerge+'s samples in raster order,
        as released) or ``"raster"`` (kept tokens in raster order); the extra token last either way.
    """

    method = "prumerge"
    needs_attention = True

    budget: int | float | None = None
    merge_neighbors: int = 32
    neighbors_ratio: float | None = None
    merge: str = "released"
    attention: str = "joint"
    extra_token: bool = True
    cls_attention_layer: int | None = None
    token_order: str = "released"

    def __post_init__(self):
        validate_budget(self.budget, allow_none=True)
        check_range("merge_neighbors", self.merge_neighbors, 0, integer=True)
        if self.neighbors_ratio is not None:
            ratio = self.neighbors_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"neighbors_ratio must be None or a number in (0, 1], got {ratio!r}")
        check_choice("merge", self.merge, MERGES)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("token_order", self.token_order, TOKEN_ORDERS)
        if not isinstance(self.extra_token, bool):
            raise ValueError(f"extra_token must be True or False, got {self.extra_token!r}")
        if self.cls_attention_layer is not None:
            check_range("cls_attention_layer", self.cls_attention_layer, integer=True)

    def neighbours_for(self, num_patches: int) -> int:
        """Neighbours each kept patch absorbs in an image of ``num_patches`` patches (at most N - 1)."""
        wanted = self.merge_neighbors
        if self.neighbors_ratio is not None:
            wanted = max(1, round(self.neighbors_ratio * num_patches))
        return max(0, min(wanted, num_patches - 1))


@dataclass(frozen=True)
class PruMergePlusConfig(PruMergeConfig):
    """Settings of ``"prumerge_plus"``: those of ``"prumerge"`` and

    sampling: ``"raster"`` (the released 1-D stride ``floor(floor(1 / r) / 3)`` over raster positions, r = the
        outlier ratio) or ``"lattice"`` (a 2-D lattice of about ``uniform_ratio * N`` points on each view's grid).
    uniform_ratio: fraction of the patches the ``"lattice"`` sampling adds, in (0, 1]; unused by ``"raster"``.
    """

    method = "prumerge_plus"

    sampling: str = "raster"
    uniform_ratio: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        check_choice("sampling", self.sampling, SAMPLINGS)
        ratio = self.uniform_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"uniform_ratio must be a number in (0, 1], got {ratio!r}")


@torch.no_grad()
def compress_prumerge(inputs: CompressionInputs, config: PruMergeConfig) -> TokenPlan:
    """Plan keeping the IQR outliers of [CLS] attention (or the top ``budget``), each merged with its neighbours.

    inputs.features: (I, N, C); inputs.cls_query (I, A); inputs.attention_keys (I, 1 + N, A) (or the precomputed
    attention and ``keys`` of multi-crop images).
    Returns a sparse merging plan (see ``merge_plan``).
    """
    attention = cls_attention(inputs, per_head=config.attention == "per_head")  # (I, N)
    outliers = iqr_outliers(attention)  # (I, N)
    return merge_plan(inputs, config, attention, outliers, attention, outliers)


@torch.no_grad()
def compress_prumerge_plus(inputs: CompressionInputs, config: PruMergePlusConfig) -> TokenPlan:
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
    return merge_plan(inputs, config, attention, chosen, attention + 2.0 * chosen.float(), outliers)


def merge_plan(inputs: CompressionInputs, config: PruMergeConfig, attention: torch.Tensor, chosen: torch.Tensor,
               priority: torch.Tensor, outliers: torch.Tensor) -> TokenPlan:
    """The plan of the kept patches (``chosen``, or the top-``priority`` ones under a budget), merged.

    attention: (I, N) float32; chosen: (I, N) bool, the adaptive set; priority: (I, N) ranking for a budget;
    outliers: (I, N) bool, the attention outliers within ``chosen`` (the rest of it was sampled).
    Returns K output rows per image: the kept patches in ``config.token_order``, then the extra token
    (source_index -1), then padding, as a sparse merge plan (``TokenPlan``: members (I, K, 1 + k), the extra token's
    weights (I, N)). K = ``resolve_budget(budget, N)`` with a budget (known on the host), else the largest count in
    the batch (one host sync).
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
    plan = plan_from_mask(kept, max_count)  # (I, K), -1 past the kept patches, raster order
    if config.token_order == "released":
        plan = TokenPlan(source_index=released_order(plan.source_index, attention, outliers, chosen),
                         counts=plan.counts)
    member_index, member_weights = neighbour_members(plan.source_index, attention, inputs.patch_keys, config)
    # The extra token: sum of the pruned patches weighted by attention, in the row after the kept ones.
    extra_weights = attention * (~kept & extra.unsqueeze(-1))  # (I, N), zero where an image has no extra token
    return TokenPlan(
        source_index=plan.source_index,
        counts=plan.counts + extra,
        member_index=member_index,
        member_weights=member_weights,
        extra_weights=extra_weights,
        extra_row=plan.counts,
    )


def released_order(source_index: torch.Tensor, attention: torch.Tensor, outliers: torch.Tensor,
                   chosen: torch.Tensor) -> torch.Tensor:
    """(I, K) the kept patches ``source_index`` (I, K) (raster order, -1 padding last) in the released order:
    outliers by descending attention, then the other ``chosen`` (sampled) patches in raster order, then the
    patches a budget added, by descending attention (ties: lower index first); padding stays last.

    attention: (I, N) float32; outliers, chosen: (I, N) bool.
    """
    num_patches = attention.shape[-1]
    order = stable_descending_order(attention)  # (I, N) patch at each place
    places = torch.arange(num_patches, device=attention.device).expand_as(order)  # (I, N)
    attention_place = torch.empty_like(order).scatter_(1, order, places)  # (I, N) place of each patch
    index = torch.arange(num_patches, device=attention.device)  # (N,)
    # (I, N) sort key: the three groups in turn, each in its own order.
    key = torch.where(chosen, num_patches + index, 2 * num_patches + attention_place)
    key = torch.where(outliers, attention_place, key)
    valid = source_index >= 0  # (I, K)
    row_key = torch.where(valid, key.gather(1, source_index.clamp(min=0)), 3 * num_patches)  # (I, K) padding last
    return source_index.gather(1, row_key.argsort(dim=1, stable=True))


def neighbour_members(source_index: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor,
                      config: PruMergeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """((I, K, 1 + k) long members, (I, K, 1 + k) float32 weights) of the kept patches ``source_index`` (I, K)
    (-1: a row of zero weights): each kept patch first, then its ``k`` most key-similar other patches.

    attention: (I, N) float32; keys: (I, N, A). Similarities are kept-patch x all-patch, (I, K, N): no N x N.
    """
    num_images, num_patches = attention.shape
    valid = (source_index >= 0).unsqueeze(-1)  # (I, K, 1)
    anchor = source_index.clamp(min=0).unsqueeze(-1)  # (I, K, 1)
    own_weight = valid.float()  # (I, K, 1) each kept patch at weight 1
    neighbours = config.neighbours_for(num_patches)
    if config.merge == "none" or neighbours == 0:
        return anchor, own_weight
    unit_keys = torch.nn.functional.normalize(keys.float(), dim=-1)  # (I, N, A)
    anchor_keys = unit_keys.gather(1, anchor.expand(-1, -1, unit_keys.shape[-1]))  # (I, K, A)
    similarity = anchor_keys @ unit_keys.transpose(1, 2)  # (I, K, N)
    # A patch is never its own neighbour: -inf ranks it last, behind every other patch.
    similarity.scatter_(2, anchor, -math.inf)
    nearest = stable_topk_indices(similarity, neighbours, largest=True)  # (I, K, k)
    members = torch.cat([anchor, nearest], dim=-1)  # (I, K, 1 + k)
    neighbour_attention = attention.gather(1, nearest.flatten(1)).view_as(nearest)  # (I, K, k)
    if config.merge == "released":
        return members, torch.cat([own_weight, neighbour_attention * valid], dim=-1)
    # "average": {p} and its neighbours, weighted by attention and normalised.
    weights = attention.gather(1, members.flatten(1)).view_as(members)  # (I, K, 1 + k)
    total = weights.sum(dim=-1, keepdim=True)  # (I, K, 1)
    plain_mean = torch.full_like(weights, 1.0 / (neighbours + 1))  # (I, K, 1 + k)
    weights = torch.where(total > 0, weights / total.clamp(min=torch.finfo(total.dtype).tiny), plain_mean)
    return members, weights * valid


def iqr_outliers(attention: torch.Tensor) -> torch.Tensor:
    """(I, N) bool: ``attention > Q3 + 1.5 * IQR`` per image, plus the top patch so that no image keeps nothing."""
    return with_top_patch(strict_iqr_outliers(attention), attention)


def with_top_patch(chosen: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(I, N) bool: ``chosen`` plus each image's top patch by attention (the first maximum: ties to the lower index).

    The top patch is an outlier whenever any patch is, so adding it only matters for images without outliers
    (e.g. uniform attention)."""
    return chosen.scatter(1, attention.argmax(dim=-1, keepdim=True), True)


def strict_iqr_outliers(attention: torch.Tensor) -> torch.Tensor:
    """(I, N) bool: ``attention > Q3 + 1.5 * IQR`` per image (possibly none), quartiles by linear interpolation as
    numpy's default percentile."""
    # Python-float quantiles: a tensor of them would be copied from the host, a sync that breaks CUDA-graph capture.
    first = torch.quantile(attention, 0.25, dim=-1, keepdim=True)  # (I, 1)
    third = torch.quantile(attention, 0.75, dim=-1, keepdim=True)  # (I, 1)
    return attention > third + 1.5 * (third - first)  # (I, N)


def raster_samples(outlier_counts: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(I, N) bool: the released PruMerge+ positions ``0, s, 2s, ... < N - 1``, s = ``(N // outliers) // 3``.

    outlier_counts: (I,) long, the strict IQR outliers of each image (the always-kept top patch aside). None gives
    s = infinity (position 0 only); s = 0 (outlier ratio > 1/3, which IQR outliers cannot reach, at most ~1/4 of
    the values lying above Q3) is clamped to 1. See the module docstring.
    """
    counts = outlier_counts.unsqueeze(-1)  # (I, 1)
    step = torch.where(counts > 0, num_patches // counts.clamp(min=1) // 3, num_patches).clamp(min=1)  # (I, 1)
    positions = torch.arange(num_patches, device=outlier_counts.device)  # (N,)
    return (positions % step == 0) & (positions < num_patches - 1)  # (I, N)


def view_size(grid: tuple[int, int] | None, inputs: CompressionInputs) -> int:
    """Tokens of one view: rows * cols, or all N without a grid (``uniform_lattice`` then raises)."""
    return grid[0] * grid[1] if grid is not None else inputs.num_patches


def uniform_lattice(grid: tuple[int, int] | None, num_patches: int, ratio: float, device) -> torch.Tensor:
    """(N,) bool: the centres of a ``round(rows * sqrt(ratio))`` x ``round(cols * sqrt(ratio))`` lattice of cells."""
    if grid is None or grid[0] * grid[1] != num_patches:
        raise ValueError(f"prumerge_plus sampling='lattice' needs inputs.grid (rows, cols) with rows * cols == "
                         f"{num_patches}, got {grid}")
    rows, cols = grid
    row_samples = min(rows, max(1, round(rows * math.sqrt(ratio))))
    col_samples = min(cols, max(1, round(cols * math.sqrt(ratio))))
    # Cell centres in integer arithmetic: floor((j + 0.5) * size / samples).
    row_ids = (2 * torch.arange(row_samples, device=device) + 1) * rows // (2 * row_samples)  # (R,)
    col_ids = (2 * torch.arange(col_samples, device=device) + 1) * cols // (2 * col_samples)  # (S,)
    raster = (row_ids.unsqueeze(-1) * cols + col_ids).flatten()  # (R * S,)
    return torch.zeros(num_patches, dtype=torch.bool, device=device).index_fill(0, raster, True)
