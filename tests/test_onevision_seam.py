"""The family seam: the importance score is selectable by config for every family (received attention on CLIP towers
too), and the default keeps LLaVA-1.5 / LLaVA-NeXT on their [CLS] attention."""

import torch

from tiny import make_batch, tiny_rc_model
from tiny_next import make_next_batch, tiny_next_model


def test_received_attention_on_a_clip_tower_matches_its_eager_attention_without_the_cls_column():
    model = tiny_rc_model(
        {"method": "cls_attention", "budget": 5, "attention_layer": "consuming"}, importance_score="received_attention"
    )
    batch = make_batch([4, 5], [1, 1], seed=1)
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=True)
    # LLaVA's feature layer -2 is read by the last layer: its attention is the score.
    eager = out.attentions[-1].mean(dim=(1, 2))[:, 1:]  # (P, N) received by each patch, [CLS] column dropped
    per_head, _, keys, _ = model._crop_importance(out.hidden_states, -2, model.compression_settings())
    torch.testing.assert_close(per_head, eager, rtol=1e-5, atol=1e-6)
    assert keys.shape[1] == eager.shape[1]
    report = model(**batch).compression
    for image in range(2):
        assert sorted(report.source_index[image].tolist()) == sorted(eager[image].topk(5).indices.tolist())


def test_default_score_of_clip_families_is_their_cls_attention():
    batch = make_batch([4, 5], [1, 1], seed=2)
    default = tiny_rc_model({"method": "cls_attention", "budget": 5})
    explicit = tiny_rc_model({"method": "cls_attention", "budget": 5}, importance_score="cls_attention")
    received = tiny_rc_model({"method": "cls_attention", "budget": 5}, importance_score="received_attention")
    kept = default(**batch).compression.source_index
    assert torch.equal(kept, explicit(**batch).compression.source_index)
    assert not torch.equal(kept, received(**batch).compression.source_index)


def test_received_attention_on_llava_next_keeps_the_budget_and_newlines():
    model = tiny_next_model({"method": "rc", "budget": 0.25}, importance_score="received_attention", attention_sinks=1)
    batch = make_next_batch([5], [[(56, 56)]], seed=3)
    report = model(**batch).compression
    assert report.newline_counts.tolist() == [8]
    assert report.kept_counts.tolist() == [8 + (16 + 64) // 4]
