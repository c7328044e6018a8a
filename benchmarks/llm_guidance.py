"""What the ``"llm"`` and ``"clip"`` text scores measure on the shipped model (mosaic test questions).

``"llm"`` guidance scores a patch by the cosine between its projected token (the LLM's input) and the mean of the
question tokens' normalised input embeddings; ``"clip"`` by the cosine between CLIP's projected patch and CLIP's
text embedding of the question. For each, on mosaic questions that name one cell (the unique shape or colour, or a
position), this measures:
- ``hit``: the share of the top-``k`` patches by score that lie in the asked cell (chance: 1/4), ``hit_top1`` the
  same for the top patch;
- ``question_dependence``: 1 - the mean correlation between the score maps of two different questions on the same
  image (0: the question does not change the map at all);
- correlations of the map with the token's norm, with "the patch shows a shape" (vs background) and with the
  cosine to the mean of all word embeddings (a question-free direction).
Writes ``benchmarks/results/llm_guidance.json``.

    OMP_NUM_THREADS=1 python benchmarks/llm_guidance.py --update-docs  # ~1 min; the table in docs/methods.md
    python benchmarks/llm_guidance.py --docs-only                        # the table from the saved JSON
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench_common import ROOT, checkpoint_sources, write_readme_section, write_result  # benchmarks/bench_common.py
from llava_rc import easyvqa

CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"


def asked_cell(scene, example) -> int | None:
    """The mosaic cell a question is about, or None (yes/no questions)."""
    if example.kind in ("shape_at_position", "color_at_position"):
        return next(index for index, position in enumerate(easyvqa.POSITIONS) if position in example.question)
    if example.kind == "color_of_unique_shape":
        return next(index for index, (_, shape) in enumerate(scene.cells) if shape == example.question.split()[-1][:-1])
    if example.kind == "shape_of_unique_color":
        return next(index for index, (color, _) in enumerate(scene.cells) if color == example.question.split()[-1][:-1])
    return None


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two flat tensors."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))


MEASURES = [
    ("hit", "share of the top {top} patches in the asked cell (chance 0.25)"),
    ("hit_top1", "top patch in the asked cell (chance 0.25)"),
    ("dependence", "question dependence: 1 - mean correlation of two questions' maps on one image"),
    ("shape", "correlation with \"the patch shows a shape\""),
    ("norm", "correlation with the patch token's norm"),
    ("mean_word", "correlation with the cosine to the mean word embedding (question-free)"),
]


def docs_lines(result: dict) -> list[str]:
    """The table for docs/methods.md ("Text guidance") from a result."""
    summary = result["summary"]
    lines = ["| measure | `\"llm\"` | `\"clip\"` |", "|---|---|---|"]
    for key, text in MEASURES:
        values = [f"{summary[name][key]:.2f}" if key in summary[name] else "-" for name in ("llm", "clip")]
        lines.append(f"| {text.format(top=result['top'])} | {values[0]} | {values[1]} |")
    lines += ["", f"{result['mosaics']} test mosaics, every question (hit rates: the questions naming one cell)."]
    return lines


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--mosaics", type=int, default=100)
    parser.add_argument("--top", type=int, default=14, help="k of the hit rate (14 = 10%% of 144 patches)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "llm_guidance.json")
    parser.add_argument("--update-docs", action="store_true", help="regenerate the table in docs/methods.md")
    parser.add_argument("--docs-only", action="store_true", help="only regenerate that table from the saved JSON")
    args = parser.parse_args()
    if args.docs_only:
        write_readme_section("llm-guidance", docs_lines(json.loads(args.output.read_text())))
        return

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    scenes = easyvqa.mosaic_scenes("test", args.mosaics, 0)
    vision = model.model.vision_tower
    layer = model.config.vision_feature_layer
    embeddings = model.get_input_embeddings().weight.float()  # (V, D)
    mean_word = torch.nn.functional.normalize(embeddings, dim=-1).mean(dim=0)  # (D,) a question-free direction
    stats = {"llm": {"hit": [], "hit_top1": [], "dependence": [], "norm": [], "shape": [], "mean_word": []},
             "clip": {"hit": [], "hit_top1": [], "dependence": [], "norm": [], "shape": [], "mean_word": []}}
    for scene in scenes:
        prompts = [easyvqa.PROMPT.format(question=example.question) for example in scene.examples]
        inputs = processor(images=[scene.image()] * len(prompts), text=prompts, padding=True, return_tensors="pt")
        hidden = vision(inputs["pixel_values"][:1], output_hidden_states=True).hidden_states
        features = hidden[layer][:, 1:]  # (1, N, C) patch tokens
        side = int(features.shape[1] ** 0.5)
        projected = model.model.multi_modal_projector(features)[0].float()  # (N, D) the LLM's image tokens
        clip_patches = model.guidance_visual_projection(vision.post_layernorm(hidden[-1][:, 1:]))[0].float()  # (N, P)
        llm_question, _ = model._llm_question(inputs["input_ids"], inputs["attention_mask"], None,
                                              inputs.get("guidance_mask"))  # (Q, D)
        clip_question, _ = model._clip_question(inputs["guidance_input_ids"], inputs["guidance_attention_mask"])
        # Patch cells and shape pixels on the patch grid.
        rows = torch.arange(side).repeat_interleave(side)
        cols = torch.arange(side).repeat(side)
        cell = (rows // (side // 2)) * 2 + cols // (side // 2)  # (N,)
        objects = torch.from_numpy(scene.object_cells())  # (H, W)
        shape_pixels = (objects >= 0).float()[None, None]  # (1, 1, H, W)
        shows_shape = torch.nn.functional.interpolate(shape_pixels, size=(side, side), mode="area").flatten()  # (N,)
        for name, patches, questions in (("llm", projected, llm_question), ("clip", clip_patches, clip_question)):
            scores = torch.nn.functional.cosine_similarity(patches.unsqueeze(0), questions.unsqueeze(1), dim=-1)
            for example, row in zip(scene.examples, scores):
                target = asked_cell(scene, example)
                if target is not None:
                    top = row.topk(args.top).indices
                    stats[name]["hit"].append(float((cell[top] == target).float().mean()))
                    stats[name]["hit_top1"].append(float(cell[top[0]] == target))
                stats[name]["norm"].append(correlation(row, patches.norm(dim=-1)))
                stats[name]["shape"].append(correlation(row, shows_shape))
                if name == "llm":
                    stats[name]["mean_word"].append(
                        correlation(row, torch.nn.functional.cosine_similarity(patches, mean_word.unsqueeze(0), dim=-1))
                    )
            if len(scores) > 1:
                pairs = [correlation(scores[i], scores[j]) for i in range(len(scores)) for j in range(i + 1, len(scores))]
                stats[name]["dependence"].append(1 - sum(pairs) / len(pairs))
    summary = {
        name: {key: sum(values) / len(values) for key, values in values_by_key.items() if values}
        for name, values_by_key in stats.items()
    }
    for name, values in summary.items():
        print(name, {key: round(value, 3) for key, value in values.items()})
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"mosaics": args.mosaics, "top": args.top, "summary": summary}
    result = write_result(args.output, result, extra_sources=checkpoint_sources(args.checkpoint))
    if args.update_docs:
        write_readme_section("llm-guidance", docs_lines(result))


if __name__ == "__main__":
    main()
