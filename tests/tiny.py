"""Tiny LLaVA models, tokenizers and processors built in code (no downloads), shared by the tests.

The initializer range is 0.3, not the default 0.02: with tiny weights a random model ignores positions and padding,
which would hide misaligned positions or masks.
"""

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers import PreTrainedTokenizerFast

from llava_rc import LlavaRCConfig, LlavaRCForConditionalGeneration

IMAGE_SIZE = 28
PATCH_SIZE = 7
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 2
INIT_RANGE = 0.3

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
WORDS = (
    "user assistant : what is the color shape of this picture in top left right bottom a an circle square "
    "triangle red green blue yellow gray black teal brown purple orange describe how many are there"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> "
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_config_dict(**overrides) -> dict:
    """Keyword arguments of a tiny LLaVA config: CLIP 2 layers x 32 wide, Llama 2 layers x 32 wide."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=16,
        initializer_range=INIT_RANGE,
    )
    text = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS) + 2,
        max_position_embeddings=512,
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=EOS_TOKEN_ID,
    )
    config = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_PATCHES,
        initializer_range=INIT_RANGE,
        pad_token_id=PAD_TOKEN_ID,
    )
    config.update(overrides)
    return config


def tiny_rc_model(compression=None, seed: int = 0, **overrides) -> LlavaRCForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaRCConfig(**tiny_config_dict(compression=compression, **overrides))
    model = LlavaRCForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def stock_twin(model: LlavaRCForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Stock LLaVA with exactly the same weights."""
    stock = LlavaForConditionalGeneration(LlavaConfig(**tiny_config_dict())).eval()
    stock.load_state_dict(model.state_dict(), strict=True)
    stock.generation_config.pad_token_id = PAD_TOKEN_ID
    return stock


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + WORDS + ["[unk]", "?"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[unk]",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def random_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(IMAGE_SIZE + 4, IMAGE_SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_batch(prompt_lengths, images_per_row, seed: int = 0, pad_left: bool = True):
    """Token ids, mask and pixel values for rows of random text around image placeholder runs.

    prompt_lengths: text tokens per row; images_per_row: how many images each row has (0 = text only).
    Each image's run of NUM_PATCHES placeholders is inserted after the first text token.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for text_length, num_images in zip(prompt_lengths, images_per_row):
        text = torch.randint(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(WORDS), (text_length,), generator=generator)
        row = [text[:1]]
        for _ in range(num_images):
            row.append(torch.full((NUM_PATCHES,), IMAGE_TOKEN_ID))
            row.append(text[1:2])
        row.append(text[2:] if num_images else text[1:])
        rows.append(torch.cat(row))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if pad_left else slice(0, len(row))
        input_ids[index, span] = row
        attention_mask[index, span] = 1
    num_images = sum(images_per_row)
    pixel_values = torch.randn((num_images, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def unpad_row(batch: dict, row: int, first_image: int, num_images: int) -> dict:
    """One row of a batch without its padding, with its own images."""
    keep = batch["attention_mask"][row].bool()
    return {
        "input_ids": batch["input_ids"][row][keep].unsqueeze(0),
        "attention_mask": batch["attention_mask"][row][keep].unsqueeze(0),
        "pixel_values": batch["pixel_values"][first_image : first_image + num_images] if num_images else None,
    }




def greedy_loop_without_cache(model, batch: dict, steps: int, **compress_kwargs) -> torch.Tensor:
    """Reference decoder: the compressed prompt embeddings, then one full forward per new token, no KV cache.

    compress_kwargs: extra inputs of ``compress_inputs`` (LLaVA-NeXT's ``image_sizes``).
    """
    compressed = model.compress_inputs(
        batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"], pad_left=True,
        **compress_kwargs,
    )
    embeds = compressed.inputs_embeds
    mask = compressed.packed.attention_mask
    new_tokens = []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(-1)  # (B,)
            new_tokens.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(token).unsqueeze(1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(new_tokens, dim=1)
