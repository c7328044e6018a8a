"""easy-VQA and mosaic scenes built from it: the data behind the shipped tiny LLaVA-RC and its accuracy benchmark.

easy-VQA (Victor Zhou, MIT licence, https://github.com/vzhou842/easy-VQA, the ``easy-vqa`` package) has 64x64
images of one coloured shape on a pale background, with questions and 13 one-word answers, split 4000/1000 images.
Its own split is used as is: test images are never trained on.

Mosaic scenes put four images of one split in a 2x2 grid and ask about one cell or one object, so that the question
decides which visual tokens matter ("what color is the triangle?" when exactly one cell holds a triangle). They are
generated deterministically from a seed; test mosaics use test images only.

This module is for training, benchmarks and the demo; the model code does not import it.
"""

import json
import random
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # mosaic cells in reading order
CELL_SIZE = 64  # easy-VQA image side
MOSAIC_QUESTION_TYPES = ("color_of_unique_shape", "shape_of_unique_color", "shape_at_position", "color_at_position")


@dataclass
class Example:
    """One question about one image. ``kind`` names the question type used to report accuracy per type."""

    image_key: str
    question: str
    answer: str
    kind: str


@dataclass
class Scene:
    """An image (single easy-VQA image or a mosaic) and the (color, shape) of each of its cells in reading order."""

    key: str
    cells: tuple[tuple[str, str], ...]
    sources: tuple[int, ...]
    split: str
    examples: list[Example] = field(default_factory=list)

    def object_cells(self) -> np.ndarray:
        """(H, W) int at the image's resolution: the cell whose shape covers each pixel, -1 on background."""
        paths = image_paths(self.split)
        side = CELL_SIZE * (1 if len(self.sources) == 1 else 2)
        cells = np.full((side, side), -1, dtype=np.int64)
        for index, source in enumerate(self.sources):
            top, left = (index // 2) * CELL_SIZE, (index % 2) * CELL_SIZE
            region = cells[top : top + CELL_SIZE, left : left + CELL_SIZE]
            region[shape_mask(paths[source])] = index
        return cells

    def image(self) -> Image.Image:
        paths = image_paths(self.split)
        if len(self.sources) == 1:
            return Image.open(paths[self.sources[0]]).convert("RGB")
        mosaic = Image.new("RGB", (2 * CELL_SIZE, 2 * CELL_SIZE))
        for index, source in enumerate(self.sources):
            cell = Image.open(paths[source]).convert("RGB")
            mosaic.paste(cell, ((index % 2) * CELL_SIZE, (index // 2) * CELL_SIZE))
        return mosaic


@cache
def shape_mask(path: str) -> np.ndarray:
    """(64, 64) bool: the pixels of the image's shape (its palette colour)."""
    return _shape_pixels(path)[1]


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError("the easy-VQA data needs the easy-vqa package: pip install 'llava-rc[train]'") from error
    return easy_vqa


@cache
def image_paths(split: str) -> dict[int, str]:
    easy_vqa = _easy_vqa()
    return easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()


def question_kind(answer: str) -> str:
    """easy-VQA's three question families: "color", "shape" and "yes/no"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "color" if answer in COLORS else "shape"


# easy-VQA paints shapes in these CSS colours; backgrounds are pale and never equal one of them exactly.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}


def _shape_pixels(path: str) -> tuple[str, np.ndarray]:
    """The shape's colour (the palette colour covering the most pixels) and its (64, 64) bool pixel mask."""
    pixels = np.asarray(Image.open(path).convert("RGB"))  # (64, 64, 3)
    masks = {name: (pixels == value).all(axis=-1) for name, value in PALETTE.items()}
    color = max(masks, key=lambda name: masks[name].sum())
    return color, masks[color]


def cell_labels(path: str) -> tuple[str, str]:
    """The (color, shape) of an easy-VQA image, read off its pixels.

    Some images have only yes/no questions that leave the shape open, so the labels come from the drawing: the
    colour is the palette colour covering the most pixels; within the shape's bounding box a rectangle fills
    everything, a triangle puts much more of its area in one half (top vs bottom) than a circle does. On both splits
    these agree with every colour and shape answer easy-VQA gives (checked by the tests).
    """
    color, mask = _shape_pixels(path)
    rows, columns = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    half = box.shape[0] // 2
    imbalance = abs(int(box[:half].sum()) - int(box[box.shape[0] - half :].sum())) / box.sum()
    if box.mean() >= 0.95:
        return color, "rectangle"
    return color, "triangle" if imbalance >= 0.25 else "circle"


@cache
def single_scenes(split: str) -> tuple[Scene, ...]:
    """easy-VQA's own images and questions of one split ("train" or "test"), in image-id order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    easy_vqa = _easy_vqa()
    texts, answers, image_ids = easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    paths = image_paths(split)
    by_image: dict[int, list[tuple[str, str]]] = {}
    for text, answer, image_id in zip(texts, answers, image_ids):
        by_image.setdefault(image_id, []).append((text, answer))
    scenes = []
    for image_id in sorted(by_image):
        scene = Scene(f"{split}/{image_id}", (cell_labels(paths[image_id]),), (image_id,), split)
        scene.examples = [
            Example(scene.key, text, answer, question_kind(answer)) for text, answer in by_image[image_id]
        ]
        scenes.append(scene)
    return tuple(scenes)


def _mosaic_examples(key: str, cells: tuple[tuple[str, str], ...]) -> list[Example]:
    """One question of each mosaic type that this arrangement can answer without ambiguity."""
    examples = []
    colors = [color for color, _ in cells]
    shapes = [shape for _, shape in cells]
    unique_shapes = [index for index, shape in enumerate(shapes) if shapes.count(shape) == 1]
    unique_colors = [index for index, color in enumerate(colors) if colors.count(color) == 1]
    # Deterministic per scene: the choice of cell depends only on the key.
    chooser = random.Random(key)
    if unique_shapes:
        index = chooser.choice(unique_shapes)
        examples.append(Example(key, f"what color is the {shapes[index]}?", colors[index], "color_of_unique_shape"))
    if unique_colors:
        index = chooser.choice(unique_colors)
        examples.append(Example(key, f"what shape is {colors[index]}?", shapes[index], "shape_of_unique_color"))
    index = chooser.randrange(4)
    examples.append(Example(key, f"what shape is in the {POSITIONS[index]}?", shapes[index], "shape_at_position"))
    index = chooser.randrange(4)
    examples.append(
        Example(key, f"what color is the shape in the {POSITIONS[index]}?", colors[index], "color_at_position")
    )
    return examples


# easy-VQA's yes/no question forms, plain and negated; "{}" is "<color> shape" or "<shape>".
YES_NO_FORMS = (
    ("is there a {}?", "is there a {} in the image?", "does the image contain a {}?", "is a {} present?"),
    ("is there not a {}?", "is there not a {} in the image?", "does the image not contain a {}?", "is no {} present?"),
)


def mosaic_yes_no(scene: Scene) -> list[Example]:
    """Up to four yes/no questions in easy-VQA's forms about a mosaic: a colour and a shape that are present, and a
    colour and a shape that are not (when one is missing), each asked plainly or negated at random (seeded by the key).
    """
    chooser = random.Random(f"yes/no-{scene.key}")
    colors = {color for color, _ in scene.cells}
    shapes = {shape for _, shape in scene.cells}
    candidates = []
    for vocabulary, present, name in ((COLORS, colors, "{} shape"), (SHAPES, shapes, "{}")):
        absent = [value for value in vocabulary if value not in present]
        candidates.append((name.format(chooser.choice(sorted(present))), True))
        if absent:
            candidates.append((name.format(chooser.choice(absent)), False))
    examples = []
    for thing, is_present in candidates:
        negated = chooser.random() < 0.5
        question = chooser.choice(YES_NO_FORMS[negated]).format(thing)
        examples.append(Example(scene.key, question, "yes" if is_present != negated else "no", "yes/no"))
    return examples


def present_color_yes_no(scene: Scene) -> list[Example]:
    """Two yes/no questions in easy-VQA's forms about the colour a single image has, one plain ("yes") and one negated
    ("no"), each form chosen at random (seeded by the key), leaving out questions the image already has.

    easy-VQA asks about a colour that is present one time in eight: its training split has about 2500 such
    questions for 18000 about absent colours, 300 per colour, too few for a small language model to learn that the
    asked colour and the seen colour match (the first model trained to natural answer frequencies answered 23 of 70
    present-colour questions right, absent ones 439 of 471).
    """
    chooser = random.Random(f"present-{scene.key}")
    color = scene.cells[0][0]
    asked = {example.question for example in scene.examples}
    examples = []
    for negated in (False, True):
        question = chooser.choice(YES_NO_FORMS[negated]).format(f"{color} shape")
        if question not in asked:
            examples.append(Example(scene.key, question, "no" if negated else "yes", "yes/no"))
    return examples


def training_questions(scene: Scene) -> list[Example]:
    """Every question a scene can answer without ambiguity (used for training; evaluation asks one per type).

    Single images: easy-VQA's own questions and two about the colour the image has (``present_color_yes_no``).
    Mosaics: shape and colour at each of the four positions, the colour of every shape that occurs once, the shape of
    every colour that occurs once, and yes/no questions in easy-VQA's forms (``mosaic_yes_no``).
    """
    if len(scene.cells) == 1:
        return scene.examples + present_color_yes_no(scene)
    colors = [color for color, _ in scene.cells]
    shapes = [shape for _, shape in scene.cells]
    examples = mosaic_yes_no(scene)
    for index, (color, shape) in enumerate(scene.cells):
        position = POSITIONS[index]
        examples.append(Example(scene.key, f"what shape is in the {position}?", shape, "shape_at_position"))
        examples.append(Example(scene.key, f"what color is the shape in the {position}?", color, "color_at_position"))
        if shapes.count(shape) == 1:
            examples.append(Example(scene.key, f"what color is the {shape}?", color, "color_of_unique_shape"))
        if colors.count(color) == 1:
            examples.append(Example(scene.key, f"what shape is {color}?", shape, "shape_of_unique_color"))
    return examples


@cache
def mosaic_scenes(split: str, count: int, seed: int) -> tuple[Scene, ...]:
    """``count`` 2x2 mosaics of one split's images, chosen by ``seed``, each with its questions.

    Cells are drawn so that about half the mosaics have a shape that occurs exactly once (the case the
    "color of the unique shape" question needs).
    """
    singles = single_scenes(split)
    rng = random.Random(f"{split}-{seed}")
    scenes = []
    for number in range(count):
        picked = rng.sample(singles, 4)
        cells = tuple(scene.cells[0] for scene in picked)
        key = f"{split}/mosaic-{seed}-{number}"
        scene = Scene(key, cells, tuple(scene.sources[0] for scene in picked), split)
        scene.examples = _mosaic_examples(key, cells)
        scenes.append(scene)
    return tuple(scenes)


def vocabulary() -> list[str]:
    """Every word of the questions, answers and prompt template, in a fixed order."""
    words = set(COLORS) | set(SHAPES) | {"yes", "no"}
    for split in ("train", "test"):
        for scene in single_scenes(split):
            for example in scene.examples:
                words.update(re.findall(r"[a-z]+", example.question))
    for position in POSITIONS:
        words.update(position.split())
    words.update(["what", "color", "is", "the", "shape", "in"])
    return sorted(words)


# ---- prompts and evaluation --------------------------------------------------------------------------------
PROMPT = "USER: <image>\n{question} ASSISTANT:"


@dataclass
class PreparedBatch:
    """Processor outputs for a batch of examples, prepared once and reused for every method."""

    inputs: dict
    answers: list[str]
    kinds: list[str]


def prepare_batches(
    processor, scenes, examples: list[Example], batch_size: int = 32, prompt: str = PROMPT
) -> list[PreparedBatch]:
    """Tokenized prompts and pixels of ``examples`` (whose scenes are in ``scenes``), ``batch_size`` at a time;
    ``prompt`` has a ``{question}`` field (the LLaVA prompt by default)."""
    by_key = {scene.key: scene for scene in scenes}
    images: dict[str, Image.Image] = {}
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pictures = []
        for example in chunk:
            if example.image_key not in images:
                images[example.image_key] = by_key[example.image_key].image()
            pictures.append(images[example.image_key])
        prompts = [prompt.format(question=example.question) for example in chunk]
        inputs = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
        batches.append(PreparedBatch(dict(inputs), [e.answer for e in chunk], [e.kind for e in chunk]))
    return batches


@torch.no_grad()
def evaluate(model, processor, batches: list[PreparedBatch], compression: dict | None) -> dict:
    """Accuracy of the first generated token (greedy) and kept visual tokens, over prepared batches.

    The prompts are left-padded, so the last position's logits give the greedy answer; ``compression`` goes to
    ``forward`` exactly as ``generate`` would use it. Returns overall and per-kind accuracy and the kept-token
    statistics (mean, std, max per image); ``correct`` holds each question's result in order ("1" right, "0"
    wrong), for paired comparisons of settings on the same questions.
    """
    tokenizer = processor.tokenizer
    correct: dict[str, list[bool]] = {}
    in_order: list[bool] = []
    kept = []
    device = model.device
    for batch in batches:
        inputs = {name: value.to(device) for name, value in batch.inputs.items()}
        outputs = model(**inputs, compression=compression, logits_to_keep=1)
        predicted = tokenizer.convert_ids_to_tokens(outputs.logits[:, -1].argmax(dim=-1).tolist())
        for answer, kind, guess in zip(batch.answers, batch.kinds, predicted):
            correct.setdefault(kind, []).append(guess == answer)
            in_order.append(guess == answer)
        if getattr(outputs, "compression", None) is not None:
            kept.append(outputs.compression.kept_counts.float().cpu())
        else:  # compression off: every image token (Qwen's per-image count depends on the image's size)
            kept.append((inputs["input_ids"] == model.config.image_token_id).sum(dim=-1).float().cpu())
    everything = [hit for hits in correct.values() for hit in hits]
    kept_counts = torch.cat(kept)
    return {
        "accuracy": sum(everything) / len(everything),
        "per_kind": {kind: sum(hits) / len(hits) for kind, hits in sorted(correct.items())},
        "questions": len(everything),
        "kept_mean": float(kept_counts.mean()),
        "kept_std": float(kept_counts.std()) if len(kept_counts) > 1 else 0.0,
        "kept_max": float(kept_counts.max()),
        "correct": "".join("1" if hit else "0" for hit in in_order),
    }


def evaluation_sets(test_questions: int, test_mosaics: int, seed: int = 0):
    """The two test sets: a seeded sample of easy-VQA test questions, and the questions of seeded test mosaics."""
    singles = single_scenes("test")
    single_examples = [example for scene in singles for example in scene.examples]
    rng = random.Random(f"test-questions-{seed}")
    if test_questions < len(single_examples):
        single_examples = rng.sample(single_examples, test_questions)
    mosaics = mosaic_scenes("test", test_mosaics, seed)
    mosaic_examples = [example for scene in mosaics for example in scene.examples]
    return (singles, single_examples), (mosaics, mosaic_examples)


def quick_report(model, processor, questions: int, seed: int = 0, compression: dict | None = None) -> dict:
    """Full-token (or ``compression``) accuracy on ``questions`` easy-VQA test questions and about as many
    mosaic test questions."""
    compression = compression if compression is not None else {"method": "none"}
    (singles, single_examples), (mosaics, mosaic_examples) = evaluation_sets(questions, max(1, questions // 4), seed)
    return {
        "easy_vqa_test": evaluate(model, processor, prepare_batches(processor, singles, single_examples), compression),
        "mosaic_test": evaluate(model, processor, prepare_batches(processor, mosaics, mosaic_examples), compression),
    }


def write_samples(directory, seed: int = 0) -> None:
    """The demo's bundled scenes: two easy-VQA test images and three test mosaics, with one question of each kind.

    Writes ``<key>.png`` files and ``samples.json`` (scene file, cells, questions with answers and kinds).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"samples-{seed}")
    singles = rng.sample(single_scenes("test"), 2)
    mosaics = [scene for scene in mosaic_scenes("test", 50, seed) if len(scene.examples) == 4][:3]
    entries = []
    for scene in singles + mosaics:
        name = scene.key.replace("/", "-") + ".png"
        scene.image().save(directory / name)
        by_kind = {}
        for example in scene.examples:
            by_kind.setdefault(example.kind, example)
        questions = [{"question": e.question, "answer": e.answer, "kind": e.kind} for e in by_kind.values()]
        entries.append({"image": name, "cells": [list(cell) for cell in scene.cells], "questions": questions})
    (directory / "samples.json").write_text(json.dumps(entries, indent=2) + "\n")
