"""LLaVA-OneVision (SigLIP without [CLS], Qwen2): identical to stock when off; budgets, newlines, the downsampled grid
and the received-attention score as documented; generate exact and batch-consistent when on; videos refused."""

import pytest
import torch

from llava_rc.compressed_generation import NEWLINE_SOURCE
from llava_rc.compression_common import resolve_budget
from llava_rc.compression_registry import METHODS
from llava_rc.vision_importance import received_attention
from tiny import greedy_loop_without_cache
from tiny_onevision import IMAGE_SIZE, IMAGE_SIZES, NUM_PATCHES, SIDE, VIDEO_TOKEN_ID, make_onevision_batch
from tiny_onevision import onevision_stock_twin, token_counts, tiny_onevision_model, unpad_onevision_row

GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
# different sizes, a row with two images (base views only), a text-only row, a downsampled 4 x 4 grid
ROWS = [[(56, 56)], [(20, 56), (60, 30)], [], [(112, 112)]]
PROMPTS = [6, 11, 4, 3]


def layouts_of(model, batch):
    geometry = model.image_geometry(batch["image_sizes"], batch["batch_num_images"])
    crops_per_image = model._image_crops(batch["pixel_values"], geometry)[1]
    return model._image_token_layouts(crops_per_image, geometry)


def test_layouts_match_the_stock_processor_counts_including_downsampled_grids():
    model = tiny_onevision_model({"method": "none"})
    batch = make_onevision_batch([3] * len(IMAGE_SIZES), [[size] for size in IMAGE_SIZES])
    layouts = layouts_of(model, batch)
    assert [layout.token_index.shape[0] for layout in layouts] == token_counts(IMAGE_SIZES)
    # 3 x 4 (12 x 16 tokens) and 4 x 4 (16 x 16) crops exceed 9 crops' worth: downsampled to 10 x 13 and 12 x 12.
    grids = [layout.views[1] for layout in layouts]
    assert grids[4] == (10, 13) and grids[5] == (12, 12)
    assert all(layout.views[0] == (SIDE, SIDE) for layout in layouts)
    for layout, (rows, cols) in zip(layouts, grids):
        is_newline = layout.token_index == -1
        assert int(is_newline.sum()) == rows
        # base view first without newline, then each grid row closed by one newline
        ends = torch.arange(NUM_PATCHES + cols, layout.token_index.shape[0], cols + 1)
        assert torch.equal(is_newline.nonzero().flatten(), ends)
    several = make_onevision_batch([3], [[(56, 56), (112, 112)]])
    assert [layout.token_index.tolist() for layout in layouts_of(model, several)] == [list(range(16)) + [-1]] * 2


def test_compression_off_is_bit_identical_to_stock():
    model = tiny_onevision_model({"method": "none"})
    stock = onevision_stock_twin(model)
    batch = make_onevision_batch(PROMPTS, ROWS, seed=1)
    assert batch["attention_mask"][:, 0].eq(0).any()  # left padding
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, **GREEDY), stock.generate(**batch, **GREEDY))
    # A model whose config compresses is stock under a per-call "none".
    compressing = tiny_onevision_model({"method": "cls_attention", "budget": 4})
    with torch.no_grad():
        assert torch.equal(compressing(**batch, compression={"method": "none"}).logits, stock(**batch).logits)
    assert torch.equal(compressing.generate(**batch, compression={"method": "none"}, **GREEDY),
                       stock.generate(**batch, **GREEDY))


@pytest.mark.parametrize("settings", [{"method": "cls_attention", "budget": 1.0}, {"method": "gprune", "budget": 1.0}],
                         ids=["vision_stage", "projected_stage"])
def test_keeping_everything_matches_stock_including_the_downsampled_grid(settings):
    model = tiny_onevision_model(settings)
    stock = onevision_stock_twin(model)
    batch = make_onevision_batch(PROMPTS, ROWS, seed=2)
    with torch.no_grad():
        out = model(**batch)
        torch.testing.assert_close(out.logits, stock(**batch).logits, rtol=1e-4, atol=1e-4)
    assert out.compression.kept_counts.tolist() == [88, 17, 17, 172]


def stock_image_tokens(stock, batch) -> list[torch.Tensor]:
    """Each image's stock tokens in reading order without its newline tokens."""
    with torch.no_grad():
        features = stock.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"]
        ).pooler_output
    newline = stock.model.image_newline
    return [image[~(image == newline).all(-1)] for image in features]


@pytest.mark.parametrize("method", ["cls_attention", "random"])
def test_a_kept_token_is_the_stock_token_also_in_a_downsampled_grid(method):
    model = tiny_onevision_model({"method": method, "budget": 0.3})
    batch = make_onevision_batch([4, 5], [[(112, 112)], [(84, 112)]], seed=3)
    stock_tokens = stock_image_tokens(onevision_stock_twin(model), batch)
    compressed = model.compress_inputs(batch["input_ids"], batch["pixel_values"], image_sizes=batch["image_sizes"])
    report = compressed.report
    packed = compressed.packed
    for image in range(2):  # one image per row
        count = int(report.kept_counts[image])
        sources = report.source_index[image, :count]
        tokens = compressed.inputs_embeds[image][packed.image_slot[image] >= 0]  # (K, D) as the LM reads them
        assert tokens.shape[0] == count
        is_patch = sources >= 0
        torch.testing.assert_close(tokens[is_patch], stock_tokens[image][sources[is_patch]], rtol=0, atol=0)


def test_cls_methods_rank_by_received_attention_recomputed_like_the_eager_tower():
    # One ranking over the whole image (not FasterVLM's per-view share), so the kept set is the top 5 of the scores.
    model = tiny_onevision_model({"method": "cls_attention", "budget": 5, "budget_scope": "image"})
    batch = make_onevision_batch([4, 4], [[(28, 28)], [(60, 30)]], seed=4)
    geometry = model.image_geometry(batch["image_sizes"], batch["batch_num_images"])
    crops, _ = model._image_crops(batch["pixel_values"], geometry)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        out = tower(crops, output_hidden_states=True, output_attentions=True)
    layer = len(out.attentions) - 1  # the layer that reads the feature layer (-1) output's input: the last one
    eager = out.attentions[layer].mean(dim=(1, 2))  # (P, N) mean over heads and queries
    settings = model.compression_settings()
    per_head, joint, keys, heads = model._crop_importance(out.hidden_states, -1, settings)
    torch.testing.assert_close(per_head, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(per_head.sum(-1), torch.ones(per_head.shape[0]))
    # The kept set of image 0 (one 1 x 1 crop pair: base + grid) is the top 5 of its packed scores.
    report = model(**batch).compression
    scores = model._signal_packer(layouts_of(model, batch)[:1], per_head.device)(per_head)[0]  # (M,)
    kept = report.source_index[0][report.source_index[0] >= 0]
    assert sorted(kept.tolist()) == sorted(scores.topk(5).indices.tolist())


def test_received_attention_matches_a_loop_over_queries():
    generator = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(2, 2, 6, 8, generator=generator).unbind(0)  # (P=2, T=6, A=8) each
    heads = 2
    expected = torch.zeros(2, 6)
    joint = torch.zeros(2, 6)
    for crop in range(2):
        for query in range(6):
            for head in range(heads):
                q, k = queries[crop, query, head * 4 : head * 4 + 4], keys[crop, :, head * 4 : head * 4 + 4]
                expected[crop] += (k @ q / 2.0).softmax(0) / (6 * heads)
            joint[crop] += (keys[crop] @ queries[crop, query] / 8**0.5).softmax(0) / 6
    torch.testing.assert_close(received_attention(queries, keys, heads, per_head=True), expected)
    torch.testing.assert_close(received_attention(queries, keys, heads, per_head=False), joint)


def kept_without_newlines(settings: dict, layouts) -> list[int]:
    expected = []
    for layout in layouts:
        sizes = [rows * cols for rows, cols in layout.views]
        budget = settings.get("budget")
        per_view = settings["method"] == "gprune" or (
            settings["method"] == "cls_attention" and settings.get("budget_scope", "view") == "view"
        )  # G-Prune's graph per view, FasterVLM's per-crop share per view
        if per_view:
            budget = 0.5 if budget is None else budget
            if isinstance(budget, float):
                expected.append(sum(resolve_budget(budget, size) for size in sizes))
                continue
        expected.append(resolve_budget(budget, sum(sizes)))
    return expected


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "cls_attention", "budget": 0.3},
        {"method": "cls_attention", "budget": 20},
        {"method": "trsm", "budget": 7, "guidance": "llm"},
        {"method": "gprune"},
        {"method": "gprune", "budget": 30},
        {"method": "rc", "budget": 0.2, "guidance": "llm"},
        {"method": "random", "budget": 0.5},
    ],
    ids=["ratio", "count", "trsm_count", "gprune_default", "gprune_count", "rc_ratio", "random"],
)
def test_budgets_count_tokens_without_newlines_and_keep_every_newline(settings):
    model = tiny_onevision_model(settings)
    batch = make_onevision_batch([5, 5, 5], [[(112, 112)], [(20, 56), (60, 30)], [(84, 112)]], seed=6)
    layouts = layouts_of(model, batch)
    report = model(**batch).compression
    newlines = [int((layout.token_index == -1).sum()) for layout in layouts]
    assert report.newline_counts.tolist() == newlines == [12, 1, 1, 10]
    assert report.patch_counts.tolist() == [16 + 144, 16, 16, 16 + 130]
    assert (report.kept_counts - report.newline_counts).tolist() == kept_without_newlines(settings, layouts)


def test_output_keeps_reading_order_and_the_newlines_in_place():
    model = tiny_onevision_model({"method": "cls_attention", "budget": 0.4})
    batch = make_onevision_batch([4, 6], [[(112, 112)], [(56, 56), (28, 28)]], seed=7)
    report = model(**batch).compression
    for image, (rows, cols) in enumerate([(12, 12), (0, 0), (0, 0)]):
        sources = report.source_index[image, : report.kept_counts[image]].tolist()
        kept = [source for source in sources if source >= 0]
        assert kept == sorted(kept)
        if not rows:  # base view only: its kept tokens, then the one newline
            assert sources[-1] == NEWLINE_SOURCE and sources.count(NEWLINE_SOURCE) == 1
            continue
        row = 0
        for source in sources:
            if source == NEWLINE_SOURCE:
                row += 1
            elif source >= NUM_PATCHES:
                assert (source - NUM_PATCHES) // cols == row
        assert row == rows and sources[-1] == NEWLINE_SOURCE


@pytest.mark.parametrize(
    "compression",
    [{"method": "cls_attention", "budget": 0.5}, {"method": "gprune"}, None, {"method": "prumerge_plus"}],
    ids=["cls_attention", "gprune", "default_rc_llm_guidance", "prumerge_plus_adaptive"],
)
def test_batch_equals_each_sample_alone(compression):
    model = tiny_onevision_model(compression)
    batch = make_onevision_batch(PROMPTS, ROWS, seed=8)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    counts = out.compression.kept_counts
    first = 0
    for row, sizes in enumerate(ROWS):
        single = unpad_onevision_row(batch, row, first, len(sizes))
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
    model = tiny_onevision_model(compression)
    batch = make_onevision_batch([3, 10, 6], [[(112, 112)], [(20, 56)], [(60, 30), (28, 28)]], seed=9)
    # No min_new_tokens: the reference loop does not suppress EOS; generate stops a row at its EOS.
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1] :]
    geometry = model.image_geometry(batch["image_sizes"], batch["batch_num_images"])
    expected = greedy_loop_without_cache(model, batch, 5, image_sizes=geometry)
    eos = model.generation_config.eos_token_id
    for row in range(expected.shape[0]):
        ends = (expected[row] == eos).nonzero().flatten().tolist()
        length = ends[0] + 1 if ends else expected.shape[1]
        assert torch.equal(out[row, :length], expected[row, :length]), row


def video_batch(seed: int = 10) -> dict:
    frames = 2
    video_tokens = frames * ((SIDE + 1) // 2) ** 2 + 1  # pooled frames, one newline after all of them
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 20, (2, 4), generator=generator)
    input_ids = torch.cat([text[:, :1], torch.full((2, video_tokens), VIDEO_TOKEN_ID), text[:, 1:]], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": torch.randn(2, frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }


def test_video_with_compression_on_is_refused_and_stock_when_off():
    model = tiny_onevision_model({"method": "cls_attention", "budget": 4})
    batch = video_batch()
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(**batch)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model.generate(**batch, **GREEDY)
    stock = onevision_stock_twin(model)
    with torch.no_grad():
        assert torch.equal(model(**batch, compression={"method": "none"}).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, compression={"method": "none"}, **GREEDY),
                       stock.generate(**batch, **GREEDY))


def test_bad_inputs_are_explained():
    model = tiny_onevision_model({"method": "cls_attention", "budget": 4})
    batch = make_onevision_batch([4], [[(56, 56)]])
    with pytest.raises(ValueError, match="image_sizes"):
        model(**{**batch, "image_sizes": None})
    with pytest.raises(ValueError, match="batch_num_images"):
        model(**{**batch, "batch_num_images": torch.tensor([2])})
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        model(**batch, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="importance_score='cls_attention' needs a vision tower with a \\[CLS\\]"):
        tiny_onevision_model({"method": "cls_attention", "budget": 4}, importance_score="cls_attention")(**batch)
    with pytest.raises(ValueError, match="importance_score must be one of"):
        tiny_onevision_model(importance_score="cls")
    with pytest.raises(ValueError, match="attention_sinks must be an int >= 0"):
        tiny_onevision_model(attention_sinks=-1)


def test_vision_tower_runs_once_over_all_crops():
    model = tiny_onevision_model({"method": "cls_attention", "budget": 4})
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        model.generate(**make_onevision_batch([4, 5], [[(56, 56)], [(20, 56), (28, 28)]]), **GREEDY)
    finally:
        handle.remove()
    assert calls == [5 + 1 + 1]


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"none"}))
def test_every_registered_method_runs_on_onevision_images(method):
    model = tiny_onevision_model({"method": method})
    batch = make_onevision_batch(PROMPTS, ROWS, seed=12)
    report = model(**batch).compression
    layouts = layouts_of(model, batch)
    newlines = torch.tensor([int((layout.token_index == -1).sum()) for layout in layouts])
    assert torch.equal(report.newline_counts, newlines)
    assert (report.kept_counts >= newlines).all()
    assert (report.kept_counts - newlines <= report.patch_counts).all()
    assert (report.source_index < report.patch_counts.unsqueeze(1)).all()


def test_training_forward_realigns_labels_and_matches_each_row_alone():
    model = tiny_onevision_model({"method": "cls_attention", "budget": 0.5})
    batch = make_onevision_batch([6, 9], [[(112, 112)], [(20, 56), (60, 30)]], seed=13)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    out = model(**batch, labels=labels)
    assert out.labels.shape == out.logits.shape[:2] == out.attention_mask.shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    first, losses = 0, []
    for row, count in enumerate([1, 2]):
        single = unpad_onevision_row(batch, row, first, count)
        row_labels = labels[row][batch["attention_mask"][row].bool()].unsqueeze(0)
        alone = model(**single, labels=row_labels)
        valid = alone.labels[:, 1:] != -100
        losses.append((alone.loss * valid.sum(), valid.sum()))
        first += count
    total = sum(loss for loss, _ in losses) / sum(count for _, count in losses)
    torch.testing.assert_close(out.loss, total, rtol=1e-4, atol=1e-5)
