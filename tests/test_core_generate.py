"""generate() with compression: identical to stock when off, exact and batch-consistent when on."""

from dataclasses import dataclass

import pytest
import torch

from llava_rc import LlavaRCForConditionalGeneration
from llava_rc.compressed_generation import PADDING_SOURCE, SYNTHETIC_SOURCE
from llava_rc.compression_common import CompressionInputs, MethodConfig, TokenPlan, cls_attention, plan_from_mask
from llava_rc.compression_registry import METHODS
from tiny import NUM_PATCHES, greedy_loop_without_cache, make_batch, stock_twin, tiny_rc_model, unpad_row

GREEDY = dict(max_new_tokens=6, do_sample=False)


@dataclass(frozen=True)
class AboveMeanConfig(MethodConfig):
    """Test-only method with a data-dependent count: keep patches above the mean [CLS] attention, merge the rest
    into one extra token (their mean). Exercises different k_i per image and the merge path."""

    method = "above_mean"
    needs_attention = True


def above_mean(inputs: CompressionInputs, config: AboveMeanConfig) -> TokenPlan:
    attention = cls_attention(inputs)  # (I, N)
    chosen = attention > attention.mean(dim=-1, keepdim=True)
    selection = plan_from_mask(chosen)
    num_images, num_patches = attention.shape
    kept_rows = torch.nn.functional.one_hot(selection.source_index.clamp(min=0), num_patches).float()
    kept_rows = kept_rows * (selection.source_index >= 0).unsqueeze(-1)
    rest = (~chosen).float()
    extra_row = (rest / rest.sum(-1, keepdim=True).clamp(min=1)).unsqueeze(1)  # (I, 1, N)
    weights = torch.cat([kept_rows, torch.zeros_like(extra_row)], dim=1)  # (I, K + 1, N)
    # Place the extra row right after each image's kept rows.
    counts = selection.counts
    weights = weights.scatter(1, counts.view(-1, 1, 1).expand(-1, 1, num_patches), extra_row)
    source = torch.cat([selection.source_index, torch.full_like(counts, -1).unsqueeze(1)], dim=1)
    return TokenPlan(source_index=source, counts=counts + 1, merge_weights=weights)


@pytest.fixture
def above_mean_method(monkeypatch):
    monkeypatch.setitem(METHODS, "above_mean", (AboveMeanConfig, above_mean))
    return {"method": "above_mean"}


def test_compression_off_is_bit_identical_to_stock():
    model = tiny_rc_model({"method": "none"})
    stock = stock_twin(model)
    batch = make_batch([5, 9, 3], [1, 1, 1])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)
    assert torch.equal(model.generate(**batch, **GREEDY), stock.generate(**batch, **GREEDY))


def test_per_call_none_matches_stock_and_leaves_config_alone():
    model = tiny_rc_model({"method": "cls_attention", "budget": 4})
    stock = stock_twin(model)
    batch = make_batch([4, 7], [1, 1])
    out = model.generate(**batch, compression={"method": "none"}, **GREEDY)
    assert torch.equal(out, stock.generate(**batch, **GREEDY))
    assert model.config.compression["method"] == "cls_attention"
    compressed = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    assert compressed.compression.kept_counts.tolist() == [4, 4]


@pytest.mark.parametrize(
    "compression",
    [{"method": "cls_attention", "budget": 5}, "above_mean", None, {"method": "rc", "guidance": "llm"},
     {"method": "rc", "guidance": None}],
    ids=["cls_attention", "above_mean", "default_rc", "rc_llm_guidance", "rc_vision_only"],
)
def test_batch_equals_each_sample_alone(compression, above_mean_method):
    compression = above_mean_method if compression == "above_mean" else compression
    model = tiny_rc_model(compression)
    images_per_row = [1, 0, 2, 1]
    batch = make_batch([6, 11, 4, 8], images_per_row, seed=3)
    out = model.generate(**batch, return_dict_in_generate=True, **GREEDY)
    length = batch["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :length], batch["input_ids"])
    counts = out.compression.kept_counts
    assert counts.shape == (sum(images_per_row),)
    first = 0
    for row, num_images in enumerate(images_per_row):
        single = unpad_row(batch, row, first, num_images)
        alone = model.generate(**single, return_dict_in_generate=True, **GREEDY)
        assert torch.equal(out.sequences[row, length:], alone.sequences[0, single["input_ids"].shape[1] :])
        if num_images:
            assert torch.equal(alone.compression.kept_counts, counts[first : first + num_images])
        first += num_images


def test_rc_is_the_default():
    assert tiny_rc_model().config.compression["method"] == "rc"


def test_dynamic_counts_differ_per_image(above_mean_method):
    model = tiny_rc_model(above_mean_method)
    batch = make_batch([5, 5, 5], [1, 1, 1], seed=1)
    report = model.generate(**batch, return_dict_in_generate=True, **GREEDY).compression
    assert len(set(report.kept_counts.tolist())) > 1
    # Provenance: every original patch is accounted for by a kept token or the extra token.
    for image in range(3):
        count = int(report.kept_counts[image])
        covered = report.absorbed[image, :count].any(dim=0)
        assert covered.all()
        assert (report.source_index[image, : count - 1] >= 0).all()
        assert report.source_index[image, count - 1] == SYNTHETIC_SOURCE  # the extra token: no anchor patch
        assert (report.source_index[image, count:] == PADDING_SOURCE).all()


def test_generate_equals_no_cache_greedy_loop(above_mean_method):
    model = tiny_rc_model(above_mean_method)
    batch = make_batch([3, 10, 6], [1, 1, 1], seed=5)
    out = model.generate(**batch, **GREEDY)
    expected = greedy_loop_without_cache(model, batch, GREEDY["max_new_tokens"])
    assert torch.equal(out[:, batch["input_ids"].shape[1] :], expected)


def test_beams_and_return_sequences_keep_the_callers_prompt():
    model = tiny_rc_model({"method": "cls_attention", "budget": 0.25})
    batch = make_batch([4, 9], [1, 1], seed=2)
    length = batch["input_ids"].shape[1]
    out = model.generate(**batch, num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 4
    assert torch.equal(out[:, :length], batch["input_ids"].repeat_interleave(2, dim=0))
    sampled = model.generate(**batch, do_sample=True, num_return_sequences=3, max_new_tokens=4)
    assert sampled.shape == (6, length + 4)
    assert torch.equal(sampled[:, :length], batch["input_ids"].repeat_interleave(3, dim=0))


def test_max_length_counts_from_the_callers_prompt():
    model = tiny_rc_model({"method": "cls_attention", "budget": 3})
    stock_length_model = tiny_rc_model({"method": "none"})
    batch = make_batch([4, 6], [1, 1], seed=4)
    length = batch["input_ids"].shape[1]
    out = model.generate(**batch, max_length=length + 5, do_sample=False)
    assert out.shape[1] == length + 5
    reference = stock_length_model.generate(**batch, max_length=length + 5, do_sample=False)
    assert reference.shape == out.shape


def test_vision_tower_runs_once_per_generate_call():
    model = tiny_rc_model({"method": "cls_attention", "budget": 4})
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**make_batch([4, 5], [1, 2]), **GREEDY)
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize("attention_layer, layer_index", [("producing", -2), ("consuming", -1)])
def test_kept_tokens_are_the_top_cls_attention_patches(attention_layer, layer_index):
    """FasterVLM reads the layer that produces LLaVA's feature layer (-2); "consuming" reads the one that reads it."""
    model = tiny_rc_model({"method": "cls_attention", "budget": 6, "attention_layer": attention_layer})
    batch = make_batch([4], [1], seed=9)
    report = model.generate(**batch, return_dict_in_generate=True, **GREEDY).compression
    with torch.no_grad():
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        layer = model.model.vision_tower.encoder.layers[layer_index]  # reads hidden_states[layer_index - 1]
        normed = layer.layer_norm1(hidden[layer_index - 1])
        heads = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(normed).view(1, -1, heads, 8).transpose(1, 2)
        k = layer.self_attn.k_proj(normed).view(1, -1, heads, 8).transpose(1, 2)
        attention = ((q @ k.transpose(-1, -2)) / 8**0.5).softmax(-1).mean(1)[0, 0, 1:]  # (N,)
    expected = attention.topk(6).indices.sort().values
    assert torch.equal(report.source_index[0], expected)
    assert report.num_patches == NUM_PATCHES
