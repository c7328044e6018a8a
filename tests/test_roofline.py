"""The roofline arithmetic of benchmarks/roofline.py: known counts for a toy geometry and the two limits."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py"
)
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

TOY_TEXT = roofline.TransformerShape(layers=2, hidden=8, heads=2, kv_heads=1, intermediate=16, gated_mlp=True, vocab=10)
TOY_VISION = roofline.TransformerShape(layers=1, hidden=4, heads=1, kv_heads=1, intermediate=8, gated_mlp=False)
TOY = roofline.LlavaShape(vision=TOY_VISION, image_tokens=5, patches=4, text=TOY_TEXT, dtype_bytes=2)

LLAVA_7B = roofline.LlavaShape(
    vision=roofline.TransformerShape(layers=24, hidden=1024, heads=16, kv_heads=16, intermediate=4096, gated_mlp=False),
    image_tokens=577,
    patches=576,
    text=roofline.TransformerShape(
        layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, gated_mlp=True, vocab=32064
    ),
    dtype_bytes=2,
)
H100 = roofline.Ceilings(flops_per_second=700e12, bytes_per_second=3.0e12)


def test_known_counts_for_a_toy_geometry():
    # q and o: 8 x 8 each; k and v: 8 x 4 each (one KV head of width 4); gate, up, down: 8 x 16 each.
    assert TOY_TEXT.layer_params == 2 * 64 + 2 * 32 + 3 * 128 == 576
    assert TOY_TEXT.matmul_params == 2 * 576 + 10 * 8
    # fc1 and fc2 of a plain MLP: 2 matrices.
    assert TOY_VISION.layer_params == 2 * 16 + 2 * 16 + 2 * 32
    cost = roofline.encoder_cost(TOY_TEXT, tokens=4, sequences=3, dtype_bytes=2, causal=True)
    linear = 2 * 2 * 576 * 12
    attention = 4 * 2 * 8 * (16 * 0.5) * 3  # causal: half the 4 x 4 square, per sequence
    assert cost.flops == linear + attention
    full = roofline.encoder_cost(TOY_TEXT, tokens=4, sequences=3, dtype_bytes=2, causal=False)
    assert full.flops - linear == 2 * attention
    # KV cache: K and V, 2 layers, width 4, 7 tokens, 3 sequences, 2 bytes.
    assert roofline.kv_cache_bytes(TOY_TEXT, 7, 3, 2) == 2 * 2 * 4 * 7 * 3 * 2
    step = roofline.decode_step_cost(TOY, context=7, batch=3)
    assert step.flops == 2 * TOY_TEXT.matmul_params * 3 + 4 * 2 * 8 * 7 * 3
    assert step.bytes > TOY_TEXT.matmul_params * 2 + roofline.kv_cache_bytes(TOY_TEXT, 7, 3, 2)


def test_roofline_time_is_the_slower_limit():
    cost = roofline.Cost(flops=10.0, bytes=3.0)
    assert cost.seconds(roofline.Ceilings(flops_per_second=5.0, bytes_per_second=1.0)) == 3.0
    assert cost.bound(roofline.Ceilings(flops_per_second=5.0, bytes_per_second=1.0)) == "memory"
    assert cost.seconds(roofline.Ceilings(flops_per_second=2.0, bytes_per_second=10.0)) == 5.0
    assert cost.bound(roofline.Ceilings(flops_per_second=2.0, bytes_per_second=10.0)) == "compute"


def prefill_ratio(geometry, stock_tokens, compressed_tokens, batch, ceilings):
    stock = roofline.prefill_cost(geometry, stock_tokens, batch)
    compressed = roofline.prefill_cost(geometry, compressed_tokens, batch)
    return stock.seconds(ceilings) / compressed.seconds(ceilings), stock, compressed


def test_ratio_is_the_flops_ratio_when_compute_bound_and_the_bytes_ratio_when_bandwidth_bound():
    compute_bound = roofline.Ceilings(flops_per_second=1.0, bytes_per_second=1e30)
    ratio, stock, compressed = prefill_ratio(LLAVA_7B, 640, 128, 1, compute_bound)
    assert ratio == pytest.approx(stock.flops / compressed.flops)
    bandwidth_bound = roofline.Ceilings(flops_per_second=1e30, bytes_per_second=1.0)
    ratio, stock, compressed = prefill_ratio(LLAVA_7B, 640, 128, 1, bandwidth_bound)
    assert ratio == pytest.approx(stock.bytes / compressed.bytes)
    # Small prefills of a 7B model read ~13 GB of weights whatever the length: the bytes ratio is far below the
    # FLOPs ratio (576 -> 64 image tokens with 64 text tokens: ~4.9x the FLOPs).
    assert ratio < 1.5
    assert stock.flops / compressed.flops > 4.5


def test_7b_batch_1_is_weight_bound_and_large_batches_approach_the_flops_ratio():
    flops_ratio = roofline.prefill_cost(LLAVA_7B, 640, 1).flops / roofline.prefill_cost(LLAVA_7B, 128, 1).flops
    ratios = [prefill_ratio(LLAVA_7B, 640, 128, batch, H100)[0] for batch in (1, 2, 8, 64)]
    assert 2.0 < ratios[0] < 3.5  # the "near 3x at batch 1 on an H100", not the FLOPs ratio
    assert ratios == sorted(ratios)  # more batch, less weight-bound
    assert ratios[-1] == pytest.approx(flops_ratio, rel=0.02)
    assert roofline.prefill_cost(LLAVA_7B, 128, 1).bound(H100) == "memory"
    assert roofline.prefill_cost(LLAVA_7B, 640, 8).bound(H100) == "compute"


def test_ttft_includes_the_vision_tower_and_decode_gains_only_with_a_large_kv_share():
    stock = roofline.Scenario(text_tokens=64, image_tokens=576, projected_tokens=576)
    compressed = roofline.Scenario(text_tokens=64, image_tokens=64, projected_tokens=640)
    lm_only = prefill_ratio(LLAVA_7B, stock.prompt_tokens, compressed.prompt_tokens, 8, H100)[0]
    ttft = roofline.ttft_seconds(LLAVA_7B, stock, 8, H100) / roofline.ttft_seconds(LLAVA_7B, compressed, 8, H100)
    assert 1.0 < ttft < lm_only  # the vision tower costs both the same
    decode_1 = roofline.decode_tokens_per_second(LLAVA_7B, compressed, 1, 32, H100) / (
        roofline.decode_tokens_per_second(LLAVA_7B, stock, 1, 32, H100)
    )
    decode_16 = roofline.decode_tokens_per_second(LLAVA_7B, compressed, 16, 32, H100) / (
        roofline.decode_tokens_per_second(LLAVA_7B, stock, 16, 32, H100)
    )
    assert 1.0 < decode_1 < 1.1 < decode_16 < 1.6


def test_memory_per_request_and_largest_batch():
    stock = roofline.Scenario(text_tokens=64, image_tokens=576, projected_tokens=576)
    compressed = roofline.Scenario(text_tokens=64, image_tokens=64, projected_tokens=640)
    per_stock = roofline.sample_bytes(LLAVA_7B, stock, 32)
    kv_end = roofline.kv_cache_bytes(LLAVA_7B.text, 640 + 32, 1, 2)
    assert kv_end <= per_stock < 1.25 * kv_end  # the KV cache dominates at 7B
    per_compressed = roofline.sample_bytes(LLAVA_7B, compressed, 32)
    assert per_stock / per_compressed > 3.5
    assert roofline.largest_batch(100.0, 30.0, 7.0) == 10
    assert roofline.largest_batch(10.0, 30.0, 7.0) == 0
    with pytest.raises(ValueError, match="per_sample_bytes"):
        roofline.largest_batch(10.0, 1.0, 0.0)
    assert 13e9 < LLAVA_7B.weight_bytes < 15e9  # ~7.1B parameters in fp16


# LLaVA-1.6-7B at 672 x 672: 5 crops of 577 tokens through CLIP, 576 + 2304 + 48 newline tokens to the LM.
LLAVA_NEXT_7B = roofline.LlavaShape(
    vision=LLAVA_7B.vision, image_tokens=577, patches=576 + 2304 + 48, text=LLAVA_7B.text, dtype_bytes=2, crops=5
)
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_next_token_accounting_matches_the_model():
    from transformers import LlavaNextConfig

    from llava_rc import anyres_token_counts
    from llava_rc.compression_registry import parse_compression

    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    base, grid, newlines = anyres_token_counts(config, [[672, 672]])[0].tolist()
    assert (base, grid, newlines) == (576, 2304, 48)
    assert base + grid + newlines == LLAVA_NEXT_7B.patches
    assert LLAVA_NEXT_7B.crop_patches == 5 * 576 == base + grid  # no unpadding at a square image
    # G-Prune's default: half of each graph (base view, grid); the newlines are kept on top.
    assert parse_compression({"method": "gprune"}).fixed_count(((24, 24), (48, 48))) == 288 + 1152
    # A budget counts no newline: 320 of the 2880 tokens send 368 to the LM.
    assert parse_compression({"method": "rc", "budget": 320}).fixed_count(((24, 24), (48, 48))) + newlines == 368


def test_next_vision_tower_runs_every_crop_and_the_prompt_holds_the_newlines():
    one_crop = roofline.vision_cost(LLAVA_7B, 3)
    five_crops = roofline.vision_cost(LLAVA_NEXT_7B, 3)
    assert five_crops.flops == pytest.approx(5 * one_crop.flops)
    stock = roofline.Scenario(text_tokens=64, image_tokens=LLAVA_NEXT_7B.patches, projected_tokens=2880)
    assert stock.prompt_tokens == 64 + 2928
    flops = roofline.prefill_flops(LLAVA_NEXT_7B, stock)
    assert flops["total"] == pytest.approx(flops["vision"] + flops["projector"] + flops["lm"])
    assert flops["vision"] == pytest.approx(five_crops.flops / 3)
    assert flops["projector"] == pytest.approx(2 * LLAVA_NEXT_7B.projector_params * 2880)
    # The vision transient of one request covers all 5 crops.
    per_request = roofline.sample_bytes(LLAVA_NEXT_7B, stock, 32)
    assert per_request >= roofline.kv_cache_bytes(LLAVA_NEXT_7B.text, 64 + 2928 + 32, 1, 2)


def test_gprune_default_halves_the_lm_prefill_flops_short_of_the_papers_figure():
    stock = roofline.Scenario(text_tokens=64, image_tokens=2928, projected_tokens=2880)
    gprune = roofline.Scenario(text_tokens=64, image_tokens=1440 + 48, projected_tokens=2880)
    before, after = roofline.prefill_flops(LLAVA_NEXT_7B, stock), roofline.prefill_flops(LLAVA_NEXT_7B, gprune)
    lm_reduction = 1 - after["lm"] / before["lm"]
    total_reduction = 1 - after["total"] / before["total"]
    assert 0.45 < total_reduction < lm_reduction < 0.55 < 0.6357  # the paper's -63.57% needs fewer tokens
    fastv = 1 - roofline.fastv_lm_flops(LLAVA_7B.text, 1552) / roofline.fastv_lm_flops(LLAVA_7B.text, 2992)
    assert lm_reduction < fastv < 0.55  # FastV's formula counts the full attention square: a larger reduction
    assert roofline.fastv_lm_flops(TOY_TEXT, 3) == 2 * (4 * 3 * 64 + 2 * 9 * 8 + 2 * 3 * 8 * 16)
