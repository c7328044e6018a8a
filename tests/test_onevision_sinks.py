"""The received-attention score and its ``attention_sinks`` option: sinks are picked by the plain statistic, and the
option gives exactly the statistic of the crop without its sinks."""

import pytest
import torch

from llava_rc.vision_importance import received_attention
from tiny_onevision import make_onevision_batch, tiny_onevision_model


def crops_with_sinks(num_tokens=40, num_sinks=2, seed=0):
    """(queries, keys) (P, T, A) where ``num_sinks`` tokens per crop have large keys along a direction that every
    query leans towards, and the sink mask (P, T)."""
    generator = torch.Generator().manual_seed(seed)
    crops, width = 3, 16
    queries = torch.randn(crops, num_tokens, width, generator=generator)
    keys = torch.randn(crops, num_tokens, width, generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(width, generator=generator), dim=0)
    queries = queries + 3.0 * direction
    positions = torch.rand(crops, num_tokens, generator=generator).argsort(1)[:, :num_sinks]
    is_sink = torch.zeros(crops, num_tokens, dtype=torch.bool).scatter(1, positions, True)
    keys = torch.where(is_sink.unsqueeze(-1), 30.0 * direction.expand_as(keys), keys)
    return queries, keys, is_sink


@pytest.mark.parametrize("per_head", [True, False])
def test_plain_statistic_ranks_the_sinks_first(per_head):
    queries, keys, is_sink = crops_with_sinks()
    scores = received_attention(queries, keys, num_heads=2, per_head=per_head)
    assert is_sink.gather(1, scores.topk(2).indices).all()
    assert (scores * is_sink).sum(1).min() > 0.3  # the sinks take a large share of the attention


@pytest.mark.parametrize("per_head", [True, False])
def test_excluding_sinks_gives_the_statistic_of_the_crop_without_them(per_head):
    queries, keys, is_sink = crops_with_sinks()
    scores = received_attention(queries, keys, num_heads=2, per_head=per_head, num_sinks=2)
    assert torch.equal(scores == 0, is_sink)
    for crop in range(queries.shape[0]):
        content = ~is_sink[crop]
        alone = received_attention(queries[crop, content][None], keys[crop, content][None], 2, per_head=per_head)[0]
        torch.testing.assert_close(scores[crop, content], alone)
    torch.testing.assert_close(scores.sum(1), torch.ones(3))


def test_sink_count_must_leave_tokens():
    queries, keys, _ = crops_with_sinks(num_tokens=4)
    with pytest.raises(ValueError, match="attention_sinks=4 must be less than the 4 tokens"):
        received_attention(queries, keys, num_heads=2, num_sinks=4)


def test_model_option_zeroes_the_most_attended_tokens_and_changes_the_selection():
    batch = make_onevision_batch([4], [[(56, 56)]], seed=11)
    plain = tiny_onevision_model({"method": "cls_attention", "budget": 8})
    without_sinks = tiny_onevision_model({"method": "cls_attention", "budget": 8}, attention_sinks=1)
    assert without_sinks.config.attention_sinks == 1
    geometry = plain.image_geometry(batch["image_sizes"], batch["batch_num_images"])
    crops, _ = plain._image_crops(batch["pixel_values"], geometry)
    with torch.no_grad():
        hidden = plain.model.vision_tower(crops, output_hidden_states=True).hidden_states
    settings = plain.compression_settings()
    plain_scores = plain._crop_importance(hidden, -1, settings)[0]  # (P, N)
    sink_scores = without_sinks._crop_importance(hidden, -1, settings)[0]
    top = plain_scores.argmax(1)  # (P,)
    assert (sink_scores.gather(1, top[:, None]) == 0).all()
    assert ((sink_scores == 0).sum(1) == 1).all()
    kept_plain = plain(**batch).compression.source_index
    kept_without = without_sinks(**batch).compression.source_index
    assert not torch.equal(kept_plain, kept_without)
