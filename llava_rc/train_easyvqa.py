"""Train the tiny LLaVA-RC shipped with the package, on easy-VQA and mosaic scenes (CPU, 50-65 minutes).

    python -m llava_rc.train_easyvqa --output-dir llava_rc/checkpoints/llava-rc-easyvqa

Stage 1, a tiny CLIP: a ViT with a [CLS] token (168 px, patch 14 -> 144 patch tokens) and a text tower with
projections, trained contrastively on images and captions derived from the labels ("red triangle", "what color is
the triangle?"). A caption's positives are every image of the batch that has a matching object, so repeated
labels are not pushed apart; half of each batch are single images (a mosaic matches most captions). Two dense terms
act on the final patch embeddings (shape pixels read from the drawing say which object covers a patch):
- each caption picks out, among its image's patches, those covered by the object(s) it describes (position
  captions such as "what shape is in the top left?" included): CLIP's own patch-text similarity is what RC's "clip"
  guidance reads, and a tiny CLIP trained for minutes would not get it otherwise;
- each object patch picks its object's "{color} {shape}" caption among all 24. Without it a patch knows that it
  belongs to an object but hardly which shape: the first shipped model (caption term only, LLaVA's penultimate
  layer) answered easy-VQA shape questions 79% right although its [CLS] embedding was 99% right.
An auxiliary term has every patch's last-layer state give its row and column (a linear head, dropped after
training). The position captions of the caption term were not enough to keep the position embeddings alive to the
last layer: without it a linear probe found a mosaic patch's quadrant 26% of the time (chance 25%), so the language
model had to infer positions from token order, and lost most of that as it learned yes/no (colour at a position
72-75% after 500-1000 steps, 57% after 4000).

Stage 2, the LLaVA recipe: vision tower frozen (its features are computed once), a two-layer GELU projector and a
small Llama language model from scratch, trained on the questions and answers of single images and mosaics with the
LLaVA-1.5 prompt. All questions of one image share one sequence (the image once, then every question-answer block,
each block masked to see only the prompt, the image and itself), which is what makes this fit in minutes. Mosaics
are trained on every question they can answer (shape and colour at each position, every unique shape's colour and
unique colour's shape, and up to four yes/no questions in easy-VQA's forms); evaluation asks one question per type.
Visual-token dropout, the same for every method: a quarter of the images keep a random 10-60% of their visual tokens
(in order), so the language model has seen missing tokens as large models trained on varied images have, and half
of those also get one merged token at the end (``dropout_tokens``), the kind of token merging methods add. easy-VQA's
yes/no answers are balanced within each family (colour or shape, plain or negated; see ``answer_weights``): "is
there a red shape?" is "no" nine times in ten, and unweighted the language model learned to answer it from the
question alone. Balanced, it still learned yes/no late (after 1000 of 4000 steps it was at chance); the mosaics'
yes/no questions, balanced by construction, give it more and more varied examples of the same comparison (85% on
easy-VQA's yes/no after 1500 of 3000 steps). The balancing holds for the first half of stage 2 and then fades out
(``answer_weight_exponent``): it is what lets positions be learned first, but kept to the end it holds yes/no back.
Reweighting cannot make up for how few present-colour questions easy-VQA has (about 300 per colour): faded to
natural frequencies, the previous model answered "no" to 47 of 70 test questions about a colour that was there. So
every single training image is also asked about its own colour, once plainly and once negated
(``easyvqa.present_color_yes_no``, from the first step of stage 2); with them easy-VQA test went from 92.1% to 100%
(README, "Reading it"). They must be there from the start: added at the halfway point (where the balancing starts
to fade; the first half is then the previous run step for step, position check 96% included), easy-VQA fell to
85.6%, as yes/no swung the other way (absent colours 346 of 471 right, present 57 of 70).

The language model reads the tower's last layer (``vision_feature_layer=-1``), not LLaVA's penultimate one: CLIP's
last layer is shaped by its [CLS] objective alone, ours is the one the dense terms train. With the previous shipped
tower and 400 language-model steps, mosaic accuracy was 64% from the last layer and 59% from the penultimate one;
after 600 weighted steps 92% and 64%.

Geometry: 168 px / patch 14 = 144 tokens, the smallest LLaVA-like count the issue allows; a 224 px / 256-token tower
was still undertrained after the same CPU time (see the issue), and every doubling of tokens slows both stages.

Whether stage 2 learns to read a position at all is decided early and by small differences: two runs that differed
only in the rounding of one sum went opposite ways (colour at a position 98% or 45%), and neither a position-only
warm-up nor a stronger position term in stage 1 (top/bottom and left/right halves) made it reliable (README,
"Re-training"). So after ``POSITION_CHECK_STEP`` steps the position questions of 100 training mosaics are asked, and
a run under ``POSITION_CHECK_THRESHOLD`` starts stage 2 again from the next seed (at most ``--lm-attempts`` starts;
the last always runs to the end). ``training_report.json`` lists every start and its check.

Everything is seeded; on one machine and thread count the run is repeatable.
"""

import argparse
import importlib.metadata
import json
import math
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging

# From the package (not its modules): the first use registers the Auto classes, so save_pretrained writes auto_map
# and copies the model code.
from . import LlavaRCConfig, LlavaRCForConditionalGeneration, LlavaRCProcessor, easyvqa

logger = logging.get_logger(__name__)

IMAGE_SIZE = 168
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE
NUM_PATCHES = GRID * GRID
SPECIAL_TOKENS = ["<pad>", "<s>", "<image>", "</s>", "<unk>"]  # CLIP pools at "</s>"; its id must not be 2
TEMPLATE_TOKENS = ["USER", "ASSISTANT", ":", "?"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
DEFAULT_COMPRESSION = {"method": "rc", "guidance": "clip"}


# ---- tokenizers and processor ------------------------------------------------------------------------------
def build_tokenizer(words: list[str], guidance: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the dataset vocabulary.

    The language model's adds "<s>" in front; the guidance (CLIP text) tokenizer appends "</s>", where CLIP pools.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + TEMPLATE_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if guidance:
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 3)])
    else:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right" if guidance else "left",
        model_max_length=512,
    )


def build_processor(words: list[str]) -> LlavaRCProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaRCProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words),
        guidance_tokenizer=build_tokenizer(words, guidance=True),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        guidance_max_length=32,
    )


def pixel_values(processor: LlavaRCProcessor, scenes, chunk: int = 256) -> torch.Tensor:
    """(S, 3, H, W) float16 pixels of the scenes, through the shipped image processor."""
    parts = []
    for start in range(0, len(scenes), chunk):
        images = [scene.image() for scene in scenes[start : start + chunk]]
        parts.append(processor.image_processor(images, return_tensors="pt")["pixel_values"].half())
    return torch.cat(parts)


# ---- stage 1: CLIP -----------------------------------------------------------------------------------------
CAPTIONS_BOTH = ("{color} {shape}", "the {color} {shape}", "is there a {color} {shape}?")
CAPTIONS_SHAPE = ("what color is the {shape}?", "the {shape}", "is there a {shape}?")
CAPTIONS_COLOR = ("what shape is {color}?", "what is the {color} shape?", "{color} shape")
CAPTIONS_POSITION = ("what shape is in the {position}?", "what color is the shape in the {position}?")
OBJECT_LABELS = [(color, shape) for color in easyvqa.COLORS for shape in easyvqa.SHAPES]  # the 24 possible objects
OBJECT_CAPTIONS = [f"{color} {shape}" for color, shape in OBJECT_LABELS]


def sample_caption(cells, rng: random.Random):
    """A caption about one cell, and what it asks for: (text, color or None, shape or None, cell index or None).

    Half the captions name colour and shape (the strongest signal), the rest one attribute; on mosaics a quarter
    name a position instead.
    """
    index = rng.randrange(len(cells))
    color, shape = cells[index]
    draw = rng.random()
    if len(cells) > 1 and draw < 0.25:
        return rng.choice(CAPTIONS_POSITION).format(position=easyvqa.POSITIONS[index]), None, None, index
    if draw < 0.625:
        return rng.choice(CAPTIONS_BOTH).format(color=color, shape=shape), color, shape, None
    if draw < 0.8125:
        return rng.choice(CAPTIONS_SHAPE).format(shape=shape), None, shape, None
    return rng.choice(CAPTIONS_COLOR).format(color=color), color, None, None


def cell_matches(cells, color, shape, position) -> list[bool]:
    if position is not None:
        return [index == position for index in range(len(cells))]
    return [(color is None or c == color) and (shape is None or s == shape) for c, s in cells]


def object_patches(scenes, coverage: float = 0.1) -> torch.Tensor:
    """(S, N) the cell whose shape covers at least ``coverage`` of each patch (at the model's resolution), else -1."""
    rows = []
    for scene in scenes:
        cells = torch.from_numpy(scene.object_cells())  # (h, w) at the scene's own resolution
        resized = torch.nn.functional.interpolate(cells[None, None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="nearest")
        patches = resized.view(GRID, PATCH_SIZE, GRID, PATCH_SIZE).permute(0, 2, 1, 3).reshape(NUM_PATCHES, -1)
        best = torch.full((NUM_PATCHES,), -1)
        for cell in range(len(scene.cells)):
            covered = (patches == cell).float().mean(dim=-1) >= coverage  # (N,)
            best = torch.where(covered & (best < 0), torch.full_like(best, cell), best)
        rows.append(best)
    return torch.stack(rows)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution proportional to ``targets`` (rows with no target skipped; zero
    when no row has one)."""
    weights = targets.float()
    totals = weights.sum(dim=-1, keepdim=True)
    valid = (totals.squeeze(-1) > 0).float()
    loss = -(weights / totals.clamp(min=1) * logits.log_softmax(dim=-1)).sum(dim=-1)
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def train_clip(
    clip: CLIPModel, tokenizer, pixels, scenes, steps: int, batch_size: int, seed: int, autocast, single_share: float
) -> None:
    """Contrastive image-caption training plus the dense term: a caption's patch logits over its own image should
    put their mass on the patches of the object(s) it describes (shape pixels, read from the drawing).

    ``single_share`` of each batch are single images: a mosaic holds four objects, so most captions match most
    mosaics and single images carry most of the contrastive signal.
    """
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    # Auxiliary, dropped after training: the row and the column of each patch, read linearly from the tower's last
    # layer (the one the language model reads).
    position_head = torch.nn.Linear(clip.config.vision_config.hidden_size, 2 * GRID)
    parameters = list(clip.parameters()) + list(position_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps)
    objects = object_patches(scenes)  # (S, N)
    label_tokens = tokenizer(OBJECT_CAPTIONS, padding=True, return_tensors="pt")
    # (S, N) the label ("{color} {shape}" caption index) of the object covering each patch, -100 for background
    cell_labels = [[OBJECT_LABELS.index(cell) for cell in scene.cells] + [-100] for scene in scenes]
    patch_labels = torch.stack([torch.tensor(row)[patches] for row, patches in zip(cell_labels, objects)])
    rows, columns = torch.arange(NUM_PATCHES) // GRID, torch.arange(NUM_PATCHES) % GRID
    is_single = torch.tensor([len(scene.cells) == 1 for scene in scenes])
    single_indices, mosaic_indices = is_single.nonzero().flatten(), (~is_single).nonzero().flatten()
    clip.train()
    started = time.perf_counter()
    for step in range(steps):
        num_singles = round(single_share * batch_size)
        singles = torch.randperm(len(single_indices), generator=generator)[:num_singles]
        mosaics = torch.randperm(len(mosaic_indices), generator=generator)[: batch_size - num_singles]
        batch = single_indices[singles].tolist() + mosaic_indices[mosaics].tolist()
        captions, matches, dense_targets = [], [], []
        for index in batch:
            cells = scenes[index].cells
            text, color, shape, position = sample_caption(cells, rng)
            captions.append(text)
            # Contrastive positives: the images of the batch with a matching object (position captions match none
            # but their own image, since every mosaic has every position).
            matches.append(
                [
                    other == index if position is not None else any(cell_matches(scenes[other].cells, color, shape, None))
                    for other in batch
                ]
            )
            cell_hit = torch.tensor(cell_matches(cells, color, shape, position) + [False])  # index -1: background
            dense_targets.append(cell_hit[objects[index]])
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        with autocast:
            outputs = clip(
                input_ids=tokens["input_ids"],
                attention_mask=tokens["attention_mask"],
                pixel_values=pixels[batch].float(),
                output_hidden_states=True,
            )
            patches = clip.vision_model.post_layernorm(outputs.vision_model_output.last_hidden_state[:, 1:])
            patch_embeds = clip.visual_projection(patches)  # (B, N, P)
        scale = clip.logit_scale.exp()
        text_embeds = outputs.text_embeds.float()  # (B, P) normalised
        image_embeds = outputs.image_embeds.float()  # (B, P) normalised
        positives = torch.tensor(matches)  # (B captions, B images)
        logits = scale * text_embeds @ image_embeds.T  # (B, B)
        contrastive = (soft_cross_entropy(logits, positives) + soft_cross_entropy(logits.T, positives.T)) / 2
        patch_embeds = torch.nn.functional.normalize(patch_embeds.float(), dim=-1)  # (B, N, P)
        patch_logits = scale * torch.einsum("bnp,bp->bn", patch_embeds, text_embeds)  # (B, N)
        dense = soft_cross_entropy(patch_logits, torch.stack(dense_targets))
        with autocast:
            label_embeds = normalized_features(clip.get_text_features(**label_tokens)).float()  # (L, P)
        label_logits = scale * patch_embeds @ label_embeds.T  # (B, N, L)
        patch_label = torch.nn.functional.cross_entropy(label_logits.flatten(0, 1), patch_labels[batch].flatten())
        last_layer = outputs.vision_model_output.last_hidden_state[:, 1:].float()  # (B, N, C), what the LM reads
        row_logits, column_logits = position_head(last_layer).split(GRID, dim=-1)  # (B, N, GRID) each
        patch_position = (
            torch.nn.functional.cross_entropy(row_logits.flatten(0, 1), rows.repeat(len(batch)))
            + torch.nn.functional.cross_entropy(column_logits.flatten(0, 1), columns.repeat(len(batch)))
        ) / 2
        loss = contrastive + dense + patch_label + patch_position
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            logger.warning(
                f"clip step {step}/{steps} loss {contrastive.item():.3f} + dense {dense.item():.3f} "
                f"+ patch label {patch_label.item():.3f} + position {patch_position.item():.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    clip.eval()


def normalized_features(output) -> torch.Tensor:
    """CLIP's projected features, unit length (transformers 5.23 wraps them in an output's ``pooler_output``)."""
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    return torch.nn.functional.normalize(features, dim=-1)


@torch.no_grad()
def clip_zero_shot(clip: CLIPModel, tokenizer, pixels, scenes) -> dict:
    """Single-image accuracy of picking the right "{color} {shape}" caption among all 24 (and each attribute)."""
    tokens = tokenizer(OBJECT_CAPTIONS, padding=True, return_tensors="pt")
    text = normalized_features(clip.get_text_features(**tokens))  # (24, P)
    hits = {"both": 0, "color": 0, "shape": 0}
    for start in range(0, len(scenes), 256):
        image = normalized_features(clip.get_image_features(pixel_values=pixels[start : start + 256].float()))
        for guess, scene in zip((image @ text.T).argmax(dim=-1).tolist(), scenes[start : start + 256]):
            color, shape = OBJECT_LABELS[guess]
            hits["both"] += (color, shape) == scene.cells[0]
            hits["color"] += color == scene.cells[0][0]
            hits["shape"] += shape == scene.cells[0][1]
    return {name: count / len(scenes) for name, count in hits.items()}


# ---- stage 2: projector + language model -------------------------------------------------------------------
def warmup_cosine(optimizer, steps: int, warmup: int | None = None):
    warmup = warmup if warmup is not None else max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def vision_features(model: LlavaRCForConditionalGeneration, pixels: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """(S, N, C) float16 patch features at the model's feature layer (the frozen tower, run once)."""
    tower = model.model.vision_tower
    parts = []
    for start in range(0, len(pixels), chunk):
        hidden = tower(pixels[start : start + chunk].float(), output_hidden_states=True).hidden_states
        parts.append(hidden[model.config.vision_feature_layer][:, 1:].half())
    return torch.cat(parts)


MERGE_SHARE = 0.5  # of the images with dropped tokens, the share that also get one merged token (see below)


def dropout_tokens(features: torch.Tensor, count: int, merge: bool, generator: torch.Generator) -> torch.Tensor:
    """One image's visual tokens in a stage-2 batch: ``count`` (at least 1) random patches of ``features`` (N, C),
    in raster order; with ``merge``, one more token at the end that sums the dropped patches with random weights
    whose total is uniform in [0, 1].

    The merged token is how merging methods' outputs look to the language model (RC's extra token is the sum of the
    remaining patches weighted by their [CLS] attention, at the end): a model trained on dropout alone lost 3 points
    on easy-VQA to that one token (RC at 50% of the tokens: 88.2% with it, 91.2% without, full tokens 91.0%).
    """
    kept, dropped, weights = dropout_selection(len(features), count, merge, generator)
    tokens = features[kept].float()  # (count, C)
    if dropped is None:
        return tokens
    return torch.cat([tokens, (weights @ features[dropped].float()).unsqueeze(0)])


def dropout_selection(
    num_tokens: int, count: int, merge: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What ``dropout_tokens`` keeps of ``num_tokens``: (kept indices (K,) ascending, dropped indices (M,), their
    merge weights (M,)); the last two None without ``merge`` or when every token is kept."""
    order = torch.randperm(num_tokens, generator=generator)
    count = min(max(count, 1), num_tokens)
    kept = order[:count].sort().values  # (K,) raster order
    if not merge or count == num_tokens:
        return kept, None, None
    dropped = order[count:]  # (M,)
    weights = torch.rand(len(dropped), generator=generator)
    weights *= torch.rand(1, generator=generator) / weights.sum()
    return kept, dropped, weights


def answer_weight_exponent(progress: float) -> float:
    """How much of the yes/no balancing applies at ``progress`` (0 to 1) through stage 2: a weight ``w`` from
    ``answer_weights`` is used as ``w ** answer_weight_exponent(progress)``.

    All of it for the first half, then fading linearly to none (natural answer frequencies) at the end. Balanced
    early, the language model cannot answer yes/no from the question alone and learns to read positions first;
    unweighted or half-balanced (square-root weights) from the start it learned yes/no first and the position
    questions collapsed (colour at a position 49-55% after 1000 steps, against 98% balanced). Balanced to the end,
    yes/no stalls near 86%.
    """
    return min(1.0, 2.0 * (1.0 - progress))


def answer_weights(examples, groups=None) -> list[float]:
    """A loss weight per example that balances the answers of yes/no questions.

    Only one colour in eight is present, so "is there a red shape?" is "no" nine times in ten in easy-VQA's training
    split (and "is there not a red shape?" "yes"; two times in three with ``easyvqa.present_color_yes_no``'s
    questions): left alone, a small language model learns to answer from the question without reading the image.
    Within each yes/no family (about a colour or a shape, asked plainly or negated, and in the same group: ``groups``
    gives one label per example, e.g. single image or mosaic) both answers get the same total weight; every other
    question weighs 1.
    """
    groups = groups if groups is not None else [None] * len(examples)

    def family(example, group) -> tuple | None:
        if example.kind != "yes/no":
            return None
        words = example.question.rstrip("?").split()
        return group, any(word in easyvqa.COLORS for word in words), "not" in words or "no" in words, example.answer

    families = [family(example, group) for example, group in zip(examples, groups, strict=True)]
    counts = Counter(families)
    return [
        1.0 if key is None else (counts[(*key[:3], "yes")] + counts[(*key[:3], "no")]) / (2 * counts[key])
        for key in families
    ]


def qa_blocks(
    tokenizer, examples, weights, question_template: str = "\n{question} ASSISTANT:"
) -> list[tuple[list[int], int, float]]:
    """Each example's question+answer block ids (after the image), where its answer starts, and its loss weight.

    ``question_template``: the prompt's text from the end of the image to the answer."""
    blocks = []
    for example, weight in zip(examples, weights):
        question = tokenizer(question_template.format(question=example.question), add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {example.answer}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        blocks.append((question + answer, len(question), weight))
    return blocks


def packed_batch(prefix: list[int], image_lengths: list[int], blocks_per_image, pad_id: int, image_id: int):
    """Ids, 4D block mask, positions, labels and label weights for images whose question-answer blocks share one
    sequence.

    Row layout: prefix, the image's kept tokens, then every block. A block sees the prefix, the image and its own
    earlier tokens; positions restart after the image for every block, as in a single-question prompt.
    """
    rows = []
    for image_length, blocks in zip(image_lengths, blocks_per_image):
        ids = prefix + [image_id] * image_length
        positions = list(range(len(ids)))
        segment = [0] * len(ids)
        labels = [-100] * len(ids)
        weights = [0.0] * len(ids)
        for number, (block, answer_start, weight) in enumerate(blocks, start=1):
            ids += block
            positions += range(len(prefix) + image_length, len(prefix) + image_length + len(block))
            segment += [number] * len(block)
            # labels[t] is the token at t + 1 where that token is a target (the answer and "</s>"), so the
            # hidden state at t is scored against labels[t] directly.
            labels += [-100] * (answer_start - 1) + block[answer_start:] + [-100]
            weights += [0.0] * (answer_start - 1) + [weight] * (len(block) - answer_start) + [0.0]
        rows.append((ids, positions, segment, labels, weights))
    width = max(len(ids) for ids, *_ in rows)
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_id)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    segments = torch.full((batch_size, width), -1)
    labels = torch.full((batch_size, width), -100)
    label_weights = torch.zeros((batch_size, width))
    for row, (ids, positions, segment, row_labels, row_weights) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        position_ids[row, : len(ids)] = torch.tensor(positions)
        segments[row, : len(ids)] = torch.tensor(segment)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        label_weights[row, : len(ids)] = torch.tensor(row_weights)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    visible = (key == 0) | (key == query)
    mask = (causal & visible & (key >= 0) & (query >= 0)).unsqueeze(1)  # (B, 1, T, T)
    mask |= torch.eye(width, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    return input_ids, mask, position_ids, labels, label_weights


def train_language_model(
    model: LlavaRCForConditionalGeneration,
    tokenizer,
    features: torch.Tensor,
    scenes,
    steps: int,
    batch_size: int,
    seed: int,
    autocast,
    check: tuple[int, Callable[[], bool]] | None = None,
) -> bool:
    """Train the projector and the language model in place; ``check`` is (step, callable): after that many steps
    the callable (model in eval mode) says whether to go on. Returns False when the check stopped the run."""
    generator = torch.Generator().manual_seed(seed)
    projector = model.model.multi_modal_projector
    language_model = model.model.language_model
    trainable = list(projector.parameters()) + list(language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1.5e-3, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps)
    prefix = tokenizer("USER:", add_special_tokens=True)["input_ids"]
    questions = [easyvqa.training_questions(scene) for scene in scenes]
    # Single images' and mosaics' yes/no answers are balanced separately (the mosaics' are balanced by construction).
    weights = iter(
        answer_weights(
            [example for examples in questions for example in examples],
            [len(scene.cells) for scene, examples in zip(scenes, questions) for _ in examples],
        )
    )
    blocks = [qa_blocks(tokenizer, examples, [next(weights) for _ in examples]) for examples in questions]
    embed = model.get_input_embeddings()
    image_id = model.config.image_token_id
    projector.train()
    language_model.train()
    started = time.perf_counter()
    for step in range(steps):
        batch = torch.randperm(len(scenes), generator=generator)[:batch_size]
        # Visual-token dropout (method-agnostic): a quarter of the images keep a random 10-60% of their tokens, in
        # order, and half of those get a merged token too. (Dropped tokens may hold the answer, so more dropout
        # teaches guessing.)
        drop = torch.rand(batch_size, generator=generator) < 0.25
        keep_ratio = torch.where(drop, 0.1 + 0.5 * torch.rand(batch_size, generator=generator), torch.ones(batch_size))
        merge = drop & (torch.rand(batch_size, generator=generator) < MERGE_SHARE)
        image_tokens = [
            dropout_tokens(features[index], int(keep_ratio[row] * NUM_PATCHES), bool(merge[row]), generator)
            for row, index in enumerate(batch.tolist())
        ]
        counts = [len(tokens) for tokens in image_tokens]
        exponent = answer_weight_exponent(step / steps)
        weighted = [[(ids, start, w**exponent) for ids, start, w in blocks[index]] for index in batch.tolist()]
        input_ids, mask, position_ids, labels, label_weights = packed_batch(
            prefix, counts, weighted, tokenizer.pad_token_id, image_id
        )
        selected = labels != -100  # labels are already next-token targets (see packed_batch)
        with autocast:
            embeds = embed(input_ids)  # (B, T, D)
            projected = projector(torch.cat(image_tokens))  # (sum of counts, D)
            embeds = embeds.masked_scatter((input_ids == image_id).unsqueeze(-1), projected.to(embeds.dtype))
            hidden = language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids
            ).last_hidden_state  # (B, T, D)
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
            projector.train()
            language_model.train()
    model.eval()
    return True


POSITION_KINDS = ("color_at_position", "shape_at_position")
POSITION_CHECK_STEP = 1000
POSITION_CHECK_THRESHOLD = 0.8


def position_accuracy(model, processor, batches) -> float:
    """The lower of the colour-at-a-position and shape-at-a-position accuracies (full tokens) on prepared batches."""
    per_kind = easyvqa.evaluate(model, processor, batches, {"method": "none"})["per_kind"]
    return min(per_kind[kind] for kind in POSITION_KINDS)


def new_model(config: LlavaRCConfig, clip: CLIPModel, seed: int) -> LlavaRCForConditionalGeneration:
    """A LLaVA-RC with the trained CLIP as its vision and guidance towers and a fresh projector and language model
    (initialised from ``seed``); only the projector and the language model are trainable."""
    torch.manual_seed(seed)
    model = LlavaRCForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.guidance_text_model.load_state_dict(clip.text_model.state_dict())
    model.guidance_text_projection.load_state_dict(clip.text_projection.state_dict())
    model.guidance_visual_projection.load_state_dict(clip.visual_projection.state_dict())
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    return model


# ---- the whole recipe --------------------------------------------------------------------------------------
def model_config(clip_config: CLIPConfig, tokenizer, hidden_size: int = 128) -> LlavaRCConfig:
    text_config = clip_config.text_config.to_dict()
    vision_config = clip_config.vision_config.to_dict()
    return LlavaRCConfig(
        vision_config=vision_config,
        text_config=dict(
            model_type="llama",
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-1,  # the layer the dense CLIP terms train (see the module docstring)
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        compression=DEFAULT_COMPRESSION,
        guidance_text_config=text_config,
        guidance_projection_dim=clip_config.projection_dim,
    )


def clip_config_for(vocab_size: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        ),
        projection_dim=64,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-mosaics", type=int, default=10000)
    parser.add_argument("--clip-steps", type=int, default=1000)
    parser.add_argument("--clip-batch-size", type=int, default=96)
    parser.add_argument("--clip-single-share", type=float, default=0.5, help="share of single images in a CLIP batch")
    parser.add_argument("--lm-steps", type=int, default=5000)
    parser.add_argument("--lm-batch-size", type=int, default=32)
    parser.add_argument(
        "--lm-attempts",
        type=int,
        default=3,
        help=f"stage-2 starts at most (a run whose position accuracy on training mosaics is under "
        f"{POSITION_CHECK_THRESHOLD} after {POSITION_CHECK_STEP} steps starts again from the next seed)",
    )
    parser.add_argument("--lm-hidden-size", type=int, default=128, help="width of the 3-layer Llama")
    parser.add_argument("--eval-questions", type=int, default=2000, help="questions per test set in the final report")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--refresh-code",
        action="store_true",
        help="only copy the package's current model code over the code files of an existing --output-dir checkpoint "
        "(after a library change; the weights are untouched)",
    )
    parser.add_argument(
        "--autocast",
        choices=["bfloat16", "none"],
        default="bfloat16",
        help="mixed precision for the training steps (weights stay float32; bfloat16 is 2-3x faster on CPUs with AMX)",
    )
    args = parser.parse_args(argv)
    if args.refresh_code:
        refresh_code(args.output_dir)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.autocast == "bfloat16")
    timings = {}
    started = time.perf_counter()

    words = easyvqa.vocabulary()
    processor = build_processor(words)
    singles = easyvqa.single_scenes("train")
    mosaics = easyvqa.mosaic_scenes("train", args.train_mosaics, args.seed)
    scenes = singles + mosaics
    pixels = pixel_values(processor, scenes)
    timings["pixels_s"] = time.perf_counter() - started

    clip_config = clip_config_for(len(processor.guidance_tokenizer))
    clip = CLIPModel(clip_config)
    stage = time.perf_counter()
    train_clip(
        clip,
        processor.guidance_tokenizer,
        pixels,
        scenes,
        args.clip_steps,
        args.clip_batch_size,
        args.seed,
        autocast,
        args.clip_single_share,
    )
    timings["clip_s"] = time.perf_counter() - stage
    test_singles = easyvqa.single_scenes("test")
    test_pixels = pixel_values(processor, test_singles)
    zero_shot = clip_zero_shot(clip, processor.guidance_tokenizer, test_pixels, test_singles)
    logger.warning(f"clip zero-shot single-image accuracy on easy-VQA test: {zero_shot}")

    config = model_config(clip_config, processor.tokenizer, args.lm_hidden_size)
    stage = time.perf_counter()
    features = vision_features(new_model(config, clip, args.seed), pixels)
    del pixels
    # Stage 2 finds how to read a position in some runs and not in others (see the module docstring): after
    # POSITION_CHECK_STEP steps, training mosaics' position questions decide whether this run goes on or stage 2
    # starts again from the next seed. The last attempt always runs to the end.
    probe_scenes = mosaics[:100]
    probe_examples = [e for scene in probe_scenes for e in scene.examples if e.kind in POSITION_KINDS]
    # A processor of its own: tokenizing would leave truncation set in the one that is saved.
    probe = easyvqa.prepare_batches(build_processor(words), probe_scenes, probe_examples)
    attempts = []
    for attempt in range(args.lm_attempts):
        seed = args.seed + attempt
        model = new_model(config, clip, seed)

        def check(model=model, seed=seed, last=attempt == args.lm_attempts - 1) -> bool:
            accuracy = position_accuracy(model, processor, probe)
            attempts.append({"seed": seed, "position_accuracy_at_check": accuracy})
            logger.warning(f"position check at step {POSITION_CHECK_STEP}, seed {seed}: {accuracy:.3f}")
            return last or accuracy >= POSITION_CHECK_THRESHOLD

        if train_language_model(
            model,
            processor.tokenizer,
            features,
            scenes,
            args.lm_steps,
            args.lm_batch_size,
            seed,
            autocast,
            check=(POSITION_CHECK_STEP, check),
        ):
            break
    timings["lm_s"] = time.perf_counter() - stage
    model.requires_grad_(True)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id

    output_dir = args.output_dir
    if output_dir.exists():
        shutil.rmtree(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    write_package_notes(output_dir)
    timings["total_s"] = time.perf_counter() - started

    report = {
        "clip_zero_shot_single": zero_shot,
        "stage2_attempts": attempts,
        "timings": timings,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    report["accuracy_full_tokens"] = easyvqa.quick_report(model, processor, args.eval_questions, seed=args.seed)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.warning(json.dumps(report, indent=2))


MODEL_CARD = """# llava-rc-easyvqa

A tiny LLaVA-RC (`LlavaRCForConditionalGeneration`) trained from scratch by `python -m llava_rc.train_easyvqa` on
easy-VQA and 2x2 mosaic scenes built from it: a 4-layer 64-wide CLIP ViT (168 px, patch 14, 144 patch tokens) with a
2-layer CLIP text tower (the RC guidance tower), a two-layer projector and a 3-layer 128-wide Llama language model
with a word-level tokenizer. Compression defaults to RC with CLIP guidance. See `training_report.json` for the
settings and full-token accuracy.

Load: `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)` and `AutoProcessor` likewise;
prompt `USER: <image>\\n{question} ASSISTANT:`.

## Data
easy-VQA by Victor Zhou (https://github.com/vzhou842/easy-VQA), MIT licence (`LICENSE-easy-vqa`), used through the
`easy-vqa` package with its own train/test split; mosaics of test images are used for testing only.
"""


def refresh_code(checkpoint: Path) -> None:
    """Copy the package's model code into a checkpoint: every file that its entry files import, transitively.

    The entry files are the ones ``auto_map`` names (configuration, modeling, processing); a sibling they import
    (``from .x import y``) must travel too, or loading the checkpoint through remote code fails.
    """
    package = Path(__file__).resolve().parent
    if not sorted(checkpoint.glob("*.py")):
        raise ValueError(f"{checkpoint} holds no code files; expected a checkpoint written by save_pretrained")
    code_files = remote_code_files(package)
    for name in code_files:
        shutil.copyfile(package / name, checkpoint / name)
    logger.warning(f"refreshed {len(code_files)} code files in {checkpoint}")


REMOTE_CODE_ENTRIES = ("configuration_llava_rc.py", "modeling_llava_rc.py", "processing_llava_rc.py")


def remote_code_files(package: Path, entries: tuple[str, ...] = REMOTE_CODE_ENTRIES) -> list[str]:
    """The package files a remote-code checkpoint needs: the entry files and their relative imports, transitively."""
    needed, pending = set(), list(entries)
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        for module in re.findall(r"^from \.(\w+) import", (package / name).read_text(), flags=re.MULTILINE):
            pending.append(f"{module}.py")
    return sorted(needed)


def write_package_notes(output_dir: Path) -> None:
    """The dataset's licence and attribution next to the weights."""
    licence = importlib.metadata.distribution("easy-vqa").read_text("LICENSE")
    (output_dir / "LICENSE-easy-vqa").write_text(licence)
    (output_dir / "README.md").write_text(MODEL_CARD)


if __name__ == "__main__":
    main()
