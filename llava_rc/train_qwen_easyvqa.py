"""Train the tiny Qwen2.5-VL-RC shipped with the package, on the easy-VQA data and mosaics of the LLaVA one (CPU).

    python -m llava_rc.train_qwen_easyvqa --output-dir llava_rc/checkpoints/qwen2_5-vl-rc-easyvqa

The recipe of ``train_easyvqa`` (read its docstring: every trick there was needed), adapted where Qwen2.5-VL differs.

Geometry: the stock Qwen2.5-VL image processor with ``min_pixels = max_pixels = 168 x 168``, so every scene (64 px
single images and 128 px mosaics) becomes 168 x 168 px: 12 x 12 patches of 14 px, which the tower's 2 x 2 merger
turns into 36 language-model tokens (a mosaic cell is 3 x 3 tokens). It is the ViT of the LLaVA model (144 patches)
so stage 1 costs the same; 224 or 336 px (64 or 144 tokens) would double or quadruple both stages, which the CPU
budget (50 minutes on one thread) does not allow. A budget of 10% is 3.6 tokens of 36: fewer than one per mosaic cell.

Stage 1, the Qwen ViT (4 blocks, 64 wide, window attention of 112 px = 4 x 4 merge units, full attention at blocks
1 and 3, as the stock model interleaves them) alone: there is no text tower on Qwen (``guidance="clip"`` is refused),
so the contrastive and caption terms of the LLaVA recipe have nothing to act on. Three terms train the tower
directly, on the last block's per-patch output (what the merger reads), each through a linear head dropped after
training: every patch names the object covering it among the 24 "{color} {shape}" labels or background
(foreground and background patches weighted alike), gives its row and column, and the mean of each object's patches
names the object. The background class is new: without a caption term nothing else tells background patches apart.
The pooled term stands in for the caption term: without it (and with the background dominating the per-patch term)
the tower learned colours but hardly shapes: a linear probe on each object's pooled features named its colour 99.8%
of the time and its shape 48% (chance 33%), so no start of stage 2 could pass the position check, which includes
shape-at-a-position questions (0.11 to 0.34 over five starts). With it: colour 99.9%, shape 97.4% (the probe:
objects of 10,000 training scenes, 80/20 split).

Stage 2, as in the LLaVA recipe: the tower frozen (its per-patch outputs computed once), the stock merger (RMSNorm,
two-layer GELU MLP over each 2 x 2 unit) and a 3-layer 64-wide Qwen2 language model with M-RoPE from scratch, on
the same packed question-answer blocks (``train_easyvqa.packed_batch``), answer weighting
(``answer_weights`` faded by ``answer_weight_exponent``), present-colour questions, visual-token dropout
(``dropout_selection``, on the merged tokens: the unit a Qwen method keeps or drops) with the occasional merged
token, and position check with restarts. Positions are the stock 3-D ones: the prompt's text counts up, an image's
tokens sit at (t, h, w) = (start, start + row, start + column) of their unit, the text after it resumes at
start + 6 (max(h, w) / 2), and every question block restarts there. A dropped token leaves its position empty, and
the merged extra token sits at the image's last unit: exactly what the compressed model feeds the language model
(``modeling_qwen_vl_rc``), so compressed inputs look like training inputs.

The prompt is Qwen's chat format, ``<|im_start|>user <|vision_start|><|image_pad|>...<|vision_end|>{question}
<|im_end|><|im_start|>assistant``, tokenized word by word (a word-level vocabulary of the data with Qwen's special
tokens; Qwen's 151k-token vocabulary would make the checkpoint 40 MB of embeddings).

Positions (``model_config``): Qwen2.5-VL's M-RoPE gives t the fastest rotary frequencies, h the next and w the
slowest. At a head of 16 and rope_theta 1e4 (the first recipe) a token's column turns a query by under 0.02 rad across
the 6-wide grid and its row by under 0.6: the language model can tell rows apart a little by position and columns
not at all, and must read both from the features. The tiny model uses heads of 32 and rope_theta 10, where every
axis turns by 0.1-1 rad a step; the tower's row/column term puts them in the features as well.

CPU budget (about an hour on one thread of a 2-core x86 machine without AVX-512 BF16, shared with other jobs).
bfloat16 autocast, the LLaVA recipe's default, is off: without AMX / AVX-512 BF16 a ViT step took 38 s instead of
1.5 s in float32. Stage 1: 800 steps of 32 images (about 8 minutes on two threads). Stage 2 sees far fewer questions
than the LLaVA recipe's 5000 steps of 32 images with every block: 2000 such steps, a 64-wide language model. A first
run with 16 images of at most 8 blocks per step and a 128-wide model did not learn to read the image at all (loss
at the answer prior); packed training logits equal the stock forward's on the same prompt (checked), so the
plumbing was not the cause.

Everything is seeded; on one machine and thread count the run is repeatable. The report of the shipped run is in
the checkpoint's ``training_report.json`` (timings included).
"""

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.utils import logging
from transformers.vision_utils import get_vision_window_index

# From the package (not its modules): registers the Auto classes, so save_pretrained writes auto_map and the code.
from . import Qwen2_5_VLRCConfig, Qwen2_5_VLRCForConditionalGeneration, easyvqa
from .train_easyvqa import (
    OBJECT_LABELS,
    POSITION_CHECK_THRESHOLD,
    POSITION_KINDS,
    answer_weight_exponent,
    answer_weights,
    dropout_selection,
    object_patches,
    packed_batch,
    position_accuracy,
    qa_blocks,
    warmup_cosine,
    write_package_notes,
)

logger = logging.get_logger(__name__)

IMAGE_SIZE = 168
PATCH_SIZE = 14
MERGE = 2
TEMPORAL_PATCH = 2
GRID = IMAGE_SIZE // PATCH_SIZE  # 12 patches a side
NUM_PATCHES = GRID * GRID  # 144 ViT patches
TOKEN_GRID = GRID // MERGE  # 6 language-model tokens a side
NUM_TOKENS = TOKEN_GRID * TOKEN_GRID  # 36
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<unk>",
]
TEMPLATE_WORDS = ["user", "assistant", "system", "?"]
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
QUESTION_TEMPLATE = "<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"  # the prompt after the image
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
DEFAULT_COMPRESSION = {"method": "rc"}
NUM_CLASSES = len(OBJECT_LABELS) + 1  # the 24 objects and background


# ---- tokenizer and processor -------------------------------------------------------------------------------
def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the dataset vocabulary with Qwen's special tokens (no BOS, as Qwen)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + TEMPLATE_WORDS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:7]})
    return tokenizer


def build_image_processor() -> Qwen2VLImageProcessorPil:
    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
    )


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without a video processor: the stock one needs torchvision (its video
    processor) even for images. It tokenizes and expands ``<|image_pad|>`` exactly as the stock processor; the
    checkpoint saves the stock processor's files (``save_processor``), which ``AutoProcessor`` loads where torchvision
    is installed."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def build_processor(words: list[str]) -> ImageOnlyQwenProcessor:
    return ImageOnlyQwenProcessor(build_image_processor(), build_tokenizer(words), chat_template=CHAT_TEMPLATE)


def load_processor(path) -> ImageOnlyQwenProcessor:
    """The processor of a checkpoint written by this module, built without torchvision."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return ImageOnlyQwenProcessor(image_processor, tokenizer, chat_template=(Path(path) / "chat_template.jinja").read_text())


def save_processor(processor: ImageOnlyQwenProcessor, output_dir: Path) -> None:
    """The stock processor's files: image processor config, tokenizer, chat template, processor_config.json naming
    ``Qwen2_5_VLProcessor``."""
    processor.image_processor.save_pretrained(output_dir)
    processor.tokenizer.save_pretrained(output_dir)
    (output_dir / "chat_template.jinja").write_text(processor.chat_template)
    (output_dir / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")


def scene_pixels(processor, scenes, chunk: int = 256) -> torch.Tensor:
    """(S, NUM_PATCHES, 3 * 14 * 14) float16 patches of the scenes from the stock image processor, in its order
    (merge units of 2 x 2 patches in raster order), one temporal frame (the processor repeats a still image)."""
    parts = []
    for start in range(0, len(scenes), chunk):
        images = [scene.image() for scene in scenes[start : start + chunk]]
        values = processor.image_processor(images, return_tensors="pt")["pixel_values"]  # (n * 144, 3 * 2 * 196)
        frames = values.view(-1, NUM_PATCHES, 3, TEMPORAL_PATCH, PATCH_SIZE * PATCH_SIZE)[:, :, :, 0]
        parts.append(frames.reshape(-1, NUM_PATCHES, 3 * PATCH_SIZE * PATCH_SIZE).half())
    return torch.cat(parts)


def tower_inputs(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3 * 196) one-frame patches -> the tower's (B * N, 3 * 2 * 196) pixel values and (B, 3) grids."""
    batch = frames.shape[0]
    values = frames.float().view(batch, NUM_PATCHES, 3, 1, -1).expand(-1, -1, -1, TEMPORAL_PATCH, -1)
    grids = torch.tensor([[1, GRID, GRID]] * batch)
    return values.reshape(batch * NUM_PATCHES, -1), grids


def processor_order() -> torch.Tensor:
    """(N,) the raster index (row * GRID + column) of each patch in the processor's order."""
    unit = torch.arange(NUM_PATCHES) // (MERGE * MERGE)
    within = torch.arange(NUM_PATCHES) % (MERGE * MERGE)
    rows = (unit // TOKEN_GRID) * MERGE + within // MERGE
    columns = (unit % TOKEN_GRID) * MERGE + within % MERGE
    return rows * GRID + columns


def tower_patches(tower, frames: torch.Tensor) -> torch.Tensor:
    """(B, N, C) the last block's output per patch, in the processor's order (the window permutation undone)."""
    values, grids = tower_inputs(frames)
    hidden = tower(values, grids).last_hidden_state  # (B * N, C) window order
    window_index, _ = get_vision_window_index(grids, MERGE, tower.config.window_size, PATCH_SIZE)
    units = hidden.view(-1, MERGE * MERGE, hidden.shape[-1])[torch.argsort(window_index)]  # (B * 36, 4, C)
    return units.view(frames.shape[0], NUM_PATCHES, -1)


# ---- stage 1: the ViT --------------------------------------------------------------------------------------
def patch_targets(scenes) -> torch.Tensor:
    """(S, N) in the processor's order: the object label (index into ``OBJECT_LABELS``) covering each patch, or
    ``len(OBJECT_LABELS)`` for background."""
    objects = object_patches(scenes)[:, processor_order()]  # (S, N) cell index or -1
    rows = []
    for scene, cells in zip(scenes, objects):
        labels = torch.tensor([OBJECT_LABELS.index(cell) for cell in scene.cells] + [len(OBJECT_LABELS)])
        rows.append(labels[cells])  # index -1: background
    return torch.stack(rows)


def train_tower(tower, frames, targets, steps: int, batch_size: int, seed: int, autocast) -> dict:
    """The object-per-patch and row/column terms on the tower's last block (heads dropped after); returns the last
    step's losses and the object accuracy over the last 10 batches."""
    generator = torch.Generator().manual_seed(seed)
    width = tower.config.hidden_size
    object_head = torch.nn.Linear(width, NUM_CLASSES)
    position_head = torch.nn.Linear(width, 2 * GRID)
    pooled_head = torch.nn.Linear(width, len(OBJECT_LABELS))
    heads = (object_head, position_head, pooled_head)
    parameters = list(tower.parameters()) + [parameter for head in heads for parameter in head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps)
    raster = processor_order()
    rows, columns = raster // GRID, raster % GRID  # (N,) each, processor order
    tower.train()
    started = time.perf_counter()
    hits = []
    for step in range(steps):
        batch = torch.randperm(len(frames), generator=generator)[:batch_size]
        with autocast:
            patches = tower_patches(tower, frames[batch]).float()  # (B, N, C)
        object_logits = object_head(patches)  # (B, N, classes)
        row_logits, column_logits = position_head(patches).split(GRID, dim=-1)  # (B, N, GRID) each
        labels = targets[batch]
        foreground = labels != len(OBJECT_LABELS)
        per_patch = torch.nn.functional.cross_entropy(object_logits.flatten(0, 1), labels.flatten(), reduction="none")
        # Foreground and background weigh alike (background patches outnumber an object's several times).
        object_loss = (per_patch[foreground.flatten()].mean() + per_patch[~foreground.flatten()].mean()) / 2
        # Each object's patches pooled name it: its shape is a property of the region, not of one patch.
        members = torch.nn.functional.one_hot(labels, NUM_CLASSES)[..., : len(OBJECT_LABELS)].float()  # (B, N, 24)
        counts = members.sum(dim=1)  # (B, 24)
        pooled = members.transpose(1, 2) @ patches / counts.clamp(min=1).unsqueeze(-1)  # (B, 24, C)
        present = counts > 0
        pooled_targets = torch.arange(len(OBJECT_LABELS)).expand_as(counts)[present]
        pooled_loss = torch.nn.functional.cross_entropy(pooled_head(pooled[present]), pooled_targets)
        position_loss = (
            torch.nn.functional.cross_entropy(row_logits.flatten(0, 1), rows.repeat(len(batch)))
            + torch.nn.functional.cross_entropy(column_logits.flatten(0, 1), columns.repeat(len(batch)))
        ) / 2
        loss = object_loss + position_loss + pooled_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        hits = (hits + [(object_logits.argmax(-1)[foreground] == labels[foreground]).float().mean().item()])[-10:]
        if step % 50 == 0 or step == steps - 1:
            logger.warning(
                f"vit step {step}/{steps} object {object_loss.item():.3f} + position {position_loss.item():.3f} "
                f"+ pooled {pooled_loss.item():.3f} "
                f"(object patches right {hits[-1]:.3f}; {time.perf_counter() - started:.0f} s)"
            )
    tower.eval()
    return {
        "object_loss": object_loss.item(),
        "position_loss": position_loss.item(),
        "pooled_object_loss": pooled_loss.item(),
        "object_patch_accuracy_last_10_batches": sum(hits) / len(hits),
    }


@torch.no_grad()
def tower_features(tower, frames, chunk: int = 128) -> torch.Tensor:
    """(S, N, C) float16 per-patch outputs of the frozen tower (processor order), computed once."""
    return torch.cat([tower_patches(tower, frames[start : start + chunk]).half() for start in range(0, len(frames), chunk)])


# ---- stage 2: merger + language model ----------------------------------------------------------------------
def rope_positions(position_ids: torch.Tensor, image_tokens: list[torch.Tensor], prefix_length: int) -> torch.Tensor:
    """(3, B, T) M-RoPE positions of packed rows from ``packed_batch``'s (B, T) text positions.

    image_tokens: per row, the unit index (raster, 0..NUM_TOKENS-1) of each image token in order (a merged token:
    the last unit). Prefix text counts up; an image token sits at (start, start + row, start + column) of its unit;
    text after the image resumes at start + TOKEN_GRID, each block restarting there (``packed_batch`` restarts it
    at start + the row's token count).
    """
    positions = position_ids.unsqueeze(0).repeat(3, 1, 1)  # (3, B, T)
    for row, units in enumerate(image_tokens):  # rows differ in their kept counts
        count = len(units)
        end = prefix_length + count
        grid = torch.stack([torch.zeros_like(units), units // TOKEN_GRID, units % TOKEN_GRID])  # (3, K)
        positions[:, row, prefix_length:end] = prefix_length + grid
        text = positions[:, row, end:]
        positions[:, row, end:] = torch.where(text > 0, text - count + TOKEN_GRID, text)  # padding stays 0
    return positions


def train_language_model(
    model, tokenizer, features, scenes, steps, batch_size, seed, autocast, check=None, max_blocks: int | None = None
) -> bool:
    """Train the merger and the language model in place (``train_easyvqa.train_language_model`` for Qwen: the
    merger runs on the frozen per-patch features every step, dropout acts on merged tokens, positions are 3-D).
    ``check`` is (step, callable): after that many steps the callable says whether to go on. ``max_blocks``: at most
    this many question-answer blocks of an image per step (a random subset, in order), for CPU time."""
    generator = torch.Generator().manual_seed(seed)
    merger = model.model.visual.merger
    language_model = model.model.language_model
    trainable = list(merger.parameters()) + list(language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1.5e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    prefix = tokenizer("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)["input_ids"]
    questions = [easyvqa.training_questions(scene) for scene in scenes]
    weights = iter(
        answer_weights(
            [example for examples in questions for example in examples],
            [len(scene.cells) for scene, examples in zip(scenes, questions) for _ in examples],
        )
    )
    blocks = [
        qa_blocks(tokenizer, examples, [next(weights) for _ in examples], QUESTION_TEMPLATE) for examples in questions
    ]
    embed = model.get_input_embeddings()
    image_id = model.config.image_token_id
    merger.train()
    language_model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = torch.randperm(len(scenes), generator=generator)[:batch_size]
        drop = torch.rand(batch_size, generator=generator) < 0.25
        keep_ratio = torch.where(drop, 0.1 + 0.5 * torch.rand(batch_size, generator=generator), torch.ones(batch_size))
        merge = drop & (torch.rand(batch_size, generator=generator) < 0.5)
        selections = [
            dropout_selection(NUM_TOKENS, int(keep_ratio[row] * NUM_TOKENS), bool(merge[row]), generator)
            for row in range(batch_size)
        ]
        exponent = answer_weight_exponent(step / steps)
        weighted = []
        for index in batch.tolist():
            chosen = blocks[index]
            if max_blocks is not None and len(chosen) > max_blocks:
                subset = torch.randperm(len(chosen), generator=generator)[:max_blocks].sort().values.tolist()
                chosen = [chosen[number] for number in subset]
            weighted.append([(ids, start, w**exponent) for ids, start, w in chosen])
        counts = [len(kept) + (dropped is not None) for kept, dropped, _ in selections]
        input_ids, mask, position_ids, labels, label_weights = packed_batch(
            prefix, counts, weighted, tokenizer.pad_token_id, image_id
        )
        units = [
            kept if dropped is None else torch.cat([kept, torch.tensor([NUM_TOKENS - 1])])
            for kept, dropped, _ in selections
        ]
        positions = rope_positions(position_ids, units, len(prefix))
        selected = labels != -100
        with autocast:
            merged = merger(features[batch].flatten(0, 1).float()).view(batch_size, NUM_TOKENS, -1)  # (B, 36, D)
            image_tokens = []
            for row, (kept, dropped, merge_weights) in enumerate(selections):
                image_tokens.append(merged[row, kept])
                if dropped is not None:
                    image_tokens.append((merge_weights @ merged[row, dropped].float()).unsqueeze(0).to(merged.dtype))
            embeds = embed(input_ids)  # (B, T, D)
            embeds = embeds.masked_scatter((input_ids == image_id).unsqueeze(-1), torch.cat(image_tokens).to(embeds.dtype))
            hidden = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
            logits = model.lm_head(hidden[selected])  # (targets, V)
        losses = torch.nn.functional.cross_entropy(logits.float(), labels[selected], reduction="none")
        loss = (losses * label_weights[selected]).sum() / label_weights[selected].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.warning(f"lm step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        if check is not None and step + 1 == check[0]:
            model.eval()
            if not check[1]():
                return False
            merger.train()
            language_model.train()
    model.eval()
    return True


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's split of the rotary frequencies over (t, h, w), [16, 24, 24] of 64 at head_dim 128, scaled to
    ``head_dim`` (h and w 3/16 of it each, t the rest of head_dim / 2)."""
    spatial = 3 * head_dim // 16
    return [head_dim // 2 - 2 * spatial, spatial, spatial]


def model_config(
    tokenizer, vision_width: int = 64, hidden_size: int = 64, heads: int = 2, rope_theta: float = 10.0
) -> Qwen2_5_VLRCConfig:
    """The tiny Qwen2.5-VL-RC. ``heads`` and ``rope_theta`` set what M-RoPE can show of the 6 x 6 grid: Qwen2.5-VL
    gives t the highest rotary frequencies, h the next and w the lowest (``mrope_section``), so at the stock
    rope_theta of 1e6 (or 1e4) and a head of 16 a token's column turns a query by under 0.02 rad across the grid: the
    language model cannot tell columns apart by position. At rope_theta 10 and heads of 32, the slowest width
    frequency is 0.115 rad a column and the fastest 0.24 (rows 0.27-0.56)."""
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden_size // heads
    return Qwen2_5_VLRCConfig(
        vision_config=dict(
            depth=4,
            hidden_size=vision_width,
            intermediate_size=4 * vision_width,
            num_heads=4,
            patch_size=PATCH_SIZE,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            window_size=112,
            fullatt_block_indexes=[1, 3],
            out_hidden_size=hidden_size,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=3,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(head_dim)},
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        compression=DEFAULT_COMPRESSION,
    )


def new_model(config, tower_state: dict, seed: int) -> Qwen2_5_VLRCForConditionalGeneration:
    """A Qwen2.5-VL-RC with the trained ViT blocks (frozen) and a fresh merger and language model from ``seed``."""
    torch.manual_seed(seed)
    model = Qwen2_5_VLRCForConditionalGeneration(config)
    missing, unexpected = model.model.visual.load_state_dict(tower_state, strict=False)
    if unexpected or any(not name.startswith("merger.") for name in missing):
        raise ValueError(f"tower weights do not fit: missing {missing}, unexpected {unexpected}")
    model.requires_grad_(False)
    model.model.visual.merger.requires_grad_(True)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return model


MODEL_CARD = """# qwen2_5-vl-rc-easyvqa

A tiny Qwen2.5-VL-RC (`Qwen2_5_VLRCForConditionalGeneration`) trained from scratch by
`python -m llava_rc.train_qwen_easyvqa` on easy-VQA and 2x2 mosaic scenes built from it: a 4-block 64-wide Qwen2.5-VL
ViT (168 x 168 px, patch 14, window attention with full attention at blocks 1 and 3) whose 2x2 merger sends 36 tokens
per image to a 3-layer 64-wide Qwen2 language model with M-RoPE (heads of 32, rope_theta 10, so that rotary
positions tell the 6 x 6 grid's rows and columns apart), and a word-level tokenizer with Qwen's special tokens.
Compression defaults to RC. See `training_report.json` for the settings and full-token accuracy.

Load: `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`; the processor files are the stock
`Qwen2_5_VLProcessor`'s (`AutoProcessor` needs torchvision for its video processor;
`llava_rc.train_qwen_easyvqa.load_processor(path)` builds it without). Prompt: the chat template with one image and
the question.

## Data
easy-VQA by Victor Zhou (https://github.com/vzhou842/easy-VQA), MIT licence (`LICENSE-easy-vqa`), used through the
`easy-vqa` package with its own train/test split; mosaics of test images are used for testing only.
"""


# The arguments stage 1 depends on: a --stage1-cache made with others is refused (its features would belong to other
# scenes or another tower). The thread count is recorded (it changes the rounding), not compared: the shipped model
# ran stage 1 on two threads and stage 2 on one.
STAGE1_SETTINGS = ("seed", "train_mosaics", "vit_steps", "vit_batch_size", "autocast")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-mosaics", type=int, default=6000)
    parser.add_argument("--vit-steps", type=int, default=800)
    parser.add_argument("--vit-batch-size", type=int, default=32)
    parser.add_argument("--lm-steps", type=int, default=2000)
    parser.add_argument("--lm-batch-size", type=int, default=32)
    parser.add_argument(
        "--lm-max-blocks", type=int, default=0, help="question-answer blocks per image and step (0: all, as LLaVA's)"
    )
    parser.add_argument("--lm-hidden-size", type=int, default=64, help="width of the 3-layer Qwen2 language model")
    parser.add_argument("--lm-heads", type=int, default=2, help="attention heads of the language model")
    parser.add_argument("--rope-theta", type=float, default=10.0, help="M-RoPE base (see model_config)")
    parser.add_argument("--lm-seeds", type=int, nargs="*", default=None, help="stage-2 seeds to try (default: seed, seed + 1, ...)")
    parser.add_argument(
        "--stage1-cache", type=Path, default=None,
        help="a file for the trained ViT and its features: written after stage 1, read instead of running it (refused when made with other stage-1 settings)",
    )
    parser.add_argument("--stage1-only", action="store_true", help="stop after writing --stage1-cache")
    parser.add_argument("--lm-attempts", type=int, default=2)
    parser.add_argument("--position-check-step", type=int, default=700)
    parser.add_argument("--eval-questions", type=int, default=1000, help="questions per test set in the final report")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--autocast", choices=["bfloat16", "none"], default="none",
        help="bfloat16 only pays on CPUs with AMX / AVX-512 BF16 (20x slower than float32 without)",
    )
    parser.add_argument("--refresh-code", action="store_true", help="only copy the package's model code into --output-dir")
    args = parser.parse_args(argv)
    if args.refresh_code:
        refresh_code(args.output_dir)
        return
    if args.stage1_only and args.stage1_cache is None:
        parser.error("--stage1-only needs --stage1-cache (the file stage 1 is written to)")
    stage1_settings = {name: getattr(args, name) for name in STAGE1_SETTINGS}
    cached = None
    if args.stage1_cache is not None and args.stage1_cache.exists():
        cached = torch.load(args.stage1_cache)
        if cached.get("settings") != stage1_settings:
            raise ValueError(
                f"--stage1-cache {args.stage1_cache} holds stage 1 of {cached.get('settings')}, this run asks for "
                f"{stage1_settings}; delete the file or pass the settings it was made with"
            )
        if args.stage1_only:
            logger.warning(f"stage 1 is already in {args.stage1_cache}")
            return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16")
    timings = {}
    started = time.perf_counter()

    words = easyvqa.vocabulary()
    processor = build_processor(words)
    singles = easyvqa.single_scenes("train")
    mosaics = easyvqa.mosaic_scenes("train", args.train_mosaics, args.seed)
    scenes = singles + mosaics
    config = model_config(processor.tokenizer, hidden_size=args.lm_hidden_size, heads=args.lm_heads, rope_theta=args.rope_theta)
    if cached is not None:
        tower_state, features, vit_report = cached["tower_state"], cached["features"], cached["vit_report"]
        timings.update(cached["timings"])
        logger.warning(f"stage 1 read from {args.stage1_cache}")
    else:
        frames = scene_pixels(processor, scenes)
        targets = patch_targets(scenes)
        timings["pixels_s"] = time.perf_counter() - started
        torch.manual_seed(args.seed)
        tower = Qwen2_5_VLRCForConditionalGeneration(config).model.visual
        stage = time.perf_counter()
        vit_report = train_tower(tower, frames, targets, args.vit_steps, args.vit_batch_size, args.seed, autocast)
        timings["vit_s"] = time.perf_counter() - stage
        stage = time.perf_counter()
        features = tower_features(tower, frames)
        timings["features_s"] = time.perf_counter() - stage
        tower_state = {name: value for name, value in tower.state_dict().items() if not name.startswith("merger.")}
        del frames
        if args.stage1_cache is not None:
            stage1 = {"tower_state": tower_state, "features": features, "vit_report": vit_report,
                      "timings": dict(timings), "settings": stage1_settings, "threads": torch.get_num_threads()}
            torch.save(stage1, args.stage1_cache)
        if args.stage1_only:
            return

    stage = time.perf_counter()
    probe_scenes = mosaics[:100]
    probe_examples = [e for scene in probe_scenes for e in scene.examples if e.kind in POSITION_KINDS]
    probe = easyvqa.prepare_batches(processor, probe_scenes, probe_examples, prompt=PROMPT)
    attempts = []
    seeds = args.lm_seeds or [args.seed + attempt for attempt in range(args.lm_attempts)]
    for attempt, seed in enumerate(seeds):
        model = new_model(config, tower_state, seed)

        def check(model=model, seed=seed, last=attempt == len(seeds) - 1) -> bool:
            accuracy = position_accuracy(model, processor, probe)
            attempts.append({"seed": seed, "position_accuracy_at_check": accuracy})
            logger.warning(f"position check at step {args.position_check_step}, seed {seed}: {accuracy:.3f}")
            return last or accuracy >= POSITION_CHECK_THRESHOLD

        if train_language_model(
            model, processor.tokenizer, features, scenes, args.lm_steps, args.lm_batch_size, seed, autocast,
            check=(args.position_check_step, check),
            max_blocks=args.lm_max_blocks or None,
        ):
            break
    timings["lm_s"] = time.perf_counter() - stage
    model.requires_grad_(True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = None

    output_dir = args.output_dir
    if output_dir.exists():
        shutil.rmtree(output_dir)
    model.save_pretrained(output_dir)
    save_processor(processor, output_dir)
    write_package_notes(output_dir)
    (output_dir / "README.md").write_text(MODEL_CARD)
    timings["total_s"] = time.perf_counter() - started
    report = {
        "stage1_settings": stage1_settings,
        "stage1_threads": cached["threads"] if cached is not None else torch.get_num_threads(),
        "vit": vit_report,
        "stage2_attempts": attempts,
        "timings": timings,
        "args": {k: str(v) for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
    }
    report["accuracy_full_tokens"] = quick_report(model, processor, args.eval_questions, seed=args.seed)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.warning(json.dumps(report, indent=2))


def quick_report(model, processor, questions: int, seed: int = 0, compression: dict | None = None) -> dict:
    """``easyvqa.quick_report`` with the Qwen prompt (without the per-question strings)."""
    compression = compression if compression is not None else {"method": "none"}
    (singles, single_examples), (mosaics, mosaic_examples) = easyvqa.evaluation_sets(questions, max(1, questions // 4), seed)
    report = {}
    for name, scenes, examples in (("easy_vqa_test", singles, single_examples), ("mosaic_test", mosaics, mosaic_examples)):
        result = easyvqa.evaluate(model, processor, easyvqa.prepare_batches(processor, scenes, examples, prompt=PROMPT), compression)
        report[name] = {key: value for key, value in result.items() if key != "correct"}
    return report


REMOTE_CODE_ENTRIES = ("configuration_qwen_vl_rc.py", "modeling_qwen_vl_rc.py")


def refresh_code(checkpoint: Path) -> None:
    """Copy the package's model code into a checkpoint (the files its entry files import, transitively)."""
    from .train_easyvqa import remote_code_files

    package = Path(__file__).resolve().parent
    if not sorted(checkpoint.glob("*.py")):
        raise ValueError(f"{checkpoint} holds no code files; expected a checkpoint written by save_pretrained")
    code_files = remote_code_files(package, REMOTE_CODE_ENTRIES)
    for name in code_files:
        shutil.copyfile(package / name, checkpoint / name)
    logger.warning(f"refreshed {len(code_files)} code files in {checkpoint}")


if __name__ == "__main__":
    main()
