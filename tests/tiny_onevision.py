"""Tiny LLaVA-OneVision models (SigLIP tower without [CLS] or head, Qwen2), processor and batches built in code.

SigLIP sees 28 px crops of 7 px patches (N = 16 per crop, a 4 x 4 grid, no [CLS]). The grid pinpoints allow 1 x 1,
1 x 2, 2 x 1, 2 x 2, 3 x 4 and 4 x 4 crops; with the stock "anyres_max_9" a 3 x 4 or 4 x 4 grid exceeds 9 crops'
worth and is bilinearly downsampled (12 x 16 -> 10 x 13, 16 x 16 -> 12 x 12 tokens), so a token blends patches.
"""

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from llava_rc import LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration
from tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, INIT_RANGE, PAD_TOKEN_ID, PATCH_SIZE, SPECIAL_TOKENS
from tiny import WORDS

SIDE = IMAGE_SIZE // PATCH_SIZE
NUM_PATCHES = SIDE * SIDE
GRID_PINPOINTS = [[IMAGE_SIZE * rows, IMAGE_SIZE * cols] for rows, cols in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 4),
                                                                           (4, 4))]
MAX_CROPS = 17  # base view + 4 x 4
VIDEO_TOKEN_ID = len(SPECIAL_TOKENS) + len(WORDS) + 2  # one past the tiny tokenizer's words
# (height, width): 2 x 2 square; wide and unpadded; tall; small; 3 x 4 and 4 x 4 downsampled.
IMAGE_SIZES = [(56, 56), (20, 56), (60, 30), (28, 28), (84, 112), (112, 112)]


def tiny_onevision_config_dict(**overrides) -> dict:
    """A tiny OneVision config: SigLIP 2 layers x 32 wide (no head), Qwen2 2 layers x 32 wide."""
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    text = dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VIDEO_TOKEN_ID + 1,
        max_position_embeddings=1024,
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=GRID_PINPOINTS,
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_TOKEN_ID,
    )
    config.update(overrides)
    return config


def tiny_onevision_model(compression=None, seed: int = 0, **overrides) -> LlavaOnevisionRCForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaOnevisionRCConfig(**tiny_onevision_config_dict(compression=compression, **overrides))
    model = LlavaOnevisionRCForConditionalGeneration(config).eval()
    # SigLIP's own init is tiny (0.02-like) whatever initializer_range says: widen the tower so attention is peaked.
    with torch.no_grad():
        for name, parameter in model.model.vision_tower.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.normal_(0.0, INIT_RANGE)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def onevision_stock_twin(model: LlavaOnevisionRCForConditionalGeneration) -> LlavaOnevisionForConditionalGeneration:
    """Stock LLaVA-OneVision with exactly the same weights."""
    stock = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**tiny_onevision_config_dict())).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    stock.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock


def stock_token_counter() -> LlavaOnevisionProcessor:
    """The stock processor's token counting (``_get_number_of_features``) for the tiny geometry.

    A full ``LlavaOnevisionProcessor`` cannot be built here (its video processor needs torchvision), so only the
    fields its counting reads are set.
    """
    counter = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    counter.image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=GRID_PINPOINTS
    )
    counter.num_image_tokens = NUM_PATCHES
    counter.vision_aspect_ratio = "anyres_max_9"
    return counter


def token_counts(image_sizes) -> list[int]:
    """Placeholder run of each image of a single-image row, as the stock processor counts it."""
    counter = stock_token_counter()
    return [counter._get_number_of_features(height, width, IMAGE_SIZE, IMAGE_SIZE) for height, width in image_sizes]


def make_onevision_batch(prompt_lengths, image_sizes_per_row, seed: int = 0, pad_left: bool = True) -> dict:
    """Rows of random text around OneVision image placeholder runs, with (I, MAX_CROPS, 3, 28, 28) random crops.

    A row with one image reads it as base view + anyres grid; a row with several reads each image's base view and
    one newline (the stock ``batch_num_images`` rule); an empty list is a text-only row.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, sizes, batch_num_images = [], [], []
    for text_length, row_sizes in zip(prompt_lengths, image_sizes_per_row):
        text = torch.randint(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(WORDS), (text_length,), generator=generator)
        counts = token_counts(row_sizes) if len(row_sizes) == 1 else [NUM_PATCHES + 1] * len(row_sizes)
        row = [text[:1]]
        for size, count in zip(row_sizes, counts):
            row.append(torch.full((count,), IMAGE_TOKEN_ID))
            row.append(text[1:2])
            sizes.append(size)
        row.append(text[2:] if row_sizes else text[1:])
        rows.append(torch.cat(row))
        batch_num_images.append(len(row_sizes))
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
        "batch_num_images": torch.tensor(batch_num_images, dtype=torch.long),
    }


def unpad_onevision_row(batch: dict, row: int, first_image: int, num_images: int) -> dict:
    """One row of a batch without its padding, with its own images."""
    keep = batch["attention_mask"][row].bool()
    images = slice(first_image, first_image + num_images)
    single = {
        "input_ids": batch["input_ids"][row][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][row][keep].unsqueeze(0),
    }
    if num_images:
        single.update(pixel_values=batch["pixel_values"][images], image_sizes=batch["image_sizes"][images],
                      batch_num_images=torch.tensor([num_images]))
    return single


def random_onevision_image(seed: int, height: int, width: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)
