"""Stock LLaVA-OneVision vs LLaVA-OneVision RC with the same random weights: tokens per image and time to first
token (TTFT) against its roofline.

Reuses ``benchmarks/latency.py`` (one ``generate()`` per measurement, variants alternated after a warm-up, medians)
and ``benchmarks/roofline.py`` (ceilings measured in the run; efficiency = measured ratio / roofline ratio). Each
request holds one image read as base view + anyres grid (a single-image row). Variants: stock; ``cls_attention``
(ranked by the mean received attention, SigLIP has no [CLS]) keeping 1/9, 2/9 and 3/9 of the image's non-newline
tokens (LLaVA-1.5's 64/128/192 of 576); RC's dynamic count; G-Prune at its default.

    python benchmarks/latency_onevision.py --geometry cpu-onevision-small          # CPU: ratios only
    python benchmarks/latency_onevision.py --geometry llava-onevision-7b --device cuda --dtype float16
    python benchmarks/latency_onevision.py --geometry llava-onevision-7b --tokens-only   # token counts, any machine
"""

import argparse
import json
import platform
import statistics
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import roofline  # benchmarks/roofline.py, beside this script
from bench_common import RESULTS, measured_at, write_readme_section, write_result  # benchmarks/bench_common.py
import torch
import transformers
from latency import alternate, log, measure_ceilings, median_of, random_init_, run_generate  # benchmarks/latency.py
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from llava_rc import LlavaOnevisionRCConfig, LlavaOnevisionRCForConditionalGeneration
from llava_rc.compression_registry import parse_compression

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001


@dataclass(frozen=True)
class OnevisionGeometry:
    description: str
    vision: dict
    text: dict
    image_hw: tuple[int, int]
    grid_pinpoints: list
    text_tokens: int = 64
    token_table_sizes: tuple = ()  # extra (height, width) whose token counts are reported


SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26,
                     "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768}
# OneVision's 36 pinpoints: every (i, j) multiple of the crop size for i, j in 1..6.
ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]

GEOMETRIES = {
    "llava-onevision-7b": OnevisionGeometry(
        description=(
            "LLaVA-OneVision-7B at 1152 x 1152: SigLIP so400m/14-384 (26 x 1152, 729 tokens, no [CLS]) on 10 crops "
            "(base + 3 x 3 grid) + Qwen2-7B shape (28 x 3584, GQA 4); 729 + 6561 + 81 newline = 7371 image tokens"
        ),
        vision=SIGLIP_SO400M_384,
        text=QWEN2_7B,
        image_hw=(1152, 1152),
        grid_pinpoints=ONEVISION_PINPOINTS,
        token_table_sizes=((384, 384), (768, 768), (480, 640), (1536, 1536), (720, 1280)),
    ),
    # Scaled down for CPU ratios: 224 px crops (16 x 16 = 256 patches), pinpoints scaled from 384 to 224; a 448 x 448
    # image is base + 2 x 2 grid: 256 + 1024 + 32 newline = 1312 image tokens (the cpu-next-small count).
    "cpu-onevision-small": OnevisionGeometry(
        description=(
            "scaled-down LLaVA-OneVision for CPU ratios: SigLIP 224/14 (4 x 256, 256 tokens) on 5 crops (base + 2 x 2 "
            "grid at 448 px) + Qwen2 6 x 512 (GQA 2); 256 + 1024 + 32 newline = 1312 image tokens"
        ),
        vision={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
                "image_size": 224, "patch_size": 14},
        text={"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": 32064, "max_position_embeddings": 8192},
        image_hw=(448, 448),
        grid_pinpoints=[[224 * rows, 224 * cols] for rows in range(1, 7) for cols in range(1, 7)],
        token_table_sizes=((896, 896),),
    ),
}


def config_kwargs(spec: OnevisionGeometry) -> dict:
    return {
        "vision_config": {"model_type": "siglip_vision_model", "vision_use_head": False, **spec.vision},
        "text_config": {"model_type": "qwen2", "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1, "eos_token_id": 2,
                        **spec.text},
        "image_token_index": IMAGE_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "image_grid_pinpoints": spec.grid_pinpoints,
    }


def token_counts(model: LlavaOnevisionRCForConditionalGeneration, sizes) -> list[dict]:
    """Per image size (a single-image row): crops, placeholder tokens, newline tokens, the grid (rows, cols) the LM
    reads, and whether the stock code downsampled it (larger than ``vision_aspect_ratio``)."""
    geometry = model.image_geometry(torch.tensor(sizes))
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    crops = [image_size_to_num_patches(list(size), model.config.image_grid_pinpoints, vision.image_size)
             for size in sizes]
    rows = []
    for size, count, layout in zip(sizes, crops, model._image_token_layouts(crops, geometry)):
        grid = layout.views[1]
        grid_rows, grid_cols = get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints,
                                                           vision.image_size)
        rows.append({
            "image_hw": list(size),
            "crops": count,
            "tokens": layout.token_index.shape[0],
            "newlines": int((layout.token_index == -1).sum()),
            "grid": list(grid),
            # unpadding trims one side only; both sides smaller than the crop grid means bilinear downsampling
            "downsampled": grid[0] < grid_rows * side and grid[1] < grid_cols * side,
        })
    return rows


def variants_for(non_newline: int) -> dict:
    return {
        "stock": None,
        **{f"cls-{ninths}/9": {"method": "cls_attention", "budget": non_newline * ninths // 9} for ninths in (1, 2, 3)},
        "rc-dynamic": {"method": "rc"},
        "gprune": {"method": "gprune"},
    }


def build_models(spec: OnevisionGeometry, device: torch.device, dtype: torch.dtype):
    """(stock, rc) sharing RC's random weights (as ``latency.build_models``)."""
    with torch.device(device), no_init_weights():
        rc = LlavaOnevisionRCForConditionalGeneration._from_config(
            LlavaOnevisionRCConfig(**config_kwargs(spec)), dtype=dtype, attn_implementation="sdpa"
        )
    random_init_(rc, seed=0)
    with torch.device("meta"):
        stock = LlavaOnevisionForConditionalGeneration._from_config(
            LlavaOnevisionConfig(**config_kwargs(spec)), dtype=dtype, attn_implementation="sdpa"
        )
    stock.load_state_dict(rc.state_dict(), strict=True, assign=True)
    rc_buffers = dict(rc.named_buffers())
    for name, _ in list(stock.named_buffers()):
        module_name, _, buffer_name = name.rpartition(".")
        stock.get_submodule(module_name).register_buffer(buffer_name, rc_buffers[name], persistent=False)
    for model in (stock, rc):
        model.eval()
        model.generation_config.pad_token_id = PAD_TOKEN_ID
        model.generation_config.eos_token_id = None
    return stock, rc


def make_inputs(spec: OnevisionGeometry, image_tokens: int, crops: int, batch: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    before = spec.text_tokens // 2
    text = torch.randint(3, IMAGE_TOKEN_ID, (batch, spec.text_tokens), generator=generator)
    input_ids = torch.cat([text[:, :before], torch.full((batch, image_tokens), IMAGE_TOKEN_ID), text[:, before:]], 1)
    size = spec.vision["image_size"]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": torch.randn(batch, crops, 3, size, size, generator=generator).to(device, dtype),
        "image_sizes": torch.tensor([list(spec.image_hw)] * batch, device=device),
    }


def roofline_shape(spec: OnevisionGeometry, image_tokens: int, crops: int, dtype) -> roofline.LlavaShape:
    vision, text = spec.vision, spec.text
    return roofline.LlavaShape(
        vision=roofline.TransformerShape(
            layers=vision["num_hidden_layers"], hidden=vision["hidden_size"], heads=vision["num_attention_heads"],
            kv_heads=vision["num_attention_heads"], intermediate=vision["intermediate_size"], gated_mlp=False,
        ),
        image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,  # SigLIP: patches only, no [CLS]
        patches=image_tokens,
        crops=crops,
        text=roofline.TransformerShape(
            layers=text["num_hidden_layers"], hidden=text["hidden_size"], heads=text["num_attention_heads"],
            kv_heads=text["num_key_value_heads"], intermediate=text["intermediate_size"], gated_mlp=True,
            vocab=text["vocab_size"],
        ),
        dtype_bytes=torch.finfo(dtype).bits // 8,
    )


def scenario(spec, shape: roofline.LlavaShape, compression, kept: float | None, newlines: int) -> roofline.Scenario:
    """The LM reads ``kept`` tokens (newlines included). The projector runs on every crop patch for stock, for
    selection plans (a kept token is the stock token: projected, then packed), projected-stage methods and "llm"
    guidance; merging methods of stage "vision" also project their merged tokens."""
    crop_patches = shape.crops * shape.image_tokens
    if compression is None:
        return roofline.Scenario(spec.text_tokens, shape.patches, crop_patches)
    settings = parse_compression(compression)
    merging = settings.method in ("rc", "prumerge", "prumerge_plus")
    projected = crop_patches if (not merging or settings.guidance_source == "llm") else 0
    if merging:
        projected += round(kept) - newlines
    return roofline.Scenario(spec.text_tokens, round(kept), projected)


def main() -> None:
    parser = argparse.ArgumentParser(description="Stock LLaVA-OneVision vs RC: tokens per image, TTFT vs roofline")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="cpu-onevision-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens-only", action="store_true", help="token counts and FLOPs only (no weights built)")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--update-readme", action="store_true", help="regenerate the docs/llava-onevision.md tables from the results"
    )
    parser.add_argument("--readme-only", action="store_true", help="only regenerate those tables from the saved JSON")
    args = parser.parse_args()
    if args.readme_only:
        update_readme()
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    spec = GEOMETRIES[args.geometry]
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))

    with torch.device("meta"):
        counter = LlavaOnevisionRCForConditionalGeneration(LlavaOnevisionRCConfig(**config_kwargs(spec)))
    tokens = token_counts(counter, [spec.image_hw, *spec.token_table_sizes])
    image = tokens[0]
    non_newline = image["tokens"] - image["newlines"]
    variants = variants_for(non_newline)
    shape = roofline_shape(spec, image["tokens"], image["crops"], dtype)
    result = {
        "benchmark": "latency_onevision",
        "geometry": args.geometry,
        "geometry_description": spec.description,
        "tokens_per_image": tokens,
        "variants": variants,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(sys.argv),
    }
    if not args.tokens_only:
        ceilings_measured = measure_ceilings(device, dtype)
        ceilings = roofline.Ceilings(ceilings_measured["flops_per_second"], ceilings_measured["bytes_per_second"])
        stock, rc = build_models(spec, device, dtype)
        inputs = make_inputs(spec, image["tokens"], image["crops"], 1, device, dtype, seed=1)
        with torch.no_grad():
            functions = {
                name: partial(run_generate, stock if compression is None else rc, compression, inputs, 1, device)
                for name, compression in variants.items()
            }
            samples = alternate(functions, args.repeats)
        ttft = {name: median_of(values, "ttft") for name, values in samples.items()}
        kept = {name: median_of(values, "kept_mean") for name, values in samples.items()}
        rows = {}
        stock_roof = roofline.ttft_seconds(shape, scenario(spec, shape, None, None, image["newlines"]), 1, ceilings)
        for name, compression in variants.items():
            roof = roofline.ttft_seconds(
                shape, scenario(spec, shape, compression, kept[name], image["newlines"]), 1, ceilings
            )
            measured_ratio = ttft["stock"] / ttft[name]
            roofline_ratio = stock_roof / roof
            rows[name] = {
                "kept_image_tokens": kept[name] if kept[name] is not None else image["tokens"],
                "ttft_seconds": ttft[name],
                "ttft_ratio": measured_ratio,
                "roofline_ttft_ratio": roofline_ratio,
                "efficiency": measured_ratio / roofline_ratio,
            }
            log(f"{name}: kept {rows[name]['kept_image_tokens']:.0f}, TTFT {ttft[name] * 1e3:.1f} ms, "
                f"ratio {measured_ratio:.2f} (roofline {roofline_ratio:.2f})")
        result.update(ceilings=ceilings_measured, repeats=args.repeats, ttft_batch1=rows)
    out_path = Path(args.output) if args.output else (
        ROOT / "benchmarks" / "results" / f"latency_onevision_{args.geometry}_{device.type}.json"
    )
    result = write_result(out_path, result)
    print(json.dumps(result, indent=2))
    if args.update_readme:
        update_readme()


TOKENS_RESULT = "latency_onevision_7b_tokens.json"
TTFT_RESULT = "latency_onevision_cpu-onevision-small_cpu.json"


def committed_sections() -> dict[str, list[str]]:
    """docs/llava-onevision.md's tables: tokens per image at OneVision-7B geometry and TTFT at the CPU geometry."""
    tokens = json.loads((RESULTS / TOKENS_RESULT).read_text())
    lines = [
        f"Tokens per image at {tokens['geometry']} geometry, no compression (`benchmarks/results/{TOKENS_RESULT}`). "
        + measured_at(tokens),
        "",
        "| image (h x w) | crops | grid rows x cols | newlines | image tokens |",
        "|---|---|---|---|---|",
    ]
    for image in sorted(tokens["tokens_per_image"], key=lambda entry: entry["image_hw"][0] * entry["image_hw"][1]):
        grid = f"{image['grid'][0]} x {image['grid'][1]}" + (" (downsampled)" if image["downsampled"] else "")
        lines.append(
            f"| {image['image_hw'][0]} x {image['image_hw'][1]} | {image['crops']} | {grid} | {image['newlines']} | "
            f"{image['tokens']} |"
        )
    ttft = json.loads((RESULTS / TTFT_RESULT).read_text())
    lines += [
        "",
        f"TTFT at batch 1, {ttft['geometry_description']}; {ttft['device']}, {ttft['dtype']}, 1 thread, median of "
        f"{ttft['repeats']} (`benchmarks/results/{TTFT_RESULT}`). " + measured_at(ttft),
        "",
        "| variant | settings | image tokens kept | TTFT stock / this | roofline ratio | efficiency |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in ttft["ttft_batch1"].items():
        if ttft["variants"][name] is None:
            continue
        settings = ", ".join(f"{key} {value}" for key, value in ttft["variants"][name].items())
        lines.append(
            f"| {name} | {settings} | {row['kept_image_tokens']:.0f} | {row['ttft_ratio']:.2f}x | "
            f"{row['roofline_ttft_ratio']:.2f}x | {row['efficiency']:.2f} |"
        )
    return {"onevision": lines}


def update_readme() -> None:
    for marker, lines in committed_sections().items():
        write_readme_section(marker, lines)


if __name__ == "__main__":
    main()
