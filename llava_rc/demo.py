"""The main job: the shipped tiny LLaVA-RC answers questions about bundled scenes, with compression off and on.

Run ``python -m llava_rc``. The model (``llava_rc/checkpoints/llava-rc-easyvqa``, trained by
``python -m llava_rc.train_easyvqa`` on easy-VQA) is loaded the way users load a Hub repo,
``AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)``. For every bundled scene (easy-VQA
test images and 2x2 test mosaics, ``llava_rc/samples``) and question it prints the answer with all visual tokens and
with the model's compression (RC with CLIP guidance) and the tokens kept per image, and writes one PNG per scene that
explains itself: a legend, and for each question the question, both answers, the kept count and which patches were
kept, recovered by the question and merged. ``--image PATH --question TEXT`` asks about a picture of one's own.

No timings: a 1.2M-parameter model on a CPU spends its time outside the language model, so it cannot show the
speed-up; the measured speed figures are in ``benchmarks/`` (``benchmarks/results/``).

torch and transformers are imported after the arguments are parsed, so ``--help`` answers at once.
"""

import argparse
import json
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKPOINT = PACKAGE / "checkpoints" / "llava-rc-easyvqa"
SAMPLES = PACKAGE / "samples"
PROMPT = "USER: <image>\n{question} ASSISTANT:"
MAX_NEW_TOKENS = 4
PANEL = 288  # pixels per overlay panel (square image part)
MARGIN = 8
FONT_SIZE = 14
CAPTION_WIDTH = 40  # characters per caption line at FONT_SIZE in a PANEL-wide column
# Patch roles (RGBA fill; frames are opaque). Kept and recovered patches and merge centres get a thick frame and a
# faint tint, merged ones (folded into another token) a thin frame only, so the scene's colours stay readable;
# dropped ones (in no token) are darkened.
KEPT, RECOVERED, CENTRE = (46, 204, 64, 25), (255, 133, 27, 25), (0, 116, 217, 25)
MERGED, DROPPED = (0, 116, 217, 0), (0, 0, 0, 150)
LEGEND = [
    ("kept", KEPT, "kept as itself"),
    ("recovered", RECOVERED, "kept because of the question (recovered)"),
    ("centre", CENTRE, "merge centre: one token for it and the patches merged into it"),
    ("merged", MERGED, "merged into another token (a centre's or the extra token)"),
    ("dropped", DROPPED, "dropped"),
    ("extra", None, "not drawn: an extra token (RC, PruMerge) stands for no single patch; 'kept' counts it"),
]
SYNTHETIC_SOURCE = -2  # source_index of a token anchored at no patch (llava_rc.compressed_generation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llava_rc",
        description="The shipped tiny LLaVA-RC answers questions about bundled scenes with all visual tokens and "
        "compressed, and draws which patches it kept.",
    )
    parser.add_argument(
        "--model",
        default=str(CHECKPOINT),
        help="a LLaVA-RC repo id or directory (default: the shipped easy-VQA model)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=SAMPLES,
        help="a folder with samples.json (scenes: image file, questions and expected answers) and the images "
        "(default: the bundled scenes)",
    )
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="your own picture (any size; the model sees its centre square); replaces the bundled scenes",
    )
    parser.add_argument(
        "--question",
        action="append",
        default=None,
        help="a question about --image (repeat for several); there is no expected answer, so the table shows '-'",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("llava_rc_demo"),
        help="where the PNGs go, one per scene (default: %(default)s)",
    )
    return parser


def answer_text(processor, output, prompt_length: int) -> str:
    return processor.tokenizer.decode(output.sequences[0, prompt_length:], skip_special_tokens=True).strip()


def kept_as_themselves(report) -> set[int]:
    """The patches the language model reads unmerged: output tokens that absorbed exactly one patch."""
    sizes = report.absorbed[0].sum(dim=-1)  # (K,)
    return {index for index, size in zip(report.source_index[0].tolist(), sizes.tolist()) if size == 1 and index >= 0}


def patch_roles(report, vision_only_report) -> dict[str, set[int]]:
    """Which patches the language model reads as themselves ("kept"), which of those only the question brought back
    ("recovered": kept with the question, not in the same method's vision-only run), which anchor a merged token
    ("centre") and which were folded into another token ("merged"); the rest are dropped."""
    absorbed = report.absorbed[0]  # (K, N) bool
    kept, vision_kept = kept_as_themselves(report), kept_as_themselves(vision_only_report)
    merged_tokens = absorbed.sum(dim=-1) > 1  # (K,)
    centres = {index for index in report.source_index[0][merged_tokens].tolist() if index >= 0}
    merged = set(absorbed[merged_tokens].any(dim=0).nonzero().flatten().tolist()) - kept - centres
    return {"kept": kept & vision_kept, "recovered": kept - vision_kept, "centre": centres, "merged": merged}


def extra_tokens(report) -> int:
    """Tokens anchored at no patch (RC's and PruMerge's extra token): counted in ``kept_counts``, not drawable."""
    return int((report.source_index[0] == SYNTHETIC_SOURCE).sum())


def token_breakdown(roles: dict[str, set[int]], extra: int) -> str:
    """How the kept count splits into what the picture shows: framed patches, centres and undrawn extra tokens."""
    parts = [f"{len(roles['kept']) + len(roles['recovered'])} framed", f"{len(roles['centre'])} centres"]
    return " + ".join(parts + ([f"{extra} extra"] if extra else []))


def font(size: int = FONT_SIZE):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def draw_patch(draw, box: list[float], role: str | None) -> None:
    """One patch of the overlay: tinted and framed (kept, recovered), framed only (merged) or darkened (dropped)."""
    if role in ("kept", "recovered", "centre"):
        colour = {"kept": KEPT, "recovered": RECOVERED, "centre": CENTRE}[role]
        draw.rectangle(box, fill=colour, outline=colour[:3] + (255,), width=3)
    elif role == "merged":
        draw.rectangle(box, outline=MERGED[:3] + (140,), width=1)
    else:
        draw.rectangle(box, fill=DROPPED)


def model_view(image):
    """The part of the image the model sees at PANEL px: its centre square (CLIP's processor resizes the shortest
    edge and crops the centre), so a patch of the drawing is a patch of the model's input."""
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((PANEL, PANEL), Image.NEAREST)


def overlay(image, roles: dict[str, set[int]], grid: int):
    """The image at PANEL px with each of its grid x grid patches drawn by its role."""
    from PIL import Image, ImageDraw

    base = model_view(image)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    step = PANEL / grid
    for patch in range(grid * grid):
        row, column = divmod(patch, grid)
        box = [column * step, row * step, (column + 1) * step - 1, (row + 1) * step - 1]
        draw_patch(draw, box, next((name for name, patches in roles.items() if patch in patches), None))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def caption_lines(
    question: str, expected: str | None, answer_off: str, answer_on: str, kept: int, total: int, breakdown: str
) -> list:
    """(text, colour) lines under a panel: the question, both answers (red when not the expected one; black when
    there is none), the count and what it is made of."""
    lines = [(line, "black") for line in textwrap.wrap(f"Q: {question}", CAPTION_WIDTH)]
    for label, answer in (("all tokens", answer_off), ("compressed", answer_on)):
        lines.append((f"{label}: {answer or '(empty)'}", "black" if expected in (None, answer) else "red"))
    lines.append((f"expected: {expected if expected is not None else '-'}", "gray"))
    lines.append((f"kept {kept} of {total} tokens", "black"))
    lines.append((f"  = {breakdown}", "gray"))
    return lines


def legend_panel(width: int, title: str):
    """The sheet's heading: the scene and model, and one swatch per patch role."""
    from PIL import Image, ImageDraw

    swatch, line_height = 18, FONT_SIZE + 8
    rows = [(title, None)] + [(text, name) for name, _, text in LEGEND]
    size = (width, MARGIN * 2 + line_height * len(rows))
    heading, swatches = Image.new("RGB", size, "white"), Image.new("RGBA", size, (0, 0, 0, 0))
    draw, swatch_draw = ImageDraw.Draw(heading), ImageDraw.Draw(swatches)
    for index, (text, name) in enumerate(rows):
        top = MARGIN + index * line_height
        if name is None:
            draw.text((MARGIN, top), text, fill="black", font=font(FONT_SIZE + 2))
            continue
        box = [MARGIN, top, MARGIN + swatch, top + swatch]
        if name == "extra":  # nothing to draw: the line explains the count
            draw.text((MARGIN + swatch + 8, top + 1), text, fill="black", font=font())
            continue
        draw.rectangle(box, fill=(170, 170, 170))  # a light grey patch under the role's drawing
        draw_patch(swatch_draw, box, name if name != "dropped" else None)
        draw.text((MARGIN + swatch + 8, top + 1), text, fill="black", font=font())
    return Image.alpha_composite(heading.convert("RGBA"), swatches).convert("RGB")


def scene_sheet(title: str, panels: list, captions: list):
    """The PNG of one scene: legend on top, then one column per panel (image above its caption)."""
    from PIL import Image, ImageDraw

    line_height = FONT_SIZE + 4
    caption_height = MARGIN + line_height * max(len(lines) for lines in captions)
    width = MARGIN + len(panels) * (PANEL + MARGIN)
    heading = legend_panel(width, title)
    sheet = Image.new("RGB", (width, heading.height + PANEL + caption_height + MARGIN), "white")
    sheet.paste(heading, (0, 0))
    draw = ImageDraw.Draw(sheet)
    for index, (panel, lines) in enumerate(zip(panels, captions)):
        left = MARGIN + index * (PANEL + MARGIN)
        sheet.paste(panel, (left, heading.height))
        top = heading.height + PANEL + MARGIN
        for line_index, (text, colour) in enumerate(lines):
            draw.text((left, top + line_index * line_height), text, fill=colour, font=font())
    return sheet


def load_scenes(args, parser) -> tuple[Path, list[dict]]:
    """(folder, scenes): the --samples file's scenes, or one scene of --image with the --question list."""
    if args.image is None:
        if args.question:
            parser.error("--question needs --image (the bundled scenes bring their own questions)")
        return args.samples, json.loads((args.samples / "samples.json").read_text())
    if not args.question:
        parser.error("--image needs at least one --question")
    if args.samples != SAMPLES:
        parser.error("give --image or --samples, not both")
    if not args.image.is_file():
        parser.error(f"--image {str(args.image)!r} is not a file")
    return args.image.parent, [{"image": args.image.name, "questions": [{"question": q} for q in args.question]}]


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    folder, scenes = load_scenes(args, parser)
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    compression = model.config.compression
    vision_only = {**compression, "guidance": None} if "guidance" in compression else compression
    num_patches = model.config.image_seq_length
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {num_patches} visual tokens per image; compression {compression['method']} {compression}")
    print(f"{'scene':20s} {'question':44s} {'expected':>9s} {'all tokens':>10s} {'compressed':>10s} {'kept':>5s}")
    totals = {"right_off": 0, "right_on": 0, "questions": 0, "with_answer": 0, "kept": []}
    for sample in scenes:
        image = Image.open(folder / sample["image"])
        # First column: the scene as the model sees it, without any drawing.
        panels = [model_view(image)]
        captions = [[("the scene", "black"), (f"all tokens: {num_patches} per image", "black")]]
        for entry in sample["questions"]:
            inputs = processor(images=image, text=PROMPT.format(question=entry["question"]), return_tensors="pt")
            prompt_length = inputs["input_ids"].shape[1]
            off = model.generate(**inputs, compression={"method": "none"}, **settings)
            on = model.generate(**inputs, **settings)  # the model's own compression
            vision = model.generate(**inputs, compression=vision_only, **{**settings, "max_new_tokens": 1})
            answer_off = answer_text(processor, off, prompt_length)
            answer_on = answer_text(processor, on, prompt_length)
            kept = int(on.compression.kept_counts[0])
            expected = entry.get("answer")  # samples of one's own may have none
            print(
                f"{sample['image']:20s} {entry['question']:44s} {expected or '-':>9s} {answer_off:>10s} "
                f"{answer_on:>10s} {kept:>5d}"
            )
            if expected is not None:
                totals["right_off"] += answer_off == expected
                totals["right_on"] += answer_on == expected
                totals["with_answer"] += 1
            totals["questions"] += 1
            totals["kept"].append(kept)
            roles = patch_roles(on.compression, vision.compression)
            panels.append(overlay(image, roles, grid))
            breakdown = token_breakdown(roles, extra_tokens(on.compression))
            captions.append(
                caption_lines(entry["question"], expected, answer_off, answer_on, kept, num_patches, breakdown)
            )
        title = f"{sample['image']}: {Path(args.model).name}, compression {compression['method']}"
        scene_sheet(title, panels, captions).save(args.output_dir / Path(sample["image"]).with_suffix(".png").name)
    mean_kept = sum(totals["kept"]) / len(totals["kept"])
    scores = (
        f"{totals['right_off']}/{totals['with_answer']} right with all tokens, "
        f"{totals['right_on']}/{totals['with_answer']} compressed, "
        if totals["with_answer"]
        else ""
    )
    print(
        f"\n{totals['questions']} questions: {scores}{mean_kept:.1f} of {num_patches} tokens kept on average. "
        f"One picture per scene, with its legend: {args.output_dir}/"
    )


if __name__ == "__main__":
    main()
