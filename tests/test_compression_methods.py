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


def reference_prumerge(inputs, config):
    """IQR outliers (+ uniform lattice for PruMerge+) of [CLS] attention, each merged with its nearest keys."""
    plus = config.method == "prumerge_plus"
    attention_batch = cls_attention(inputs, per_head=True)
    results = []
    for image in range(inputs.num_images):
        attention = [float(a) for a in attention_batch[image]]
        num_patches = len(attention)
        ranked = descending(attention)
        ordered = sorted(attention)
        first, third = percentile(ordered, 0.25), percentile(ordered, 0.75)
        chosen = {n for n in range(num_patches) if attention[n] > third + 1.5 * (third - first)} | {ranked[0]}
        if plus:
            chosen |= lattice_points(inputs.grid, config.uniform_ratio)
        if config.budget is not None:
            keep = resolve_budget(config.budget, num_patches)
            if plus:
                ranked = [n for n in ranked if n in chosen] + [n for n in ranked if n not in chosen]
            chosen = set(ranked[:keep])
        similarity = cosine_table(inputs.patch_keys[image].float())
        features = inputs.features[image].double()
        tokens = []
        for anchor in sorted(chosen):
            others = sorted((n for n in range(num_patches) if n != anchor), key=lambda n: (-similarity[anchor][n], n))
            members = [anchor] + others[: config.merge_neighbors]
            total = sum(attention[m] for m in members)
            tokens.append(sum(attention[m] / total * features[m] for m in members))
        results.append((sorted(chosen), torch.stack(tokens)))
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
    """Top-budget by text score (feature norm without a question); the rest join their most similar kept token."""
    results = []
    for image in range(inputs.num_images):
        features = inputs.features[image].double()
        num_patches = features.shape[0]
        if inputs.has_text[image]:
            ranking = [float(s) for s in inputs.text_scores[image]]
        else:
            ranking = [math.sqrt(sum(float(x) ** 2 for x in features[n])) for n in range(num_patches)]
        kept = sorted(descending(ranking)[: resolve_budget(config.budget, num_patches)])
        similarity = cosine_table(inputs.features[image].float())
        clusters = {anchor: [anchor] for anchor in kept}
        for n in range(num_patches):
            if n not in clusters:
                nearest = max(kept, key=lambda anchor: (similarity[n][anchor], -anchor))
                clusters[nearest].append(n)
        tokens = [sum(features[m] for m in clusters[anchor]) / len(clusters[anchor]) for anchor in kept]
        results.append((kept, torch.stack(tokens)))
    return results


REFERENCES = {
    "prumerge": reference_prumerge,
    "prumerge_plus": reference_prumerge,
    "gprune": reference_gprune,
    "trsm": reference_trsm,
}

CASES = [
    ("prumerge", {}),
    ("prumerge", {"merge_neighbors": 5}),
    ("prumerge", {"budget": 7}),
    ("prumerge_plus", {}),
    ("prumerge_plus", {"budget": 0.3, "uniform_ratio": 0.1, "merge_neighbors": 4}),
    ("prumerge_plus", {"budget": 4}),
    ("gprune", {}),
    ("gprune", {"keep_ratio": 0.3, "similarity_threshold": 0.3, "temperature": 0.1, "steps": 2}),
    ("gprune", {"budget": 9}),
    ("trsm", {}),
    ("trsm", {"budget": 6, "guidance": "clip"}),
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
    assert (first.merge_weights is None) == (second.merge_weights is None)
    if first.merge_weights is not None:
        assert torch.equal(first.merge_weights, second.merge_weights)


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


BUDGETED = [("prumerge", "budget"), ("prumerge_plus", "budget"), ("gprune", "budget"), ("gprune", "keep_ratio"),
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
        assert (plan.source_index >= 0).all()
        assert (plan.source_index.diff(dim=-1) > 0).all()  # raster order, no repeats


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
]


@pytest.mark.parametrize(("name", "settings", "field", "shown"), INVALID, ids=[f"{row[0]}-{row[2]}" for row in INVALID])
def test_invalid_settings_raise(name, settings, field, shown):
    with pytest.raises(ValueError, match=rf"{field}.*{re.escape(shown)}"):
        parse_compression({"method": name, **settings})


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus", "gprune", "trsm", "random"])
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
    """A zero [CLS] query gives uniform attention: no outliers, so the lowest-index top patch is kept alone."""
    inputs = make_inputs(num_images=2)
    inputs.cls_query = torch.zeros_like(inputs.cls_query)
    plan = plan_for("prumerge", {}, inputs)
    assert plan.counts.tolist() == [1, 1]
    assert plan.source_index.tolist() == [[0], [0]]
    torch.testing.assert_close(plan.merge_weights.sum(dim=-1), torch.ones(2, 1))


def test_prumerge_plus_needs_the_grid():
    inputs = make_inputs()
    inputs.grid = None
    with pytest.raises(ValueError, match="grid"):
        plan_for("prumerge_plus", {}, inputs)


def test_prumerge_plus_keeps_the_whole_lattice():
    inputs = make_inputs(grid=(12, 12))
    plan = plan_for("prumerge_plus", {"uniform_ratio": 0.25}, inputs)
    lattice = torch.tensor(sorted(lattice_points((12, 12), 0.25)))
    assert len(lattice) == 36
    for image in range(inputs.num_images):
        assert torch.isin(lattice, plan.source_index[image]).all()


def test_gprune_budget_overrides_keep_ratio():
    inputs = make_inputs()
    assert plan_for("gprune", {"keep_ratio": 0.5, "budget": 3}, inputs).counts.tolist() == [3, 3, 3]
    assert plan_for("gprune", {"keep_ratio": 1}, inputs).counts.tolist() == [48, 48, 48]


def test_trsm_every_patch_lands_in_one_token():
    inputs = make_inputs()
    plan = plan_for("trsm", {"budget": 0.25}, inputs)
    torch.testing.assert_close((plan.merge_weights > 0).sum(dim=1), torch.ones(3, 48, dtype=torch.long))


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
