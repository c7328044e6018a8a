"""LLaVA-NeXT (anyres): identical to stock when off; budgets, newlines and reading order as documented; generate
exact and batch-consistent when on."""

import pytest
import torch
from transformers import LlavaNextConfig

from llava_rc import LlavaNextRCForConditionalGeneration, anyres_token_counts
from llava_rc.compressed_generation import NEWLINE_SOURCE
from llava_rc.compression_common import CompressionInputs, resolve_budget
from llava_rc.compression_gprune import GPruneConfig, compress_gprune, graph_scores
from tiny import IMAGE_TOKEN_ID, greedy_loop_without_cache
from tiny_next import IMAGE_SIZES, make_next_batch, next_stock_twin, random_next_image, tiny_next_config_dict
from tiny_next import tiny_next_model, tiny_next_processor, unpad_next_row

GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
ROWS = [[(56, 56)], [(20, 56), (60, 30)], [], [(28, 28)]]  # different sizes, two images in a row, a text-only row
PROMPTS = [6, 11, 4, 3]
BASE_TOKENS = 16  # (28 / 7) ** 2


def test_token_counts_match_the_processor_and_the_stock_layout():
    counts = anyres_token_counts(LlavaNextConfig(**tiny_next_config_dict()), IMAGE_SIZES)  # (I, 3)
    assert counts.tolist() == [[16, 64, 8], [16, 16, 2], [16, 32, 8], [16, 16, 4], [16, 48, 6]]
    processor = tiny_next_processor()
    for seed, (height, width) in enumerate(IMAGE_SIZES):
        inputs = processor(images=random_next_image(seed, height, width), text="USER: <image> what ? ASSISTANT:",
                           return_tensors="pt")
        assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == counts[seed].sum()
        assert inputs["image_sizes"].tolist() == [[height, width]]
    model = tiny_next_model({"method": "none"})
    crops = model._image_crops(torch.zeros(len(IMAGE_SIZES), 5, 3, 28, 28), IMAGE_SIZES)[1]
    layouts = model._image_token_layouts(crops, IMAGE_SIZES)
    assert [layout.token_index.shape[0] for layout in layouts] == counts.sum(-1).tolist()
    assert [layout.views[1] for layout in layouts] == [(8, 8), (2, 8), (8, 4), (4, 4), (6, 8)]


def test_compression_off_is_bit_identical_to_stock():
    model = tiny_next_model({"method": "none"})
    stock = next_stock_twin(model)
    batch = make_next_batch(PROMPTS, ROWS, seed=1)
    assert batch["attention_mask"][:, 0].eq(0).any()  # left padding
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, **GREEDY), stock.generate(**batch, **GREEDY))


def test_keeping_everything_matches_stock():
    model = tiny_next_model({"method": "cls_attention", "budget": 1.0})
    stock = next_stock_twin(model)
    batch = make_next_batch(PROMPTS, ROWS, seed=2)
    with torch.no_grad():
        out = model(**batch)
        torch.testing.assert_close(out.logits, stock(**batch).logits, rtol=1e-4, atol=1e-4)
    assert out.compression.kept_counts.tolist() == anyres_token_counts(model.config, batch["image_sizes"]).sum(-1).tolist()


def kept_without_newlines(settings: dict, image_sizes) -> list[int]:
    """The documented count: resolve_budget(budget, M) over base + grid; G-Prune and cls_attention (FasterVLM's
    per-crop budget, per view) per view (ratio) or split by view size (int, which sums to the same count)."""
    counts = anyres_token_counts(LlavaNextConfig(**tiny_next_config_dict()), image_sizes)
    expected = []
    for base, grid, _ in counts.tolist():
        budget = settings.get("budget")
        if settings["method"] in ("gprune", "cls_attention"):
            if settings["method"] == "gprune":
                budget = settings.get("keep_ratio", 0.5) if budget is None else budget
            if isinstance(budget, float):
                expected.append(resolve_budget(budget, base) + resolve_budget(budget, grid))
                continue
        expected.append(resolve_budget(budget, base + grid))
    return expected


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "cls_attention", "budget": 0.3},
        {"method": "cls_attention", "budget": 20},
        {"method": "trsm", "budget": 7, "guidance": "llm"},
        {"method": "gprune"},
        {"method": "gprune", "budget": 0.25},
        {"method": "gprune", "budget": 30},
        {"method": "rc", "budget": 0.2, "guidance": "llm"},
    ],
    ids=["ratio", "count", "trsm_count", "gprune_default", "gprune_ratio", "gprune_count", "rc_ratio"],
)
def test_budgets_count_tokens_without_newlines_and_keep_every_newline(settings):
    model = tiny_next_model(settings)
    batch = make_next_batch([5, 5], [[(56, 56), (20, 56)], [(60, 30), (40, 60)]], seed=3)
    report = model(**batch).compression
    newlines = anyres_token_counts(model.config, batch["image_sizes"])[:, 2]
    assert report.newline_counts.tolist() == newlines.tolist()
    assert (report.kept_counts - newlines).tolist() == kept_without_newlines(settings, batch["image_sizes"])
    assert (report.source_index == NEWLINE_SOURCE).sum(1).tolist() == newlines.tolist()


def test_output_is_in_reading_order_with_a_newline_closing_every_row():
    model = tiny_next_model({"method": "cls_attention", "budget": 0.4})
    batch = make_next_batch([4], [[(56, 56), (60, 30)]], seed=4)
    out = model(**batch)
    report = out.compression
    for image, (_, grid, rows) in enumerate(anyres_token_counts(model.config, batch["image_sizes"]).tolist()):
        cols = grid // rows
        sources = report.source_index[image, : report.kept_counts[image]].tolist()
        kept = [source for source in sources if source >= 0]
        assert kept == sorted(kept) and sources.count(NEWLINE_SOURCE) == rows
        row = 0
        for source in sources:  # every grid token comes before the newline of its row, after the one before
            if source == NEWLINE_SOURCE:
                row += 1
            elif source >= BASE_TOKENS:
                assert (source - BASE_TOKENS) // cols == row
        assert row == rows and sources[-1] == NEWLINE_SOURCE
    # The newline embedding sits in the compressed sequence exactly where the report says.
    embeds = model.compress_inputs(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"],
                                   settings=model.compression_settings()).inputs_embeds
    newline = model.model.image_newline
    is_newline = (embeds[0] == newline).all(-1)
    assert int(is_newline.sum()) == int(report.newline_counts.sum())


def test_gprune_builds_one_graph_per_view():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 16 + 32, 8, generator=generator)  # base 4 x 4, grid 8 x 4
    inputs = CompressionInputs(features=features, views=((4, 4), (8, 4)))
    plan = compress_gprune(inputs, GPruneConfig(keep_ratio=0.5))
    assert plan.counts.tolist() == [8 + 16] * 3
    for view, (start, size, count) in enumerate([(0, 16, 8), (16, 32, 16)]):
        scores = graph_scores(features[:, start : start + size], 0.5, 0.03, 5)
        expected = scores.topk(count).indices.sort().values + start
        chosen = plan.source_index[:, :24]
        in_view = chosen[(chosen >= start) & (chosen < start + size)].view(3, count)
        assert torch.equal(in_view, expected), view


@pytest.mark.parametrize(
    "compression",
    [{"method": "cls_attention", "budget": 0.5}, {"method": "gprune"}, None, {"method": "prumerge_plus"}],
    ids=["cls_attention", "gprune", "default_rc_llm_guidance", "prumerge_plus_adaptive"],
)
def test_batch_equals_each_sample_alone(compression):
    model = tiny_next_model(compression)
    batch = make_next_batch(PROMPTS, ROWS, seed=6)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    counts = out.compression.kept_counts
    first = 0
    for row, sizes in enumerate(ROWS):
        single = unpad_next_row(batch, row, first, len(sizes))
        alone = model.generate(**single, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, single["input_ids"].shape[1] :])
        if sizes:
            assert torch.equal(alone.compression.kept_counts, counts[first : first + len(sizes)])
        first += len(sizes)


@pytest.mark.parametrize(
    "compression",
    [{"method": "cls_attention", "budget": 9}, {"method": "gprune"}, {"method": "prumerge"},
     {"method": "rc", "guidance": None}],
    ids=["cls_attention", "gprune", "prumerge", "rc_vision_only"],
)
def test_generate_equals_no_cache_greedy_loop(compression):
    model = tiny_next_model(compression)
    batch = make_next_batch([3, 10, 6], [[(56, 56)], [(20, 56)], [(60, 30), (28, 28)]], seed=7)
    out = model.generate(**batch, **GREEDY)
    expected = greedy_loop_without_cache(model, batch, GREEDY["max_new_tokens"], image_sizes=batch["image_sizes"])
    assert torch.equal(out[:, batch["input_ids"].shape[1] :], expected)


def test_vision_tower_runs_once_over_all_crops():
    model = tiny_next_model({"method": "cls_attention", "budget": 4})
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        model.generate(**make_next_batch([4, 5], [[(56, 56)], [(20, 56), (28, 28)]]), **GREEDY)
    finally:
        handle.remove()
    assert calls == [5 + 3 + 2]


def test_missing_image_sizes_and_mismatched_placeholders_are_explained():
    model = tiny_next_model({"method": "cls_attention", "budget": 4})
    batch = make_next_batch([4], [[(56, 56)]])
    with pytest.raises(ValueError, match="image_sizes"):
        model(**{**batch, "image_sizes": None})
    with pytest.raises(ValueError, match="88"):
        model(**{**batch, "image_sizes": torch.tensor([[20, 56]])})
