"""Every method's fixed-budget path traces into one graph: ``torch.compile(fullgraph=True)`` raises on a graph break.

A host sync (``.item()``, ``int(tensor)``, ``.tolist()``) and an output whose shape depends on values (``nonzero``,
boolean indexing) are graph breaks under dynamo's default settings, so one graph means no host sync: a GPU can then
capture the step in one CUDA graph (``mode="reduce-overhead"``). The ``"aot_eager"`` backend runs dynamo and
AOTAutograd's functionalisation without generating kernels, which keeps the test fast on CPU. Adaptive RC reads its
kept count on the host once; the last test checks that the check sees that sync.
"""

import pytest
import torch

from llava_rc.compression_common import CompressionInputs, TokenPlan, cls_attention, plan_from_mask, select_mask, select_plan
from llava_rc.compression_registry import METHODS, method_function, parse_compression
from test_compression_methods import make_inputs
from test_method_matrix import METHOD_ROWS

FIXED = {**METHOD_ROWS, "gprune_keep_ratio": {"method": "gprune"}}  # G-Prune's count is fixed without a budget


def multi_view_inputs() -> CompressionInputs:
    """LLaVA-NeXT-style inputs: two views, [CLS] attention and keys precomputed per crop (as the model passes)."""
    single = make_inputs(num_images=3, grid=(6, 8), seed=3)
    return CompressionInputs(
        features=single.features,
        num_heads=single.num_heads,
        text_scores=single.text_scores,
        guidance_dim=single.guidance_dim,
        has_text=single.has_text,
        views=((4, 4), (4, 8)),
        attention_per_head=cls_attention(single, per_head=True),
        attention_joint=cls_attention(single, per_head=False),
        keys=single.patch_keys,
    )


def compiled_plan(settings: dict, inputs: CompressionInputs) -> tuple[TokenPlan, TokenPlan]:
    """(compiled, eager) plans; compiled in one graph or raises."""
    config = parse_compression(settings)
    function = method_function(config)
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, dynamic=False, backend="aot_eager")
    return compiled(inputs, config), function(inputs, config)


def test_every_registered_method_is_compiled():
    assert {settings["method"] for settings in FIXED.values()} == set(METHODS) - {"none"}


@pytest.mark.parametrize("views", ["single", "multi"])
@pytest.mark.parametrize(
    "name",
    # RC's compile takes about a minute per case: the full run only; the quick run compiles RC's fixed-budget step in
    # tests/test_compression_rc.py::test_fixed_budget_path_compiles_without_graph_break.
    [pytest.param(name, marks=pytest.mark.slow) if name == "rc" else name for name in sorted(FIXED)],
)
def test_the_fixed_budget_step_is_one_graph(name, views):
    settings = FIXED[name]
    if views == "multi" and settings["method"] == "prumerge_plus":
        pytest.skip("prumerge_plus lays its lattice on a grid per view; the multi-view inputs have no grid per view")
    inputs = make_inputs(num_images=3, grid=(6, 8), seed=3) if views == "single" else multi_view_inputs()
    plan, eager = compiled_plan(settings, inputs)
    assert torch.equal(plan.source_index, eager.source_index)
    assert torch.equal(plan.counts, eager.counts)
    assert plan.is_selection == eager.is_selection
    if not eager.is_selection:
        num_patches = inputs.num_patches
        torch.testing.assert_close(
            plan.dense_weights(num_patches), eager.dense_weights(num_patches), rtol=1e-5, atol=1e-6
        )


def test_adaptive_rc_reads_its_count_on_the_host_so_it_is_not_one_graph():
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|item|unsupported"):
        compiled_plan({"method": "rc"}, make_inputs(num_images=2, grid=(6, 8), seed=3))


def test_select_plan_is_the_mask_route_in_fewer_operators():
    """``select_plan`` (3 operators) keeps exactly what marking the top patches and reading them back does."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        num_images, num_patches = 1 + trial % 4, 1 + int(torch.randint(1, 80, (1,), generator=generator))
        scores = torch.randint(0, 1 + trial % 7, (num_images, num_patches), generator=generator).float()  # ties
        if trial % 3 == 0:
            scores = torch.randn(num_images, num_patches, generator=generator)
        count = int(torch.randint(0, num_patches + 2, (1,), generator=generator))
        plan = select_plan(scores, count)
        reference = plan_from_mask(select_mask(scores, count), count)
        assert torch.equal(plan.source_index, reference.source_index)
        assert torch.equal(plan.counts, reference.counts)
        assert plan.is_selection
