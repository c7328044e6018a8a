"""The compression step of issue 28 against the implementation it replaced (``reference_step.py``, verbatim).

RC and PruMerge(+) now return sparse plans (members and weights instead of a dense (I, K, N) matrix) and the LOF
runs in fewer operators; the kept counts, the source patches and every merge weight must be exactly the reference's,
and the applied tokens equal up to float32 summation order, on many random inputs (ties, masks, budgets, batches).
"""

import pytest
import torch

from llava_rc.compression_common import CompressionInputs, apply_plan
from llava_rc.compression_lof import lof_outlier_count, lof_outlier_mask
from llava_rc.compression_prumerge import PruMergeConfig, PruMergePlusConfig, compress_prumerge
from llava_rc.compression_prumerge import compress_prumerge_plus
from llava_rc.compression_rc import RCConfig, compress_rc
from reference_step import reference_compress_prumerge, reference_compress_prumerge_plus, reference_compress_rc
from reference_step import reference_lof_outlier_mask


def random_inputs(generator: torch.Generator, num_images: int, num_patches: int, grid=None) -> CompressionInputs:
    """Inputs with a few standout patches per image, sometimes with exact ties (copied keys and text scores)."""
    num_heads, head_dim, width = 2, 4, 8
    keys = torch.randn(num_images, 1 + num_patches, num_heads * head_dim, generator=generator)
    query = torch.randn(num_images, num_heads * head_dim, generator=generator)
    scale = float(torch.rand(1, generator=generator)) * 6
    for image in range(num_images):
        count = int(torch.randint(0, max(1, num_patches // 4), (1,), generator=generator))
        standouts = torch.randperm(num_patches, generator=generator)[:count]
        keys[image, 1 + standouts] += scale * (1 + image) * query[image] / query[image].norm()
    text_scores = torch.rand(num_images, num_patches, generator=generator) * 2 - 1
    if torch.rand(1, generator=generator) < 0.3:  # ties everywhere: pairs of identical patches
        keys[:, 2::2] = keys[:, 1:-1:2]
        text_scores[:, 1::2] = text_scores[:, 0 : num_patches - 1 : 2]
    return CompressionInputs(
        features=torch.randn(num_images, num_patches, width, generator=generator),
        cls_query=query,
        attention_keys=keys,
        num_heads=num_heads,
        text_scores=text_scores,
        guidance_dim=16,
        has_text=torch.rand(num_images, generator=generator) < 0.8,
        grid=grid,
    )


def assert_same_plan(plan, reference, inputs: CompressionInputs, exact: bool = True) -> None:
    """Same counts and sources; the same weights (bit for bit, or up to float32 rounding when ``exact`` is False)."""
    num_patches = inputs.num_patches
    assert torch.equal(plan.counts, reference.counts)
    assert torch.equal(plan.source_index, reference.source_index)
    if exact:
        assert torch.equal(plan.dense_weights(num_patches), reference.merge_weights)
    else:
        torch.testing.assert_close(plan.dense_weights(num_patches), reference.merge_weights, rtol=1e-6, atol=1e-7)
        assert torch.equal(plan.dense_weights(num_patches) != 0, reference.merge_weights != 0)
    assert plan.member_index is not None and plan.member_index.shape[-1] <= num_patches + 1
    expected = torch.bmm(reference.merge_weights, inputs.features.float())  # (I, K, C), the old apply_plan
    torch.testing.assert_close(apply_plan(inputs.features, plan), expected, rtol=1e-5, atol=1e-5)


RC_SETTINGS = [
    {}, {"budget": 16}, {"budget": 0.3}, {"budget": 2}, {"budget": 1}, {"guidance": None},
    {"centre_candidates": "non_centres"}, {"merge_neighbors": 3, "lof_neighbors_merge": 3}, {"merge_neighbors": 500},
    {"lof_neighbors_visual": 5, "lof_neighbors_text": 7, "text_weight": 0.0}, {"budget": 1.0},
]


def test_rc_plans_equal_the_previous_implementation():
    generator = torch.Generator().manual_seed(28)
    plans = 0
    for trial in range(150):
        num_images = 1 + trial % 4
        num_patches = int(torch.randint(2, 200 if trial % 5 else 700, (1,), generator=generator))
        inputs = random_inputs(generator, num_images, num_patches)
        settings = RC_SETTINGS[trial % len(RC_SETTINGS)]
        config = RCConfig(**settings)
        assert_same_plan(compress_rc(inputs, config), reference_compress_rc(inputs, config), inputs)
        plans += 1
    assert plans == 150


@pytest.mark.parametrize("plus", [False, True])
def test_prumerge_plans_equal_the_previous_implementation(plus):
    generator = torch.Generator().manual_seed(280 + plus)
    variants = [{}, {"budget": 12}, {"budget": 0.25}, {"merge": "average"}, {"merge": "none"},
                {"extra_token": False}, {"neighbors_ratio": 0.2}, {"attention": "per_head", "budget": 1},
                {"merge_neighbors": 0}]
    if plus:
        variants += [{"sampling": "lattice"}, {"sampling": "lattice", "budget": 20}]
    for trial in range(60):
        side = int(torch.randint(2, 20, (1,), generator=generator))
        inputs = random_inputs(generator, 1 + trial % 3, side * side, grid=(side, side))
        settings = variants[trial % len(variants)]
        if plus:
            config = PruMergePlusConfig(**settings)
            plan, reference = compress_prumerge_plus(inputs, config), reference_compress_prumerge_plus(inputs, config)
        else:
            config = PruMergeConfig(**settings)
            plan, reference = compress_prumerge(inputs, config), reference_compress_prumerge(inputs, config)
        # "average" divides by the members' total, summed over k + 1 members now and over N before: the same
        # weights up to the float32 summation order.
        assert_same_plan(plan, reference, inputs, exact=settings.get("merge") != "average")


def test_lof_equals_the_previous_window_implementation():
    generator = torch.Generator().manual_seed(2028)
    for trial in range(300):
        num_rows, length = 1 + trial % 5, int(torch.randint(1, 400, (1,), generator=generator))
        values = torch.randn(num_rows, length, generator=generator)
        if trial % 3 == 0:  # ties and copies: values on a short grid
            values = torch.randint(0, 1 + trial % 13, (num_rows, length), generator=generator).float() * 0.5
        valid = None if trial % 2 else torch.rand(num_rows, length, generator=generator) < 0.2 + 0.8 * (trial % 4) / 3
        k = [1, 2, 5, 10, 20][trial % 5]
        expected = reference_lof_outlier_mask(values, valid, k)
        assert torch.equal(lof_outlier_mask(values, valid, k), expected)
        assert torch.equal(lof_outlier_count(values, valid, k), expected.sum(dim=-1))


def test_gprune_keeps_what_the_dense_graph_kept(monkeypatch):
    """Chunked graph (kept or recomputed rows) against the dense (I, N, N) reference: the same kept tokens, scores
    equal up to float32 rounding."""
    from llava_rc import compression_gprune
    from llava_rc.compression_common import select_mask
    from reference_step import reference_graph_scores

    generator = torch.Generator().manual_seed(5)
    for trial in range(24):
        num_images, num_tokens = 1 + trial % 3, int(torch.randint(2, 300, (1,), generator=generator))
        clusters = 1.5 * torch.randn(num_images, 4, 24, generator=generator)
        member = torch.randint(0, 4, (num_images, num_tokens), generator=generator)
        features = clusters.gather(1, member.unsqueeze(-1).expand(-1, -1, 24))
        features = features + torch.randn(num_images, num_tokens, 24, generator=generator) * (0.3 + trial % 4)
        expected = reference_graph_scores(features, 0.5, 0.03, 5)
        budgets = [compression_gprune.GRAPH_MEMORY_BYTES, 4 * 4 * num_images * num_tokens * 7]  # all kept; 7-row chunks
        for budget in budgets:
            monkeypatch.setattr(compression_gprune, "GRAPH_MEMORY_BYTES", budget)
            scores = compression_gprune.graph_scores(features, 0.5, 0.03, 5)
            torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
            count = max(1, num_tokens // 2)
            assert torch.equal(select_mask(scores, count), select_mask(expected, count))


VIEWS = {"aten::view", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::expand", "aten::expand_as",
         "aten::slice", "aten::select", "aten::transpose", "aten::view_as", "aten::detach", "aten::lift_fresh",
         "aten::alias", "aten::permute", "aten::t", "aten::unfold", "aten::as_strided", "aten::_unsafe_view"}


def operators_per_call(function) -> int:
    """Top-level aten operators of one call that are not views (each a kernel launch on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    function()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    count = 0
    for event in profiler.events():
        if not event.name.startswith("aten::") or event.name in VIEWS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        copies = any(child.name not in VIEWS for child in event.cpu_children)
        if parent is None and (copies or event.name not in ("aten::to", "aten::reshape", "aten::contiguous")):
            count += 1
    return count


def test_adaptive_rc_dispatches_at_most_200_operators():
    """Issue 28: 512 before (the three LOF passes 135 each); a GPU pays a launch for each at batch 1."""
    inputs = random_inputs(torch.Generator().manual_seed(1), 1, 576)
    assert operators_per_call(lambda: lof_outlier_count(inputs.text_scores, None, 20)) <= 40
    assert operators_per_call(lambda: compress_rc(inputs, RCConfig())) <= 200
