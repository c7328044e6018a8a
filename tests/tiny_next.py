"""Tiny LLaVA-NeXT (anyres) models, processor and batches built in code (no downloads), shared by the tests.

CLIP sees 28 px crops of 7 px patches (N = 16 per crop, a 4 x 4 grid); the grid pinpoints allow 1 x 1, 1 x 2, 2 x 1
and 2 x 2 crops, so images of different sizes get different token counts, and unpadding drops rows or columns.
"""

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil
from transformers import LlavaNextProcessor

from llava_rc import LlavaNextRCConfig, LlavaNextRCForConditionalGeneration, anyres_token_counts
from tiny import CHAT_TEMPLATE, IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, PATCH_SIZE, SPECIAL_TOKENS, WORDS
from tiny import tiny_config_dict, tiny_tokenizer

GRID_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                  [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
MAX_CROPS = 5  # base view + 2 x 2
# (height, width) of original images: 2 x 2 crops square; 1 x 2 wide with unpadded rows; 2 x 1 tall; 1 x 1 small.
IMAGE_SIZES = [(56, 56), (20, 56), (60, 30), (28, 28), (40, 60)]


def tiny_next_config_dict(**overrides) -> dict:
    config = tiny_config_dict(image_grid_pinpoints=GRID_PINPOINTS, **overrides)
    config.pop("image_seq_length")
    return config


def tiny_next_model(compression=None, seed: int = 0, **overrides) -> LlavaNextRCForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaNextRCConfig(**tiny_next_config_dict(compression=compression, **overrides))
    model = LlavaNextRCForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def next_stock_twin(model: LlavaNextRCForConditionalGeneration) -> LlavaNextForConditionalGeneration:
    """Stock LLaVA-NeXT with exactly the same weights."""
    stock = LlavaNextForConditionalGeneration(LlavaNextConfig(**tiny_next_config_dict())).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    stock.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock


def token_counts(image_sizes) -> list[int]:
    """Placeholder run length of each image (base + grid + newline tokens)."""
    return anyres_token_counts(LlavaNextConfig(**tiny_next_config_dict()), image_sizes).sum(-1).tolist()


def make_next_batch(prompt_lengths, image_sizes_per_row, seed: int = 0, pad_left: bool = True) -> dict:
    """Rows of random text around anyres image placeholder runs, with (I, MAX_CROPS, 3, 28, 28) random crops.

    image_sizes_per_row: for each row, the (height, width) of its images (an empty list for a text-only row).
    Each image's run is inserted after the first text token, followed by one text token.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, sizes = [], []
    for text_length, row_sizes in zip(prompt_lengths, image_sizes_per_row):
        text = torch.randint(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(WORDS), (text_length,), generator=generator)
        row = [text[:1]]
        for size, count in zip(row_sizes, token_counts(row_sizes) if row_sizes else []):
            row.append(torch.full((count,), IMAGE_TOKEN_ID))
            row.append(text[1:2])
            sizes.append(size)
        row.append(text[2:] if row_sizes else text[1:])
        rows.append(torch.cat(row))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if pad_left else slice(0, len(row))
        input_ids[index, span] = row
        attention_mask[index, span] = 1
    pixel_values = torch.randn((len(sizes), MAX_CROPS, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
    }


def unpad_next_row(batch: dict, row: int, first_image: int, num_images: int) -> dict:
    """One row of a batch without its padding, with its own images."""
    keep = batch["attention_mask"][row].bool()
    images = slice(first_image, first_image + num_images)
    return {
        "input_ids": batch["input_ids"][row][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][row][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][images] if num_images else None,
        "image_sizes": batch["image_sizes"][images] if num_images else None,
    }


def tiny_next_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def random_next_image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
