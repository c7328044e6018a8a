"""The contract every compression method shares: what it reads, what it returns, and small shared helpers.

A method is a pure function ``method(inputs: CompressionInputs, config) -> TokenPlan``. It reads tensors only (no
modules, no hooks, no globals) and returns a *plan*: which original patches each output token stands for and, for
merging methods, the weights with which originals are combined. The model applies the plan to the features, so
that the decision is computed once under ``no_grad`` and gradients still flow through the applied features.

Shapes: ``I`` images in the batch, ``N`` patches per image, ``K`` output tokens per image (padded to the largest
count in the batch), ``C`` feature width, ``A`` width of the attention layer's q/k projections.

Multi-crop images (LLaVA-NeXT anyres): the N tokens of an image are the concatenation of several raster-ordered
*views* (``CompressionInputs.views``: the base view, then the unpadded high-resolution grid), newline tokens
excluded. Such tokens come from several vision-encoder crops, each with its own [CLS], so there is no single
[CLS] query per image: the model then passes the [CLS] attention precomputed per crop (``attention_per_head``,
``attention_joint``) and the patch keys (``keys``) instead of ``cls_query``/``attention_keys``.
"""

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch


@dataclass
class CompressionInputs:
    """What the model hands to a method, all on the model's device.

    features: (I, N, C) the tokens to compress: vision features before the projector for methods of stage
        ``"vision"``, projected features for stage ``"projected"``.
    cls_query: (I, A) query projection of the [CLS] token at the attention layer (all heads concatenated), or None
        when the method does not ask for attention.
    attention_keys: (I, 1 + N, A) key projections at that layer, [CLS] first then the patches in raster order.
    num_heads: number of attention heads of that layer (A = num_heads * head_dim).
    text_scores: (I, N) float32 cosine similarity of each patch to the question of the image's prompt (in
        [-1, 1]), or None when the method does not ask for text guidance.
    guidance_dim: width of the space the cosine was taken in (RC scales scores by 1 / sqrt(guidance_dim)).
    has_text: (I,) bool, False where the prompt has no question (the method must then act vision-only).
    grid: (rows, cols) of the patch grid, rows * cols == N (single-view images).
    views: ((rows, cols), ...) when the N tokens are several raster-ordered views one after another (LLaVA-NeXT:
        base view, then the unpadded high-resolution grid), sum of rows * cols == N; None = the one view ``grid``.
    attention_per_head, attention_joint: (I, N) float32 [CLS] attention computed by the model, as
        ``cls_attention(..., per_head=True)`` and ``(..., per_head=False)`` return it; for multi-crop images each
        token's attention comes from its own crop's [CLS] (softmax over that crop). None: computed from
        ``cls_query``/``attention_keys``.
    keys: (I, N, A) patch keys when ``attention_keys`` is not given (multi-crop images).
    """

    features: torch.Tensor
    cls_query: torch.Tensor | None = None
    attention_keys: torch.Tensor | None = None
    num_heads: int = 1
    text_scores: torch.Tensor | None = None
    guidance_dim: int = 1
    has_text: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    views: tuple[tuple[int, int], ...] | None = None
    attention_per_head: torch.Tensor | None = None
    attention_joint: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return self.features.shape[0]

    @property
    def num_patches(self) -> int:
        return self.features.shape[1]

    @property
    def patch_keys(self) -> torch.Tensor:
        """(I, N, A) key projections of the patches (without [CLS])."""
        return self.keys if self.keys is not None else self.attention_keys[:, 1:]

    @property
    def view_grids(self) -> tuple[tuple[int, int], ...]:
        """The (rows, cols) of each view, in token order: ``views``, or the single ``grid``."""
        return self.views if self.views is not None else (self.grid,)


@dataclass
class TokenPlan:
    """A method's decision for a batch of images.

    source_index: (I, K) long, the original patch each output token stands for (for a merged token, the patch it
        was anchored at); -1 for synthetic tokens that stand for no single patch and for padding past ``counts``.
    counts: (I,) long, how many of the K output tokens are real for each image.
    A merging plan says how originals are combined, in one of two forms (both None: pure selection, output token k
    is features[source_index[k]]):
    - sparse (RC, PruMerge, PruMerge+): ``member_index`` (I, K, M) long and ``member_weights`` (I, K, M) float32,
      output token k = sum_m member_weights[k, m] * features[member_index[k, m]] (M: the most patches one token
      merges, unused entries at weight 0); plus at most one synthetic token per image spread over the whole image,
      ``extra_weights`` (I, N) float32 (all 0 where an image has none), added to row ``extra_row`` (I,) long.
      Memory and work O(K M + N) per image instead of O(K N).
    - dense: ``merge_weights`` (I, K, N) float32, output token k = sum_n merge_weights[k, n] * features[n].
    Rows past ``counts`` are zero.
    """

    source_index: torch.Tensor
    counts: torch.Tensor
    merge_weights: torch.Tensor | None = None
    member_index: torch.Tensor | None = None
    member_weights: torch.Tensor | None = None
    extra_weights: torch.Tensor | None = None
    extra_row: torch.Tensor | None = None

    @property
    def is_selection(self) -> bool:
        """True when every output token is one original patch (no merge)."""
        return self.merge_weights is None and self.member_index is None

    def dense_weights(self, num_patches: int | None = None) -> torch.Tensor | None:
        """(I, K, N) float32 merge weights of a merging plan (the dense form; O(K N) memory), None for a selection.

        num_patches: N; None reads it from ``extra_weights`` (a sparse plan without them needs it).
        """
        if self.merge_weights is not None or self.member_index is None:
            return self.merge_weights
        if num_patches is None:
            num_patches = self.extra_weights.shape[-1]
        num_images, num_slots, _ = self.member_index.shape
        weights = torch.zeros(num_images, num_slots, num_patches, device=self.member_index.device)  # (I, K, N)
        weights.scatter_add_(2, self.member_index, self.member_weights)
        if self.extra_weights is not None and num_slots:
            row = self.extra_row.clamp(max=num_slots - 1).view(num_images, 1, 1).expand(-1, 1, num_patches)
            weights.scatter_add_(1, row, self.extra_weights.unsqueeze(1))
        return weights

    def absorbed_for(self, num_patches: int) -> torch.Tensor:
        """(I, K, N) bool: which original patches contributed to each output token."""
        if not self.is_selection:
            return self.dense_weights(num_patches) != 0
        valid = self.source_index >= 0  # (I, K)
        one_hot = torch.nn.functional.one_hot(self.source_index.clamp(min=0), num_patches).bool()  # (I, K, N)
        return one_hot & valid.unsqueeze(-1)


def resolve_budget(budget: int | float, num_patches: int) -> int:
    """Tokens to keep per image for a budget given as a count (int) or a ratio of the patches (float in (0, 1]).

    A count is clamped to ``num_patches``; a ratio keeps ``floor(ratio * num_patches)`` tokens, at least one.
    """
    if isinstance(budget, bool):
        raise ValueError(f"budget must be an int count or a float ratio, got {budget!r}")
    if isinstance(budget, numbers.Integral):
        return max(1, min(int(budget), num_patches))
    return max(1, min(num_patches, math.floor(budget * num_patches + 1e-9)))


def validate_budget(budget, *, allow_none: bool = True) -> None:
    """Raise ValueError unless ``budget`` is None (when allowed), an int >= 1, or a float in (0, 1]."""
    if budget is None and allow_none:
        return
    if isinstance(budget, bool) or not isinstance(budget, (numbers.Integral, numbers.Real)):
        raise ValueError(f"budget must be an int >= 1 (tokens per image) or a float in (0, 1] (ratio), got {budget!r}")
    if isinstance(budget, numbers.Integral) and budget < 1:
        raise ValueError(f"budget as a token count must be >= 1, got {budget}")
    if not isinstance(budget, numbers.Integral) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a ratio must be in (0, 1], got {budget}")


def cls_attention(inputs: CompressionInputs, per_head: bool = True) -> torch.Tensor:
    """(I, N) float32 attention of [CLS] to each patch, recomputed from the stored q/k projections.

    per_head=True: softmax per head, then the mean over heads (the layer's own attention, as FasterVLM reads it).
    per_head=False: a single softmax over all heads concatenated, scaled by sqrt(A) (as RC's released code does).
    The softmax runs over [CLS] and the patches; the [CLS] column is dropped afterwards. When the model precomputed
    the attention (``inputs.attention_per_head``/``attention_joint``, multi-crop images), that is returned.
    """
    precomputed = inputs.attention_per_head if per_head else inputs.attention_joint
    if precomputed is not None:
        return precomputed.float()
    query = inputs.cls_query.float()  # (I, A)
    keys = inputs.attention_keys.float()  # (I, 1 + N, A)
    if per_head:
        num_images, num_tokens, width = keys.shape
        head_dim = width // inputs.num_heads
        query = query.view(num_images, inputs.num_heads, 1, head_dim)  # (I, H, 1, d)
        keys = keys.view(num_images, num_tokens, inputs.num_heads, head_dim).transpose(1, 2)  # (I, H, 1 + N, d)
        logits = (query @ keys.transpose(-1, -2)).squeeze(-2) / math.sqrt(head_dim)  # (I, H, 1 + N)
        attention = logits.softmax(dim=-1).mean(dim=1)  # (I, 1 + N)
    else:
        logits = torch.einsum("ia,ina->in", query, keys) / math.sqrt(keys.shape[-1])  # (I, 1 + N)
        attention = logits.softmax(dim=-1)
    return attention[:, 1:]


def select_plan(scores: torch.Tensor, count: int) -> TokenPlan:
    """Keep the ``count`` highest-scoring patches of every image, returned in raster order.

    scores: (I, N) float; count: tokens kept per image (a fixed budget, known on the host: no sync). Ties are
    broken towards the lower patch index, so the result is deterministic and does not depend on the other images.
    """
    chosen = stable_descending_order(scores)[:, :count]  # (I, K) the top ``count`` in stable descending order
    source_index = chosen.sort(dim=-1).values  # (I, K) read back in raster order
    counts = torch.full(scores.shape[:1], source_index.shape[1], dtype=torch.long, device=scores.device)  # (I,)
    return TokenPlan(source_index=source_index, counts=counts)


def select_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """(I, N) bool marking the ``count`` highest-scoring patches of every image (ties: lower index first)."""
    num_images, num_patches = scores.shape
    order = stable_descending_order(scores)  # (I, N)
    rank_valid = (torch.arange(num_patches, device=scores.device) < count).expand(num_images, num_patches)
    return torch.zeros_like(rank_valid).scatter(1, order, rank_valid)  # (I, N) bool


def stable_topk_indices(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """(..., k) indices of the ``k`` largest (or smallest) values along the last dim, in stable-sort order.

    values: (..., N) float, compared in float32. Returns exactly
    ``sort(values.float(), descending=largest, stable=True).indices[..., :k]``
    (equal values in ascending index order; -0.0 equals 0.0; no NaN expected) at the cost of a top-k instead of a
    full sort: each float becomes an order-preserving integer (its IEEE bits, magnitude bits flipped for negatives)
    with the index in the low digits as the tie-break, so every key is unique and ``topk`` has no ties to break.
    """
    num_values = values.shape[-1]
    bits = (values.float() + 0.0).view(torch.int32)  # (..., N); + 0.0 turns -0.0 into 0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # (..., N) same order as the floats: negatives' magnitude flipped
    if largest:  # lower index first
        tie_break = torch.arange(num_values - 1, -1, -1, device=values.device)  # (N,)
    else:
        tie_break = torch.arange(num_values, device=values.device)  # (N,)
    keys = torch.add(tie_break, ordered, alpha=num_values)  # (..., N) unique int64 keys: ordered * N + tie_break
    return keys.topk(k, dim=-1, largest=largest, sorted=True).indices


def stable_descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(I, N) patch indices sorted by descending score, ties in ascending index order."""
    return torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices


def plan_from_mask(chosen: torch.Tensor, max_count: int | None = None) -> TokenPlan:
    """A selection plan keeping the patches where ``chosen`` (I, N) is True, in raster order."""
    num_images, num_patches = chosen.shape
    counts = chosen.sum(dim=-1)  # (I,)
    if max_count is None:
        max_count = int(counts.max()) if num_images else 0
    positions = torch.arange(num_patches, device=chosen.device).expand(num_images, num_patches)
    # Chosen patches sort first (key = index), unchosen last (key = index + N); the first max_count are the answer.
    keys = torch.where(chosen, positions, positions + num_patches)
    source_index = keys.sort(dim=-1).values[:, :max_count]  # (I, K)
    source_index = torch.where(source_index < num_patches, source_index, torch.full_like(source_index, -1))
    return TokenPlan(source_index=source_index, counts=counts)


def apply_plan(features: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """(I, K, C) output tokens of a plan, in the dtype of ``features``; rows past ``counts`` are zero.

    Merges are summed in float32. A sparse plan costs O(K M C + N C) per image (no (I, K, N) matrix): one weighted
    ``embedding_bag`` over the members, one matrix-vector product for the extra token.
    """
    if plan.member_index is not None:
        num_images, num_patches, width = features.shape
        num_slots, num_members = plan.member_index.shape[1:]
        table = features.float().flatten(0, 1)  # (I * N, C)
        offsets = torch.arange(0, num_images * num_patches, num_patches, device=features.device)  # (I,)
        rows = plan.member_index + offsets.view(-1, 1, 1)  # (I, K, M) rows of the flattened table
        merged = torch.nn.functional.embedding_bag(
            rows.view(-1, num_members), table, per_sample_weights=plan.member_weights.reshape(-1, num_members),
            mode="sum",
        ).view(num_images, num_slots, width)  # (I, K, C)
        if plan.extra_weights is not None and num_slots:
            extra = torch.bmm(plan.extra_weights.unsqueeze(1), features.float())  # (I, 1, C)
            row = plan.extra_row.clamp(max=num_slots - 1).view(-1, 1, 1).expand(-1, 1, width)  # (I, 1, C)
            merged = merged.scatter_add(1, row, extra)
        return merged.to(features.dtype)
    if plan.merge_weights is not None:
        merged = torch.bmm(plan.merge_weights.to(torch.float32), features.float())  # (I, K, C)
        return merged.to(features.dtype)
    index = plan.source_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, features.shape[-1])  # (I, K, C)
    gathered = features.gather(1, index)
    return gathered * (plan.source_index >= 0).unsqueeze(-1).to(features.dtype)


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's validated settings. Subclasses are frozen dataclasses, one field per setting.

    Class attributes tell the model what the method needs:
    stage: ``"vision"`` compresses the vision features before the projector, ``"projected"`` after it.
    needs_attention: whether ``CompressionInputs.cls_query``/``attention_keys`` must be computed.
    Methods guided by text carry a ``guidance`` field (``GUIDANCE_CHOICES`` or None; the model resolves
    ``"auto"`` with ``resolve_guidance`` before planning).
    """

    method = "none"
    stage = "vision"
    needs_attention = False

    @property
    def guidance_source(self) -> str | None:
        """``"llm"``/``"clip"`` (``"auto"`` before the model resolves it) when the method reads ``text_scores``, else
        None."""
        return getattr(self, "guidance", None)

    def fixed_count(self, views: tuple[tuple[int, int], ...]) -> int | None:
        """Tokens the method keeps of an image whose patches form ``views`` ((rows, cols), ...), when the settings
        alone fix it (a ``budget``: ``resolve_budget(budget, M)``, M the views' tokens), else None (adaptive).

        The model uses it to learn the rebuilt sequence width on the host (no device read); a method whose counts
        are fixed in another way overrides it.
        """
        budget = getattr(self, "budget", None)
        if budget is None:
            return None
        return resolve_budget(budget, sum(rows * cols for rows, cols in views))

    def to_dict(self) -> dict:
        return {"method": self.method, **{name: getattr(self, name) for name in self.__dataclass_fields__}}


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError naming ``name``, the bad ``value`` and the allowed values (also for an unhashable value such
    as a list, which a set of choices cannot even look up)."""
    try:
        valid = value in allowed
    except TypeError:  # unhashable
        valid = False
    if not valid:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def check_range(name: str, value, low=None, high=None, *, integer: bool = False) -> None:
    """Raise ValueError unless ``low <= value <= high`` (and an int when ``integer``; finite in any case)."""
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # an int may not even fit a float
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


# Where a text-guided method embeds the question (docs/methods.md, "Text guidance"): "auto" (the default) is "clip"
# on a model with CLIP's text tower and no text guidance otherwise; "llm" (the LLM's input embeddings) is an option.
GUIDANCE_CHOICES = ("auto", "llm", "clip")


def resolve_guidance(config: MethodConfig, has_clip_tower: bool) -> MethodConfig:
    """``config`` with ``guidance="auto"`` made concrete: ``"clip"`` where the model has CLIP's text tower, else None
    (the method runs without text guidance). Any other value, and a method without guidance, is returned as is."""
    if getattr(config, "guidance", None) != "auto":
        return config
    return dataclasses.replace(config, guidance="clip" if has_clip_tower else None)
