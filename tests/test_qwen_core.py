"""Qwen2.5-VL-RC and Qwen3-VL-RC on tiny random models: compression off (and keep-all) is the stock model, a batch is
each row alone for every method, positions continue, the importance is the tower's own attention, training works."""

import inspect
import tempfile

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoModelForImageTextToText
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from llava_rc import Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration
from llava_rc.compression_registry import METHODS
from test_method_matrix import METHOD_ROWS
from tiny_qwen import FAMILIES, GRIDS, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, make_qwen_batch, qwen_stock_twin
from tiny_qwen import tiny_qwen2_5_config_dict, unpad_qwen_row

# Compression on Qwen needs generate's mm_encoder_outputs (transformers >= 5.23); CI also runs the oldest, 5.17.
pytestmark = pytest.mark.skipif(
    "mm_encoder_outputs" not in inspect.signature(transformers.Qwen2_5_VLForConditionalGeneration.forward).parameters,
    reason="Qwen-VL compression needs transformers >= 5.23",
)

GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
# Row 0: two images of different grids; row 1: a text-only row; row 2: one image of a third grid (left padding).
PROMPTS = [6, 9, 3]
ROWS = [[GRIDS[0], GRIDS[1]], [], [GRIDS[2]]]
FAMILY_NAMES = sorted(FAMILIES)


def tiny(family, compression=None, **overrides):
    return FAMILIES[family][0](compression, **overrides)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("pad_left", [True, False], ids=["left_padding", "right_padding"])
def test_compression_off_is_bit_identical_to_stock(family, pad_left):
    model = tiny(family, {"method": "none"})
    stock = qwen_stock_twin(model)
    batch = make_qwen_batch(PROMPTS, ROWS, seed=1, pad_left=pad_left)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    if pad_left:
        assert torch.equal(model.generate(**batch, **GREEDY), stock.generate(**batch, **GREEDY))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keeping_every_token_is_bit_identical_to_stock(family):
    """The rebuilt positions, ids and encoder outputs are the stock ones when nothing is dropped."""
    model = tiny(family, {"method": "cls_attention", "budget": 1.0})
    stock = qwen_stock_twin(model)
    batch = make_qwen_batch(PROMPTS, ROWS, seed=2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, **GREEDY), stock.generate(**batch, **GREEDY))
    # Beams and several sequences per prompt repeat each row's kept tokens with its row.
    assert torch.equal(model.generate(**batch, num_beams=2, **GREEDY), stock.generate(**batch, num_beams=2, **GREEDY))
    sampled = []
    for candidate in (model, stock):
        torch.manual_seed(0)
        sampled.append(candidate.generate(**batch, num_return_sequences=2, max_new_tokens=4, do_sample=True, top_k=5))
    assert torch.equal(*sampled)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_selected_token_is_read_as_the_stock_token_at_its_stock_position(family):
    """One row, one image: the compressed forward equals the stock forward fed the kept stock tokens (DeepStack
    features too) at the columns of the uncompressed sequence's 3-D positions."""
    model = tiny(family, {"method": "cls_attention", "budget": 5})
    batch = make_qwen_batch([7], [[GRIDS[1]]], seed=3)
    with torch.no_grad():
        out = model(**batch)
        kept = out.compression.source_index[0, : int(out.compression.kept_counts[0])]
        stock = qwen_stock_twin(model)
        features = stock.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        fields = {"pooler_output": (features.pooler_output[0][kept],)}
        if getattr(features, "deepstack_features", None):
            fields["deepstack_features"] = [(level[0][kept],) for level in features.deepstack_features]
        ids = batch["input_ids"][0]
        start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
        columns = torch.cat([torch.arange(start), start + kept, torch.arange(start + 24, ids.shape[0])])
        positions, _ = stock.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                  batch["image_grid_thw"])
        positions = torch.cat([torch.arange(columns.shape[0]).view(1, 1, -1), positions[:, :, columns]])
        expected = stock(
            input_ids=ids[columns][None],
            attention_mask=torch.ones(1, columns.shape[0], dtype=torch.long),
            position_ids=positions,
            mm_encoder_outputs={"image": type(features)(**fields)},
        ).logits
    assert kept.shape[0] == 5
    assert torch.equal(out.logits, expected)


def captured_block_attention(model, batch):
    """The softmax attention of every ViT attention call, from the tower's own forward (eager), in call order."""
    calls = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        calls.append(weights)
        return output, weights

    AttentionInterface.register("capture_for_test", capture)
    tower = model.model.visual
    saved = tower.config._attn_implementation
    tower.config._attn_implementation = "capture_for_test"
    try:
        with torch.no_grad():
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    finally:
        tower.config._attn_implementation = saved
        AttentionInterface.register("capture_for_test", sdpa_attention_forward)
    return calls


def test_importance_is_the_received_attention_of_the_last_full_attention_block_per_merge_unit():
    """Qwen2.5-VL: the recomputed statistic equals the attention the tower itself computed at block 3 (its last
    full-attention block), averaged over heads and queries, summed per 2 x 2 unit, window permutation undone."""
    from transformers.vision_utils import get_vision_window_index

    model = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([4], [[GRIDS[1], GRIDS[3]]], seed=4)
    calls = captured_block_attention(model, batch)
    # Blocks 0 and 2 attend per window of 2 x 2 units (2 x 3 + 1 x 4 windows), blocks 1 and 3 per image (2 calls).
    assert len(calls) == 10 + 2 + 10 + 2
    per_patch = torch.cat([weights.mean(dim=(1, 2))[0] for weights in calls[-2:]])  # (S,) window order
    per_unit = per_patch.view(-1, 4).sum(dim=-1)
    window_index, _ = get_vision_window_index(batch["image_grid_thw"], 2, 16, 4, kwargs={})
    expected = per_unit[torch.argsort(window_index)]
    hidden = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                            output_hidden_states=True).hidden_states
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    per_head, joint, keys, heads = model._merge_unit_importance(hidden[3], batch["image_grid_thw"], sizes)
    torch.testing.assert_close(per_head, expected, rtol=1e-5, atol=1e-7)
    assert heads == 4 and keys.shape == (sum(sizes) // 4, 32) and joint.shape == per_head.shape
    for scores in (per_head, joint):
        torch.testing.assert_close(scores.split([size // 4 for size in sizes])[0].sum(), torch.tensor(1.0))


def test_qwen3_importance_reads_the_last_block():
    model = tiny("qwen3_vl", {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([4], [[GRIDS[0], GRIDS[2]]], seed=5)
    calls = captured_block_attention(model, batch)
    assert len(calls) == 3 * 2  # every block attends per image
    expected = torch.cat([weights.mean(dim=(1, 2))[0] for weights in calls[-2:]]).view(-1, 4).sum(dim=-1)
    hidden = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                            output_hidden_states=True).hidden_states
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    per_head, _, _, _ = model._merge_unit_importance(hidden[2], batch["image_grid_thw"], sizes)
    torch.testing.assert_close(per_head, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"none"}))
def test_batch_equals_each_row_alone_for_every_method(family, method):
    model = tiny(family, METHOD_ROWS[method])
    batch = make_qwen_batch(PROMPTS, ROWS, seed=6)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    counts = out.compression.kept_counts
    assert (counts <= out.compression.patch_counts).all() and (counts >= 1).all()
    first = 0
    for row, grids in enumerate(ROWS):
        single = unpad_qwen_row(batch, row, first, len(grids))
        alone = model.generate(**single, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, single["input_ids"].shape[1] :]), row
        if grids:
            assert torch.equal(alone.compression.kept_counts, counts[first : first + len(grids)])
        first += len(grids)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_budgets_count_language_model_tokens(family):
    model = tiny(family, {"method": "cls_attention", "budget": 0.25})
    batch = make_qwen_batch([5], [[GRIDS[1], GRIDS[3]]], seed=7)
    report = model(**batch).compression
    assert report.patch_counts.tolist() == [24, 14]  # (8 x 12) / 4 and (4 x 14) / 4 merged tokens
    assert report.kept_counts.tolist() == [6, 3]


def greedy_loop_without_cache(model, batch, steps):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(steps):
        extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
        type_ids = (ids == IMAGE_TOKEN_ID).int()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=type_ids, **extra).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_decode_equals_a_no_cache_greedy_loop(family):
    """Decoding continues every row at its last 3-D position + 1, as a full forward of the longer prompt reads it."""
    model = tiny(family, {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([3, 8], [[GRIDS[1]], [GRIDS[2], GRIDS[0]]], seed=8)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
    expected = greedy_loop_without_cache(model, batch, 4)
    eos = model.generation_config.eos_token_id
    for row in range(expected.shape[0]):
        ends = (expected[row] == eos).nonzero().flatten().tolist()
        stop = ends[0] + 1 if ends else expected.shape[1]
        assert torch.equal(out[row, :stop], expected[row, :stop]), row


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rope_deltas_are_the_compressed_rows(family):
    model = tiny(family, {"method": "cls_attention", "budget": 2})
    batch = make_qwen_batch([3, 8], [[GRIDS[1]], [GRIDS[2]]], seed=9)
    out = model(**batch)
    # Row 0: 2 text + start, 2 image tokens at (h, w) up to start + 5, end and 1 text: last position start + 6 + 1.
    real = out.attention_mask.sum(dim=1)
    expected = torch.tensor([[3 + 6 + 2 - 1 + 1 - int(real[0])], [3 + 5 + 7 - 1 + 1 - int(real[1])]])
    assert torch.equal(model.model.rope_deltas, expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_forward_realigns_labels_and_matches_each_row_alone(family):
    model = tiny(family, {"method": "cls_attention", "budget": 0.5})
    batch = make_qwen_batch([6, 9], [[GRIDS[1]], [GRIDS[2], GRIDS[0]]], seed=10, pad_left=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    out = model(**batch, labels=labels)
    assert out.labels.shape == out.logits.shape[:2] == out.attention_mask.shape
    assert out.logits.shape[1] < batch["input_ids"].shape[1]
    out.loss.backward()
    assert all(parameter.grad.abs().sum() > 0 for parameter in model.model.visual.merger.parameters())
    first, losses = 0, []
    for row, count in enumerate([1, 2]):
        single = unpad_qwen_row(batch, row, first, count)
        row_labels = labels[row][batch["attention_mask"][row].bool()].unsqueeze(0)
        alone = model(**single, labels=row_labels)
        valid = alone.labels[:, 1:] != -100
        losses.append((alone.loss * valid.sum(), valid.sum()))
        first += count
    total = sum(loss for loss, _ in losses) / sum(count for _, count in losses)
    torch.testing.assert_close(out.loss, total, rtol=1e-4, atol=1e-5)


def video_batch(family: str, seed: int = 11) -> dict:
    generator = torch.Generator().manual_seed(seed)
    grid = (2, 4, 4)  # two temporal patches of 4 x 4 patches: 8 tokens
    if family == "qwen3_vl":  # one vision_start ... vision_end run per temporal patch
        ids = [5, 6] + ([62] + [VIDEO_TOKEN_ID] * 4 + [63]) * 2 + [7]
    else:
        ids = [5, 6, 62] + [VIDEO_TOKEN_ID] * 8 + [63, 7]
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == VIDEO_TOKEN_ID).int() * 2,
        "pixel_values_videos": torch.randn(32, 96, generator=generator),
        "video_grid_thw": torch.tensor([grid]),
    }


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_video_with_compression_on_is_refused_and_stock_when_off(family):
    model = tiny(family, {"method": "cls_attention", "budget": 4})
    batch = video_batch(family)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(**batch)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model.generate(**batch, **GREEDY)
    stock = qwen_stock_twin(model)
    with torch.no_grad():
        assert torch.equal(model(**batch, compression={"method": "none"}).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, compression={"method": "none"}, **GREEDY),
                       stock.generate(**batch, **GREEDY))


def test_continuation_rules_match_llava():
    model = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([4], [[GRIDS[1]]], seed=12)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    with pytest.raises(ValueError, match="past_key_values were filled from a compressed prompt"):
        model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, **GREEDY)
    forward_cache = model(**batch, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="past_key_values were filled from a compressed prompt"):
        model.generate(input_ids=out.sequences, past_key_values=forward_cache, **GREEDY)
    with pytest.raises(ValueError, match="non-empty past_key_values"):
        model(**batch, past_key_values=out.past_key_values)
    # Continuing without the cache compresses again and extends the caller's sequence.
    again = model.generate(
        input_ids=out.sequences,
        attention_mask=torch.ones_like(out.sequences),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        **GREEDY,
    )
    assert torch.equal(again[:, : out.sequences.shape[1]], out.sequences)


def test_bad_inputs_are_explained():
    model = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([4], [[GRIDS[1]]], seed=13)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{**batch, "image_grid_thw": None})
    with pytest.raises(ValueError, match="input_ids has 24 image tokens but image_grid_thw"):
        model(**{**batch, "image_grid_thw": torch.tensor([[1, 8, 8]]), "pixel_values": batch["pixel_values"][:64]})
    masked = batch["attention_mask"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, 0)
    with pytest.raises(ValueError, match="attention_mask is 0 on 24 image placeholder"):
        model(**{**batch, "attention_mask": masked})
    with pytest.raises(ValueError, match="guidance='clip' is not supported"):
        model(**batch, compression={"method": "rc", "guidance": "clip"})
    with pytest.raises(ValueError, match="cls_attention' needs a vision tower with a \\[CLS\\]"):
        Qwen2_5_VLRCConfig(**tiny_qwen2_5_config_dict(importance_score="cls_attention"))


def test_config_from_a_stock_config_dict_loads_the_stock_weights_strictly():
    stock = qwen_stock_twin(tiny("qwen2_5_vl"))
    config = Qwen2_5_VLRCConfig(
        **{k: v for k, v in stock.config.to_dict().items() if k != "model_type"}, compression={"method": "trsm"}
    )
    assert config.model_type == "qwen2_5_vl_rc" and config.compression["method"] == "trsm"
    model = Qwen2_5_VLRCForConditionalGeneration(config)
    model.load_state_dict(stock.state_dict(), strict=True)


def test_transformers_contracts_tuple_output_hidden_states_and_save_load():
    model = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3})
    batch = make_qwen_batch([5, 3], [[GRIDS[0], GRIDS[1]], [GRIDS[2]]], seed=14)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        as_tuple = model(**batch, labels=labels, return_dict=False)
        as_output = model(**batch, labels=labels, output_hidden_states=True)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_output.loss)
    assert torch.equal(as_tuple[1], as_output.logits)
    assert all(state.shape[1] == as_output.logits.shape[1] for state in as_output.hidden_states)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = AutoModelForImageTextToText.from_pretrained(directory).eval()
    assert type(loaded) is type(model) and loaded.config.compression == model.config.compression
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_attention_sinks_are_counted_in_patches_and_scores_still_sum_to_one_per_image():
    plain = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3})
    with_sinks = tiny("qwen2_5_vl", {"method": "cls_attention", "budget": 3}, attention_sinks=2)
    batch = make_qwen_batch([4], [[GRIDS[1], GRIDS[2]]], seed=15)
    hidden = plain.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                            output_hidden_states=True).hidden_states
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    units = [size // 4 for size in sizes]
    base = plain._merge_unit_importance(hidden[3], batch["image_grid_thw"], sizes)[0]
    cleaned = with_sinks._merge_unit_importance(hidden[3], batch["image_grid_thw"], sizes)[0]
    for scores in (base, cleaned):
        torch.testing.assert_close(scores.split(units)[0].sum(), torch.tensor(1.0))
        torch.testing.assert_close(scores.split(units)[1].sum(), torch.tensor(1.0))
    assert not torch.allclose(cleaned, base)  # the option reaches the Qwen statistic
