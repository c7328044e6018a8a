"""The main job: the shipped tiny LLaVA-RC answers questions about bundled scenes, with compression off and on.

Run ``python -m llava_rc``. The model (``llava_rc/checkpoints/llava-rc-easyvqa``, trained by
``python -m llava_rc.train_easyvqa`` on easy-VQA) is loaded the way users load a Hub repo,
``AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)``. For every bundled scene (easy-VQA
test images and 2x2 test mosaics, ``llava_rc/samples``) and question it prints the answer with all visual tokens and
with the model's compression (RC with CLIP guidance), the tokens kept per image and the generate times, and writes
one PNG per scene overlaying, for each question, which patches were kept, recovered by the question and merged.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

PACKAGE = Path(__file__).resolve().parent
CHECKPOINT = PACKAGE / "checkpoints" / "llava-rc-easyvqa"
SAMPLES = PACKAGE / "samples"
PROMPT = "USER: <image>\n{question} ASSISTANT:"
PANEL = 252  # pixels per overlay panel
# Overlay colours (RGBA): kept as is, recovered by the question (kept only because of it), merged into another token.
KEPT, RECOVERED, MERGED = (46, 204, 64, 150), (255, 133, 27, 170), (0, 116, 217, 90)


def timed_generate(model, inputs: dict, compression: dict | None, repeats: int, max_new_tokens: int = 4):
    """Median seconds of ``repeats`` greedy generate calls (after a warm-up) and the last output."""
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    output = model.generate(**inputs, compression=compression, **settings)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = model.generate(**inputs, compression=compression, **settings)
        times.append(time.perf_counter() - started)
    return statistics.median(times), output


def answer_text(processor, output, prompt_length: int) -> str:
    return processor.tokenizer.decode(output.sequences[0, prompt_length:], skip_special_tokens=True).strip()


def kept_as_themselves(report) -> set[int]:
    """The patches the language model reads unmerged: output tokens that absorbed exactly one patch."""
    sizes = report.absorbed[0].sum(dim=-1)  # (K,)
    return {index for index, size in zip(report.source_index[0].tolist(), sizes.tolist()) if size == 1 and index >= 0}


def patch_roles(report, vision_only_report) -> dict[str, set[int]]:
    """Which patches the language model reads as themselves ("kept"), which of those only the question brought back
    ("recovered": kept with the question, not in the same method's vision-only run) and which were folded into
    another token ("merged")."""
    absorbed = report.absorbed[0]  # (K, N) bool
    kept, vision_kept = kept_as_themselves(report), kept_as_themselves(vision_only_report)
    merged = set(absorbed[absorbed.sum(dim=-1) > 1].any(dim=0).nonzero().flatten().tolist()) - kept
    return {"kept": kept & vision_kept, "recovered": kept - vision_kept, "merged": merged}


def overlay(image: Image.Image, roles: dict[str, set[int]], grid: int, caption: str) -> Image.Image:
    """The image at PANEL px with each patch tinted by its role (dropped patches darkened) and a caption."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.NEAREST)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    step = PANEL / grid
    colours = {"kept": KEPT, "recovered": RECOVERED, "merged": MERGED}
    for patch in range(grid * grid):
        row, column = divmod(patch, grid)
        box = [column * step, row * step, (column + 1) * step - 1, (row + 1) * step - 1]
        role = next((name for name, patches in roles.items() if patch in patches), None)
        draw.rectangle(box, fill=colours[role] if role else (0, 0, 0, 140))
    panel = Image.new("RGB", (PANEL, PANEL + 34), "white")
    panel.paste(Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB"), (0, 0))
    ImageDraw.Draw(panel).multiline_text((4, PANEL + 2), caption, fill="black")
    return panel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CHECKPOINT), help="a LLaVA-RC repo id or directory")
    parser.add_argument("--samples", type=Path, default=SAMPLES)
    parser.add_argument("--output-dir", type=Path, default=Path("llava_rc_demo"), help="where the PNGs go")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    compression = model.config.compression
    vision_only = {**compression, "guidance": None} if "guidance" in compression else compression
    num_patches = model.config.image_seq_length
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {num_patches} visual tokens per image; compression {compression['method']} {compression}")
    print(f"{'question':44s} {'expected':>9s} {'all tokens':>10s} {'compressed':>10s} {'kept':>5s} {'ms all':>7s} {'ms comp':>7s}")
    totals = {"right_off": 0, "right_on": 0, "questions": 0, "kept": []}
    for sample in json.loads((args.samples / "samples.json").read_text()):
        image = Image.open(args.samples / sample["image"])
        panels = []
        for entry in sample["questions"]:
            inputs = processor(images=image, text=PROMPT.format(question=entry["question"]), return_tensors="pt")
            prompt_length = inputs["input_ids"].shape[1]
            seconds_off, off = timed_generate(model, inputs, {"method": "none"}, args.repeats)
            seconds_on, on = timed_generate(model, inputs, None, args.repeats)
            vision = model.generate(
                **inputs, compression=vision_only, max_new_tokens=1, do_sample=False, return_dict_in_generate=True
            )
            answer_off, answer_on = answer_text(processor, off, prompt_length), answer_text(processor, on, prompt_length)
            kept = int(on.compression.kept_counts[0])
            print(
                f"{entry['question']:44s} {entry['answer']:>9s} {answer_off:>10s} {answer_on:>10s} {kept:>5d} "
                f"{seconds_off * 1000:7.1f} {seconds_on * 1000:7.1f}"
            )
            totals["right_off"] += answer_off == entry["answer"]
            totals["right_on"] += answer_on == entry["answer"]
            totals["questions"] += 1
            totals["kept"].append(kept)
            roles = patch_roles(on.compression, vision.compression)
            caption = f"{entry['question']}\n-> {answer_on} ({kept} of {num_patches} tokens)"
            panels.append(overlay(image, roles, grid, caption))
        sheet = Image.new("RGB", (PANEL * len(panels), panels[0].height), "white")
        for index, panel in enumerate(panels):
            sheet.paste(panel, (index * PANEL, 0))
        sheet.save(args.output_dir / sample["image"])
    mean_kept = sum(totals["kept"]) / len(totals["kept"])
    print(
        f"\n{totals['right_off']}/{totals['questions']} right with all tokens, {totals['right_on']}/{totals['questions']} "
        f"compressed, {mean_kept:.1f} of {num_patches} tokens kept on average. Overlays (green kept, orange recovered "
        f"by the question, blue merged, dark dropped): {args.output_dir}/"
    )


if __name__ == "__main__":
    main()
