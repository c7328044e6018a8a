"""Tiny Qwen2.5-VL / Qwen3-VL models and batches built in code (no downloads, no processor).

The vision tower sees 4 px patches, two frames per temporal patch (a still image is repeated, as the stock
processor does); 2 x 2 patches merge into one language-model token, so an image of (h, w) patches sends h * w / 4
tokens, in a ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` run. Qwen2.5-VL's tower has 4 blocks, full attention
at blocks 1 and 3, window attention of 2 x 2 merge units elsewhere (window_size 16 px), so images larger than one
window exercise the window permutation. Qwen3-VL's tower has 3 blocks (all full attention) with DeepStack features
taken after blocks 0 and 1.
"""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration

from llava_rc import Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration, Qwen3VLRCConfig
from llava_rc import Qwen3VLRCForConditionalGeneration

INIT_RANGE = 0.3
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 60
VIDEO_TOKEN_ID = 61
VISION_START_ID = 62
VISION_END_ID = 63
VOCAB_SIZE = 64
PATCH = 4
TEMPORAL_PATCH = 2
MERGE = 2
PATCH_WIDTH = 3 * TEMPORAL_PATCH * PATCH * PATCH  # values per patch in pixel_values
# (t, h, w) patch grids: one window; 2 x 3 windows; tall; wide.
GRIDS = [(1, 4, 4), (1, 8, 12), (1, 10, 4), (1, 4, 14)]


def tiny_qwen2_5_config_dict(**overrides) -> dict:
    vision = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE,
        window_size=16,
        out_hidden_size=32,
        fullatt_block_indexes=[1, 3],
        initializer_range=INIT_RANGE,
    )
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    config.update(overrides)
    return config


def tiny_qwen2_5_model(compression=None, seed: int = 0, **overrides) -> Qwen2_5_VLRCForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLRCForConditionalGeneration(
        Qwen2_5_VLRCConfig(**tiny_qwen2_5_config_dict(compression=compression, **overrides))
    ).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_qwen3_config_dict(**overrides) -> dict:
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=32,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
        initializer_range=INIT_RANGE,
    )
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    config.update(overrides)
    return config


def tiny_qwen3_model(compression=None, seed: int = 0, **overrides) -> Qwen3VLRCForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3VLRCForConditionalGeneration(
        Qwen3VLRCConfig(**tiny_qwen3_config_dict(compression=compression, **overrides))
    ).eval()
    # Qwen3-VL's own init ignores initializer_range for the tower: widen it so attention is peaked.
    with torch.no_grad():
        for name, parameter in model.model.visual.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.normal_(0.0, INIT_RANGE)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


FAMILIES = {
    "qwen2_5_vl": (tiny_qwen2_5_model, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (tiny_qwen3_model, Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def qwen_stock_twin(model):
    """The stock model of the same family with the same weights (strict load)."""
    _, config_class, model_class = FAMILIES[model.config.model_type.removesuffix("_rc")]
    config_dict = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "compression")}
    stock = model_class(config_class(**config_dict)).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    stock.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock


def image_run(grid) -> list[int]:
    t, h, w = grid
    return [VISION_START_ID] + [IMAGE_TOKEN_ID] * (t * h * w // MERGE**2) + [VISION_END_ID]


def make_qwen_batch(prompt_lengths, grids_per_row, seed: int = 0, pad_left: bool = True) -> dict:
    """A batch: row r is ``prompt_lengths[r]`` random words with the images of ``grids_per_row[r]`` after the first
    two words; padded on the left (or right) to the longest row."""
    generator = torch.Generator().manual_seed(seed)
    rows, grids = [], []
    for length, row_grids in zip(prompt_lengths, grids_per_row):
        words = torch.randint(4, IMAGE_TOKEN_ID, (length,), generator=generator).tolist()
        ids = words[:2]
        for grid in row_grids:
            ids += image_run(grid)
            grids.append(grid)
        rows.append(ids + words[2:])
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if pad_left else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row)
        attention_mask[index, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN_ID).int()
    if grids:
        patches = sum(t * h * w for t, h, w in grids)
        batch["pixel_values"] = torch.randn(patches, PATCH_WIDTH, generator=generator)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch


def unpad_qwen_row(batch: dict, row: int, first_image: int, num_images: int) -> dict:
    """Row ``row`` alone, unpadded, with its images (``first_image`` .. + ``num_images``)."""
    keep = batch["attention_mask"][row].bool()
    single = {
        "input_ids": batch["input_ids"][row, keep][None],
        "attention_mask": batch["attention_mask"][row, keep][None],
        "mm_token_type_ids": batch["mm_token_type_ids"][row, keep][None],
    }
    if num_images:
        grids = batch["image_grid_thw"]
        sizes = grids.prod(-1)
        start = int(sizes[:first_image].sum())
        stop = start + int(sizes[first_image : first_image + num_images].sum())
        single["pixel_values"] = batch["pixel_values"][start:stop]
        single["image_grid_thw"] = grids[first_image : first_image + num_images]
    return single
