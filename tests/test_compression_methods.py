"""Property and reference tests of the compression methods, one matrix row per (method, settings).

Every method is checked against a reference written here from its paper's description with plain per-image,
per-token Python loops, then for batch invariance, determinism, exact counts under a fixed budget, bfloat16
features and validation errors. Adding a method means adding rows to CASES, a reference to REFERENCES, and
rows to BUDGETED and INVALID.
"""

import math
import re

import pytest
import torch

from llava_rc.compression_common import CompressionInputs, TokenPlan, apply_plan, cls_attention, resolve_budget
from llava_rc.compression_registry import METHODS, method_function, parse_compression


def make_inputs(num_images=3, grid=(6, 8), channels=16, num_heads=2, head_dim=8, seed=0, dtype=torch.float32):
    """Random inputs whose features form a few clusters (so similarity graphs have edges); the last image has no
    question."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = grid
    num_patches = rows * cols
    width = num_heads * head_dim
    centres = 1.5 * torch.randn(num_images, 4, channels, generator=generator)  # (I, 4, C)
    membership = torch.randint(0, 4, (num_images, num_patches), generator=generator)  # (I, N)
    features = centres.gather(1, membership.unsqueeze(-1).expand(-1, -1, channels))  # (I, N, C)
    features = features + torch.randn(num_images, num_patches, channels, generator=generator)
    return CompressionInputs(
        features=features.to(dtype),
        cls_query=torch.randn(num_images, width, generator=generator).to(dtype),
        attention_keys=torch.randn(num_images, 1 + num_patches, width, generator=generator).to(dtype),
        num_heads=num_heads,
        text_scores=torch.rand(num_images, num_patches, generator=generator) * 2 - 1,
        guidance_dim=width,
        has_text=torch.arange(num_images) < num_images - 1,
        grid=grid,
    )


def image_inputs(inputs: CompressionInputs, index: int) -> CompressionInputs:
    """The batch of one image ``index`` of ``inputs``."""
    one = slice(index, index + 1)
    return CompressionInputs(
        features=inputs.features[one],
        cls_query=inputs.cls_query[one],
        attention_keys=inputs.attention_keys[one],
        num_heads=inputs.num_heads,
        text_scores=inputs.text_scores[one],
        guidance_dim=inputs.guidance_dim,
        has_text=inputs.has_text[one],
        grid=inputs.grid,
    )


def plan_for(name: str, settings: dict, inputs: CompressionInputs) -> TokenPlan:
    config = parse_compression({"method": name, **settings})
    return method_function(config)(inputs, config)


# ---------------------------------------------------------------------------------------------------------------
# References: plain loops over images and tokens, from the papers' descriptions.
# Each returns, per image, the kept patch indices in output order and the output tokens (K_i, C) in float64.
# ---------------------------------------------------------------------------------------------------------------


def descending(values: list[float]) -> list[int]:
    """Indices by descending value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda n: (-values[n], n))


def cosine_table(vectors: torch.Tensor) -> list[list[float]]:
    rows = [[float(x) for x in vector] for vector in vectors]
    norms = [max(math.sqrt(sum(x * x for x in row)), 1e-12) for row in rows]
    return [
        [sum(x * y for x, y in zip(rows[p], rows[q])) / (norms[p] * norms[q]) for q in range(len(rows))]
        for p in range(len(rows))
    ]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """numpy's default (linear) percentile."""
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def lattice_points(grid, ratio) -> set[int]:
    rows, cols = grid
    row_samples = min(rows, max(1, round(rows * math.sqrt(ratio))))
    col_samples = min(cols, max(1, round(cols * math.sqrt(ratio))))
    return {
        math.floor((r + 0.5) * rows / row_samples) * cols + math.floor((c + 0.5) * cols / col_samples)
        for r in range(row_samples)
        for c in range(col_samples)
    }


def raster_points(attention: list[float], num_patches: int) -> set[int]:
    """PruMerge+'s released raster rule with its defined edge cases (see compression_prumerge)."""
    ordered = sorted(attention)
    first, third = percentile(ordered, 0.25), percentile(ordered, 0.75)
    outliers = sum(a > third + 1.5 * (third - first) for a in attention)
    step = max(1, (num_patches // outliers) // 3) if outliers else num_patches
    return set(range(0, num_patches - 1, step))


def reference_prumerge(inputs, config):
    """IQR outliers (+ samples for PruMerge+) of [CLS] attention, each merged with its nearest keys, + extra token."""
    plus = config.method == "prumerge_plus"
    attention_batch = cls_attention(inputs, per_head=config.attention == "per_head")
    results = []
    for image in range(inputs.num_images):
        attention = [float(a) for a in attention_batch[image]]
        num_patches = len(attention)
        ranked = descending(attention)
        ordered = sorted(attention)
        first, third = percentile(ordered, 0.25), percentile(ordered, 0.75)
        chosen = {n for n in range(num_patches) if attention[n] > third + 1.5 * (third - first)} | {ranked[0]}
        if plus:
            if config.sampling == "raster":
                chosen |= raster_points(attention, num_patches)
            else:
                chosen |= lattice_points(inputs.grid, config.uniform_ratio)
        extra = config.extra_token
        if config.budget is not None:
            keep = resolve_budget(config.budget, num_patches)
            extra = extra and 2 <= keep < num_patches
            if plus:
                ranked = [n for n in ranked if n in chosen] + [n for n in ranked if n not in chosen]
            chosen = set(ranked[: keep - extra])
        extra = extra and len(chosen) < num_patches
        neighbours = config.merge_neighbors
        if config.neighbors_ratio is not None:
            neighbours = max(1, round(config.neighbors_ratio * num_patches))
        similarity = cosine_table(inputs.patch_keys[image].float())
        features = inputs.features[image].double()
        tokens = []
        for anchor in sorted(chosen):
            others = sorted((n for n in range(num_patches) if n != anchor), key=lambda n: (-similarity[anchor][n], n))
            nearest = others[:neighbours] if config.merge != "none" else []
            if config.merge == "average":
                members = [anchor] + nearest
                total = sum(attention[m] for m in members)
                tokens.append(sum(attention[m] / total * features[m] for m in members))
            else:
                tokens.append(features[anchor] + sum((attention[m] * features[m] for m in nearest), 0 * features[0]))
        if extra:
            tokens.append(sum(attention[n] * features[n] for n in range(num_patches) if n not in chosen))
        results.append((sorted(chosen) + [-1] * extra, torch.stack(tokens)))
    return results


def reference_cls_attention(inputs, config):
    """Top-budget patches by the mean of the per-head [CLS] softmaxes (one view)."""
    attention_batch = cls_attention(inputs, per_head=True)
    results = []
    for image in range(inputs.num_images):
        attention = [float(a) for a in attention_batch[image]]
        kept = sorted(descending(attention)[: resolve_budget(config.budget, len(attention))])
        features = inputs.features[image].double()
        results.append((kept, torch.stack([features[n] for n in kept])))
    return results


def reference_gprune(inputs, config):
    """Norms propagated over the thresholded, temperature-softmaxed cosine graph, divided by the degree."""
    budget = float(config.keep_ratio) if config.budget is None else config.budget
    results = []
    for image in range(inputs.num_images):
        features = inputs.features[image].double()
        num_patches = features.shape[0]
        similarity = cosine_table(features)
        edges = [[p == q or similarity[p][q] >= config.similarity_threshold for q in range(num_patches)] for p in
                 range(num_patches)]
        transition = []
        for p in range(num_patches):
            top = max(similarity[p][q] for q in range(num_patches) if edges[p][q])
            weights = [math.exp((similarity[p][q] - top) / config.temperature) if edges[p][q] else 0.0
                       for q in range(num_patches)]
            transition.append([w / sum(weights) for w in weights])
        signal = [math.sqrt(sum(float(x) ** 2 for x in features[p])) for p in range(num_patches)]
        for _ in range(config.steps):
            signal = [sum(signal[p] * transition[p][q] for p in range(num_patches)) for q in range(num_patches)]
        degree = [sum(edges[p][q] for p in range(num_patches)) for q in range(num_patches)]
        scores = [signal[q] / degree[q] for q in range(num_patches)]
        kept = sorted(descending(scores)[: resolve_budget(budget, num_patches)])
        results.append((kept, torch.stack([features[n] for n in kept])))
    return results


def reference_trsm(inputs, config):
    """Top-budget by text score (feature norm without a question); with merge="nearest" the rest join their most
    similar kept token."""
    results = []
    for image in range(inputs.num_images):
        features = inputs.features[image].double()
        num_patches = features.shape[0]
        if inputs.has_text[image]:
            ranking = [float(s) for s in inputs.text_scores[image]]
        else:
            ranking = [math.sqrt(sum(float(x) ** 2 for x in features[n])) for n in range(num_patches)]
        kept = sorted(descending(ranking)[: resolve_budget(config.budget, num_patches)])
        clusters = {anchor: [anchor] for anchor in kept}
        if config.merge == "nearest":
            similarity = cosine_table(inputs.features[image].float())
            for n in range(num_patches):
                if n not in clusters:
                    nearest = max(kept, key=lambda anchor: (similarity[n][anchor], -anchor))
                    clusters[nearest].append(n)
        tokens = [sum(features[m] for m in clusters[anchor]) / len(clusters[anchor]) for anchor in kept]
        results.append((kept, torch.stack(tokens)))
    return results


REFERENCES = {
    "cls_attention": reference_cls_attention,
    "prumerge": reference_prumerge,
    "prumerge_plus": reference_prumerge,
    "gprune": reference_gprune,
    "trsm": reference_trsm,
}

CASES = [
    ("cls_attention", {}),
    ("cls_attention", {"budget": 7, "attention_layer": "consuming", "budget_scope": "image"}),
    ("prumerge", {}),
    ("prumerge", {"merge_neighbors": 5}),
    ("prumerge", {"budget": 7}),
    ("prumerge", {"merge": "average", "attention": "per_head", "extra_token": False}),
    ("prumerge", {"merge": "none", "budget": 0.2}),
    ("prumerge", {"neighbors_ratio": 0.1, "merge": "average"}),
    ("prumerge_plus", {}),
    ("prumerge_plus", {"budget": 0.3, "sampling": "lattice", "uniform_ratio": 0.1, "merge_neighbors": 4}),
    ("prumerge_plus", {"budget": 4}),
    ("prumerge_plus", {"sampling": "lattice", "merge": "average", "extra_token": False}),
    ("gprune", {}),
    ("gprune", {"keep_ratio": 0.3, "similarity_threshold": 0.3, "temperature": 0.1, "steps": 2}),
    ("gprune", {"budget": 9}),
    ("trsm", {}),
    ("trsm", {"budget": 6, "guidance": "clip"}),
    ("trsm", {"budget": 0.25, "merge": "nearest"}),
]
CASE_IDS = [name + "".join(f"-{key}={value}" for key, value in settings.items()) for name, settings in CASES]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=CASE_IDS)
def test_matches_reference(name, settings):
    inputs = make_inputs(seed=len(CASE_IDS[CASES.index((name, settings))]))
    plan = plan_for(name, settings, inputs)
    output = apply_plan(inputs.features, plan)
    expected = REFERENCES[name](inputs, parse_compression({"method": name, **settings}))
    for image, (kept, tokens) in enumerate(expected):
        count = int(plan.counts[image])
        assert plan.source_index[image, :count].tolist() == kept
        assert (plan.source_index[image, count:] == -1).all()
        torch.testing.assert_close(output[image, :count].double(), tokens, rtol=1e-5, atol=1e-6)
        assert (output[image, count:] == 0).all()


@pytest.mark.parametrize(("name", "settings"), CASES, ids=CASE_IDS)
def test_batch_invariance(name, settings):
    inputs = make_inputs(num_images=4, seed=1)
    plan = plan_for(name, settings, inputs)
    output = apply_plan(inputs.features, plan)
    for image in range(inputs.num_images):
        single = plan_for(name, settings, image_inputs(inputs, image))
        count = int(plan.counts[image])
        assert int(single.counts[0]) == count
        assert torch.equal(single.source_index[0, :count], plan.source_index[image, :count])
        single_output = apply_plan(inputs.features[image : image + 1], single)
        torch.testing.assert_close(single_output[0, :count], output[image, :count], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "settings"), CASES, ids=CASE_IDS)
def test_deterministic(name, settings):
    inputs = make_inputs(seed=2)
    first, second = plan_for(name, settings, inputs), plan_for(name, settings, inputs)
    assert torch.equal(first.source_index, second.source_index)
    assert torch.equal(first.counts, second.counts)
    assert first.is_selection == second.is_selection
    if not first.is_selection:
        num_patches = inputs.num_patches
        assert torch.equal(first.dense_weights(num_patches), second.dense_weights(num_patches))


@pytest.mark.parametrize(("name", "settings"), CASES, ids=CASE_IDS)
def test_bfloat16_features(name, settings):
    """bf16 in, bf16 out; the plan equals the float32 plan of the same (bf16-representable) values."""
    inputs = make_inputs(seed=3, dtype=torch.bfloat16)
    upcast = CompressionInputs(
        **{**vars(inputs), "features": inputs.features.float(), "cls_query": inputs.cls_query.float(),
           "attention_keys": inputs.attention_keys.float()}
    )
    plan, reference_plan = plan_for(name, settings, inputs), plan_for(name, settings, upcast)
    assert torch.equal(plan.source_index, reference_plan.source_index)
    output = apply_plan(inputs.features, plan)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, apply_plan(upcast.features, reference_plan).to(torch.bfloat16))


BUDGETED = [("cls_attention", "budget"), ("prumerge", "budget"), ("prumerge_plus", "budget"), ("gprune", "budget"), ("gprune", "keep_ratio"),
            ("trsm", "budget"), ("random", "budget")]
BUDGETS = [(1, (4, 4)), (5, (4, 4)), (16, (4, 4)), (100, (4, 4)), (0.25, (6, 6)), (1.0, (8, 8)), (0.3, (12, 12)),
           (0.05, (12, 12))]


@pytest.mark.parametrize(("name", "field"), BUDGETED)
def test_fixed_budget_gives_exact_counts(name, field):
    for budget, grid in BUDGETS:
        if field == "keep_ratio" and isinstance(budget, int):
            continue
        inputs = make_inputs(grid=grid, seed=4)
        plan = plan_for(name, {field: budget}, inputs)
        keep = resolve_budget(budget, grid[0] * grid[1])
        assert plan.counts.tolist() == [keep] * inputs.num_images, (budget, grid)
        assert plan.source_index.shape == (inputs.num_images, keep)
        # PruMerge(+)'s extra token (source -1) is the last of the budget when 2 <= keep < N.
        extra = name.startswith("prumerge") and 2 <= keep < grid[0] * grid[1]
        patches = plan.source_index[:, : keep - extra]
        assert (patches >= 0).all()
        assert (patches.diff(dim=-1) > 0).all()  # raster order, no repeats
        assert (plan.source_index[:, keep - extra :] == -1).all()


INVALID = [
    ("prumerge", {"budget": 0}, "budget", "0"),
    ("prumerge", {"budget": 1.5}, "budget", "1.5"),
    ("prumerge", {"merge_neighbors": -1}, "merge_neighbors", "-1"),
    ("prumerge", {"merge_neighbors": 2.5}, "merge_neighbors", "2.5"),
    ("prumerge", {"cls_attention_layer": "last"}, "cls_attention_layer", "'last'"),
    ("prumerge_plus", {"uniform_ratio": 0.0}, "uniform_ratio", "0.0"),
    ("prumerge_plus", {"uniform_ratio": 1.5}, "uniform_ratio", "1.5"),
    ("gprune", {"keep_ratio": 0}, "keep_ratio", "0"),
    ("gprune", {"keep_ratio": 2.0}, "keep_ratio", "2.0"),
    ("gprune", {"budget": -3}, "budget", "-3"),
    ("gprune", {"similarity_threshold": 2.0}, "similarity_threshold", "2.0"),
    ("gprune", {"temperature": 0.0}, "temperature", "0.0"),
    ("gprune", {"steps": 0}, "steps", "0"),
    ("trsm", {"guidance": "bert"}, "guidance", "'bert'"),
    ("trsm", {"budget": None}, "budget", "None"),
    ("trsm", {"budget": True}, "budget", "True"),
    ("random", {"budget": 0}, "budget", "0"),
    ("random", {"seed": -1}, "seed", "-1"),
    ("prumerge", {"merge": "mean"}, "merge", "'mean'"),
    ("prumerge", {"attention": "heads"}, "attention", "'heads'"),
    ("prumerge", {"neighbors_ratio": 0.0}, "neighbors_ratio", "0.0"),
    ("prumerge", {"neighbors_ratio": 1.5}, "neighbors_ratio", "1.5"),
    ("prumerge", {"extra_token": 1}, "extra_token", "1"),
    ("prumerge_plus", {"sampling": "grid"}, "sampling", "'grid'"),
    ("cls_attention", {"attention_layer": "last"}, "attention_layer", "'last'"),
    ("cls_attention", {"budget_scope": "crop"}, "budget_scope", "'crop'"),
    ("trsm", {"merge": "average"}, "merge", "'average'"),
]


@pytest.mark.parametrize(("name", "settings", "field", "shown"), INVALID, ids=[f"{row[0]}-{row[2]}" for row in INVALID])
def test_invalid_settings_raise(name, settings, field, shown):
    with pytest.raises(ValueError, match=rf"{field}.*{re.escape(shown)}"):
        parse_compression({"method": name, **settings})


@pytest.mark.parametrize("name", ["cls_attention", "prumerge", "prumerge_plus", "gprune", "trsm", "random"])
def test_registry_round_trip(name):
    config = parse_compression({"method": name})
    assert isinstance(config, METHODS[name][0]) and config.method == name
    assert method_function(config) is METHODS[name][1]
    assert parse_compression(config.to_dict()) == config


def test_config_flags():
    assert parse_compression({"method": "prumerge"}).needs_attention
    assert parse_compression({"method": "prumerge_plus"}).stage == "vision"
    gprune = parse_compression({"method": "gprune"})
    assert gprune.stage == "projected" and not gprune.needs_attention and gprune.guidance_source is None
    trsm = parse_compression({"method": "trsm", "guidance": "clip"})
    assert trsm.guidance_source == "clip" and not trsm.needs_attention


def test_prumerge_without_outliers_keeps_the_top_patch():
    """A zero [CLS] query gives uniform attention: no outliers, so the lowest-index top patch is kept, plus the
    extra token (the released code would keep the extra token alone)."""
    inputs = make_inputs(num_images=2)
    inputs.cls_query = torch.zeros_like(inputs.cls_query)
    plan = plan_for("prumerge", {}, inputs)
    assert plan.counts.tolist() == [2, 2]
    assert plan.source_index.tolist() == [[0, -1], [0, -1]]
    alone = plan_for("prumerge", {"extra_token": False, "merge": "average"}, inputs)
    assert alone.counts.tolist() == [1, 1]
    torch.testing.assert_close(alone.dense_weights(inputs.num_patches).sum(dim=-1), torch.ones(2, 1))


def test_prumerge_plus_lattice_needs_the_grid():
    inputs = make_inputs()
    inputs.grid = None
    with pytest.raises(ValueError, match="grid"):
        plan_for("prumerge_plus", {"sampling": "lattice"}, inputs)
    plan_for("prumerge_plus", {}, inputs)  # the raster rule needs no grid


def test_prumerge_plus_keeps_the_whole_lattice():
    inputs = make_inputs(grid=(12, 12))
    plan = plan_for("prumerge_plus", {"sampling": "lattice", "uniform_ratio": 0.25}, inputs)
    lattice = torch.tensor(sorted(lattice_points((12, 12), 0.25)))
    assert len(lattice) == 36
    for image in range(inputs.num_images):
        assert torch.isin(lattice, plan.source_index[image]).all()


def flat_attention_with_outliers(num_patches: int, outliers: int, width: int = 4) -> CompressionInputs:
    """One image whose [CLS] attention is flat except for ``outliers`` strongly attended patches (at the end)."""
    keys = torch.zeros(1, 1 + num_patches, width)
    keys[0, num_patches + 1 - outliers :, 0] = 10.0  # the last patches
    keys[0, 1:, 1] = torch.linspace(0, 1e-3, num_patches)  # distinct keys for the neighbour ranking
    query = torch.zeros(1, width)
    query[0, 0] = 1.0
    features = torch.randn(1, num_patches, 3, generator=torch.Generator().manual_seed(num_patches))
    return CompressionInputs(features=features, cls_query=query, attention_keys=keys, num_heads=1)


@pytest.mark.parametrize(
    ("num_patches", "outliers", "expected_samples"),
    [
        (576, 0, [0]),  # r = 0: the released code divides by zero; here position 0 only
        (576, 3, list(range(0, 575, 64))),  # r = 3/576: stride floor(192 / 3) = 64
        (576, 32, list(range(0, 575, 6))),  # the paper's ~32 outliers: stride floor(18 / 3) = 6
        (144, 5, list(range(0, 143, 9))),  # N != 576: N - 1 replaces 575; stride floor(28 / 3) = 9
        (10, 1, list(range(0, 9, 3))),
        (4, 1, list(range(0, 3, 1))),  # r = 1/4 < 1/3: stride floor(4 / 3) = 1
    ],
)
def test_prumerge_plus_raster_rule(num_patches, outliers, expected_samples):
    inputs = flat_attention_with_outliers(num_patches, outliers)
    plan = plan_for("prumerge_plus", {"extra_token": False}, inputs)
    top = {num_patches - outliers} if outliers else {0}
    expected = set(expected_samples) | set(range(num_patches - outliers, num_patches)) | top
    assert plan.source_index[0].tolist() == sorted(expected)


def test_prumerge_plus_raster_stride_edge_cases():
    """r > 1/3 makes the released stride 0 (a crash): clamped to 1, every position but the last. IQR outliers
    cannot reach it (at most ~1/4 of the values lie above Q3), so the rule is checked on counts directly."""
    from llava_rc.compression_prumerge import raster_samples

    samples = raster_samples(torch.tensor([0, 1, 2, 3, 4]), 6)  # r = 0, 1/6, 1/3, 1/2, 2/3
    assert samples.tolist() == [
        [True, False, False, False, False, False],  # r = 0: position 0 only
        [True, False, True, False, True, False],  # floor(6 / 3) = 2
        [True, True, True, True, True, False],  # floor(3 / 3) = 1
        [True, True, True, True, True, False],  # floor(2 / 3) = 0 -> 1
        [True, True, True, True, True, False],  # floor(1 / 3) = 0 -> 1
    ]


NO_SQUARE_TABLE = [
    ("prumerge", [{}, {"merge": "average"}, {"budget": 0.25}]),
    ("prumerge_plus", [{}, {"merge": "average"}, {"budget": 0.25}]),
    ("trsm", [{"merge": "nearest", "budget": 0.25}]),
]


@pytest.mark.parametrize(("name", "all_settings"), NO_SQUARE_TABLE, ids=[row[0] for row in NO_SQUARE_TABLE])
@pytest.mark.parametrize("num_patches", [64, 144])
def test_no_patch_by_patch_table(name, all_settings, num_patches):
    """PruMerge ranks neighbours kept x all patches, TRSM's merge all x kept: no intermediate holds N x N entries
    per image."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class RecordShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    shapes.append(tuple(tensor.shape))
            return out

    inputs = make_inputs(num_images=2, grid=(num_patches // 8, 8))
    for settings in all_settings:
        shapes.clear()
        with RecordShapes():
            plan = plan_for(name, settings, inputs)
        assert plan.source_index.shape[1] < num_patches
        assert shapes and all(shape[-2:] != (num_patches, num_patches) for shape in shapes)


def test_trsm_selects_without_merging_by_default():
    inputs = make_inputs()
    plan = plan_for("trsm", {"budget": 0.25}, inputs)
    assert plan.is_selection
    merged = plan_for("trsm", {"budget": 0.25, "merge": "nearest"}, inputs)
    assert torch.equal(merged.source_index, plan.source_index)


def test_trsm_nearest_merge_puts_every_patch_in_one_token():
    inputs = make_inputs()
    plan = plan_for("trsm", {"budget": 0.25, "merge": "nearest"}, inputs)
    torch.testing.assert_close((plan.merge_weights > 0).sum(dim=1), torch.ones(3, 48, dtype=torch.long))


def test_cls_attention_budget_per_view():
    """Two views: each keeps its own share, ranked on its own; budget_scope="image" ranks them together."""
    views = ((4, 4), (6, 8))
    inputs = make_inputs(num_images=2, grid=(8, 8))
    inputs.grid, inputs.views = None, views
    inputs.attention_per_head = torch.rand(2, 64, generator=torch.Generator().manual_seed(7))
    inputs.attention_per_head[:, 16:] += 1.0  # the second view attended far more: a global ranking drops view 1
    for budget, counts in [(0.25, [4, 12]), (8, [2, 6]), (1, [0, 1])]:
        config = parse_compression({"method": "cls_attention", "budget": budget})
        plan = method_function(config)(inputs, config)
        assert config.fixed_count(views) == sum(counts) == plan.source_index.shape[1]
        for image in range(2):
            kept = plan.source_index[image]
            attention = inputs.attention_per_head[image]
            for (start, end), count in zip([(0, 16), (16, 64)], counts):
                in_view = kept[(kept >= start) & (kept < end)]
                assert len(in_view) == count
                assert set(in_view.tolist()) == set((attention[start:end].topk(count).indices + start).tolist())
        whole = plan_for("cls_attention", {"budget": budget, "budget_scope": "image"}, inputs)
        assert (whole.source_index >= 16).all()


TINY_GRIDS = [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5)]


# RC's own floor is tested with RC (tests/test_compression_rc.py), by its owner.
@pytest.mark.parametrize("name", [name for name in METHODS if name not in ("none", "rc")])
@pytest.mark.parametrize("grid", TINY_GRIDS, ids=[f"N={rows * cols}" for rows, cols in TINY_GRIDS])
@pytest.mark.parametrize("flat", [False, True], ids=["random", "flat"])
def test_every_method_keeps_at_least_one_token(name, grid, flat):
    """Any N (N <= 5 included), any attention (flat: a zero [CLS] query, so no outlier), adaptive and smallest
    budgets: every image keeps at least one token, and at least one that stands for a patch."""
    inputs = make_inputs(num_images=2, grid=grid)
    if flat:
        inputs.cls_query = torch.zeros_like(inputs.cls_query)
        inputs.features = torch.ones_like(inputs.features)
    config_class = METHODS[name][0]
    budgets = [1, 0.01] + ([None] if "budget" in config_class.__dataclass_fields__ and name != "gprune" else [])
    for budget in budgets:
        settings = {} if budget is None else {"budget": budget}
        if budget is None and name in ("cls_attention", "trsm", "random"):
            continue  # these always have a budget
        plan = plan_for(name, settings, inputs)
        assert (plan.counts >= 1).all(), (name, settings, plan.counts)
        assert ((plan.source_index >= 0).sum(dim=-1) >= 1).all(), (name, settings)


def test_gprune_budget_overrides_keep_ratio():
    inputs = make_inputs()
    assert plan_for("gprune", {"keep_ratio": 0.5, "budget": 3}, inputs).counts.tolist() == [3, 3, 3]
    assert plan_for("gprune", {"keep_ratio": 1}, inputs).counts.tolist() == [48, 48, 48]


def test_trsm_without_text_scores_ranks_by_feature_norm():
    inputs = make_inputs()
    vision_only = CompressionInputs(features=inputs.features, grid=inputs.grid)
    no_question = CompressionInputs(**{**vars(inputs), "has_text": torch.zeros(3, dtype=torch.bool)})
    plan = plan_for("trsm", {"budget": 5}, vision_only)
    assert torch.equal(plan.source_index, plan_for("trsm", {"budget": 5}, no_question).source_index)


def test_random_keeps_the_same_seeded_subset_for_every_image():
    inputs = make_inputs(num_images=3, grid=(12, 12), seed=5)
    plan = plan_for("random", {"budget": 20}, inputs)
    assert all(torch.equal(plan.source_index[0], row) for row in plan.source_index)
    alone = plan_for("random", {"budget": 20}, image_inputs(inputs, 2))
    assert torch.equal(alone.source_index[0], plan.source_index[0])
    other_seed = plan_for("random", {"budget": 20, "seed": 1}, inputs)
    assert not torch.equal(other_seed.source_index, plan.source_index)
    # Content-blind: different features, same subset.
    shuffled = plan_for("random", {"budget": 20}, make_inputs(num_images=3, grid=(12, 12), seed=6))
    assert torch.equal(shuffled.source_index, plan.source_index)
