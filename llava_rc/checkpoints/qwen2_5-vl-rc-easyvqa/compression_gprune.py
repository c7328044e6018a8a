"""G-Prune: keep the projected tokens that collect the most information over a similarity graph (arXiv 2501.02268).

Steps, on each image's projected tokens F (N, D):
1. Graph: cosine similarity between tokens; pairs below ``similarity_threshold`` (0.5) are not edges. Every token
   keeps its self-loop (cos(i, i) = 1), so no node is isolated.
2. Transition matrix P: the kept edges' similarities divided by ``temperature`` (0.03), softmax over each row's
   edges (non-edges get probability 0).
3. Propagation: start from the token norms w_i = ||F_i||_2 and take ``steps`` (5) steps, s = w^T P^steps.
4. Score s_j / degree_j, with degree_j the number of edges of node j (self-loop included): information a token
   collects from many neighbours is discounted, so tokens in large redundant regions score lower.
5. Keep the top ``keep_ratio`` (0.5 in the released code) in their original order. No merging.

Budget: ``budget``, when set, overrides ``keep_ratio`` (which is then ignored); either way the count per image is
exactly ``resolve_budget(..., N)`` for a single-view image.

LLaVA-NeXT (anyres), as the paper runs it: one graph per view (``inputs.views``: the base view, then the unpadded
high-resolution grid; newline tokens are in no graph, the model keeps all of them), each view ranked on its own
graph. A ratio (``keep_ratio`` or a float ``budget``) applies to each graph: ``resolve_budget(ratio, n_v)`` tokens
of view ``v``. An int ``budget`` B is one count per image, ``T = resolve_budget(B, N)``, split over the views in
proportion to their sizes by cumulative floors (view ``v`` gets ``floor(T * S_v / N) - floor(T * S_{v-1} / N)``,
``S_v`` the tokens of views ``0..v``), so the counts sum to ``T``. Kept tokens come out in view order, raster order
within a view. (The paper also keeps the original position ids; here positions are renumbered over the shortened
sequence, as for every other method.)
"""

from dataclasses import dataclass

import torch

from .compression_common import CompressionInputs, MethodConfig, TokenPlan, check_range, plan_from_mask, resolve_budget
from .compression_common import select_mask, select_plan, validate_budget


# The most propagation steps accepted: the paper takes 5; a bound keeps a typo (10**12) from looping for ever.
MAX_STEPS = 100


@dataclass(frozen=True)
class GPruneConfig(MethodConfig):
    """Settings of ``"gprune"``.

    keep_ratio: fraction of the tokens kept per image, in (0, 1] (0.5 in the released code).
    budget: None to use ``keep_ratio``; else tokens kept per image, an int count or a float ratio, overriding
        ``keep_ratio``.
    similarity_threshold: cosine similarity at or above which two tokens are joined by an edge, in [-1, 1].
    temperature: divides the edge similarities before the row softmax; > 0 (smaller is sharper).
    steps: propagation steps, the power of the transition matrix; in [1, ``MAX_STEPS``] (each step is one
        matrix-vector product per image, run in a loop).
    """

    method = "gprune"
    stage = "projected"
    needs_attention = False

    keep_ratio: float = 0.5
    budget: int | float | None = None
    similarity_threshold: float = 0.5
    temperature: float = 0.03
    steps: int = 5

    def __post_init__(self):
        ratio = self.keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {ratio!r}")
        validate_budget(self.budget, allow_none=True)
        check_range("similarity_threshold", self.similarity_threshold, -1.0, 1.0)
        check_range("temperature", self.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        check_range("steps", self.steps, 1, MAX_STEPS, integer=True)

    def fixed_count(self, views: tuple[tuple[int, int], ...]) -> int:
        """Always fixed: ``keep_ratio`` (or ``budget``) per graph, one graph per view (see ``view_counts``)."""
        return sum(view_counts(self, [rows * cols for rows, cols in views]))


@torch.no_grad()
def compress_gprune(inputs: CompressionInputs, config: GPruneConfig) -> TokenPlan:
    """Plan keeping the tokens with the highest propagated-norm-per-degree score.

    inputs.features: (I, N, D) projected tokens; inputs.views: one graph per view (None: one graph).
    Returns a selection plan with K = resolve_budget(budget or keep_ratio, N) tokens per image for one view (the
    per-view counts of the module docstring for several), in original order.
    """
    if inputs.views is None:
        scores = graph_scores(inputs.features, config.similarity_threshold, config.temperature, config.steps)
        # keep_ratio is always a ratio, even when written as the int 1.
        budget = float(config.keep_ratio) if config.budget is None else config.budget
        return select_plan(scores, resolve_budget(budget, inputs.num_patches))
    sizes = [rows * cols for rows, cols in inputs.views]
    if sum(sizes) != inputs.num_patches:
        raise ValueError(f"gprune: views {inputs.views} hold {sum(sizes)} tokens, the features {inputs.num_patches}")
    counts = view_counts(config, sizes)
    chosen = []
    for view_features, count in zip(inputs.features.split(sizes, dim=1), counts):  # one graph per view
        scores = graph_scores(view_features, config.similarity_threshold, config.temperature, config.steps)
        chosen.append(select_mask(scores, count))  # (I, n_v)
    return plan_from_mask(torch.cat(chosen, dim=1), sum(counts))


def view_counts(config: GPruneConfig, sizes: list[int]) -> list[int]:
    """Tokens kept in each view (see the module docstring): a ratio per graph, an int count split by view size."""
    return split_budget(float(config.keep_ratio) if config.budget is None else config.budget, sizes)


def split_budget(budget: int | float, sizes: list[int]) -> list[int]:
    """Tokens kept in each of the views of ``sizes`` tokens: a float ratio applies to each view on its own
    (``resolve_budget(ratio, n_v)``); an int count ``T = resolve_budget(budget, sum(sizes))`` is split in
    proportion to the view sizes by cumulative floors, so the counts sum to ``T``."""
    if isinstance(budget, float):
        return [resolve_budget(budget, size) for size in sizes]
    total_size = sum(sizes)
    total = resolve_budget(budget, total_size)
    ends = [total * sum(sizes[: index + 1]) // total_size for index in range(len(sizes))]
    return [end - start for start, end in zip([0, *ends[:-1]], ends)]


# Bytes of float32 transition rows G-Prune holds at once: half for the chunk being built, half for rows kept across
# steps. The graph is never materialised whole, so memory stays about this budget plus O(N) whatever N is (the dense
# (N, N) graph and its temporaries took about 565 MB at N = 5,760).
GRAPH_MEMORY_BYTES = 56 * 2**20


def graph_scores(features: torch.Tensor, threshold: float, temperature: float, steps: int) -> torch.Tensor:
    """(I, N) float32 G-Prune score of each token: (w^T P^steps)_j / degree_j, with w the token norms.

    The transition matrix P is built in chunks of rows (each row's softmax needs only that row): cosine similarity
    as one float32 matmul of the chunk against all tokens, scaled by the inverse norms. Each step is a vector-matrix
    product accumulated over the chunks; chunks are kept for the later steps while they fit in
    ``GRAPH_MEMORY_BYTES`` and recomputed otherwise (identical numbers: the same matmuls of the same shapes), so the
    peak memory is bounded for any N and a graph that fits is built by a single pass of matmuls.
    """
    num_images, num_tokens, _ = features.shape
    device = features.device
    features = features.float()  # (I, N, D); no copy for float32 features
    norms = torch.linalg.vector_norm(features, dim=-1)  # (I, N)
    inverse_norms = 1.0 / norms.clamp(min=1e-12)  # (I, N), as ``normalize``'s eps
    row_bytes = num_images * num_tokens * 4  # one float32 row of P per image
    # A chunk needs at most four (I, R, N) float32 buffers while it is built (matmul, softmax, edges, slack).
    chunk_rows = max(1, min(num_tokens, GRAPH_MEMORY_BYTES // 2 // (4 * row_bytes)))
    starts = range(0, num_tokens, chunk_rows)
    kept_rows = max(0, GRAPH_MEMORY_BYTES // 2 // row_bytes)  # rows of P kept across steps (half the budget)
    token_index = torch.arange(num_tokens, device=device)  # (N,)

    def transition_rows(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((I, R, N) rows start..start + R of P, (I, N) edges of those rows ending at each node)."""
        rows = slice(start, start + chunk_rows)
        similarity = features[:, rows] @ features.transpose(1, 2)  # (I, R, N)
        similarity.mul_(inverse_norms[:, rows].unsqueeze(-1)).mul_(inverse_norms.unsqueeze(1))  # cosine
        self_loops = token_index[rows].unsqueeze(-1) == token_index  # (R, N)
        edges = (similarity >= threshold) | self_loops  # (I, R, N)
        logits = similarity.div_(temperature).masked_fill_(~edges, float("-inf"))  # in place: one buffer
        return logits.softmax(dim=-1), edges.sum(dim=1)  # rows sum to 1; (I, N)

    signal = norms  # (I, N)
    if chunk_rows == num_tokens:  # the whole graph fits in one chunk: build it once, then vector-matrix products
        transition, degree = transition_rows(0)  # (I, N, N), (I, N)
        signal = signal.unsqueeze(1)  # (I, 1, N)
        for _ in range(steps):
            signal = signal @ transition  # (I, 1, N)
        return signal.squeeze(1) / degree
    degree = torch.zeros(num_images, num_tokens, dtype=torch.long, device=device)  # (I, N): edges ending at a node
    cache: dict[int, torch.Tensor] = {}
    for step in range(steps):
        propagated = torch.zeros_like(signal)  # (I, N)
        for start in starts:
            transition = cache.get(start)
            if transition is None:
                transition, edges_in = transition_rows(start)
                if step == 0:
                    degree += edges_in
                    if start + transition.shape[1] <= kept_rows:
                        cache[start] = transition
            chunk_signal = signal[:, start : start + transition.shape[1]].unsqueeze(1)  # (I, 1, R)
            propagated += (chunk_signal @ transition).squeeze(1)  # (I, N)
        signal = propagated
    return signal / degree
