"""Stock LLaVA vs LLaVA-RC with the same random weights: latency, memory, and how close each ratio is to its roofline.

For one geometry (``GEOMETRIES``: LLaVA-1.5 or LLaVA-NeXT anyres, each at 7B and scaled down for CPU), on one device,
with SDPA attention in both models:
- time to first token (TTFT) at batch 1 and 8, decode tokens/s at batch 1 and 16, end-to-end ``generate()`` of a
  typical answer at batch 1 (one ``generate()`` per measurement; a logits processor stamps every new token after a
  device synchronisation, so TTFT, decode steps and the total come from the same call);
- peak memory and KV-cache bytes per run; the per-request memory from batch 1 vs 16; the largest batch that fits a
  fixed memory budget (and, with ``--verify-largest-batch``, one run at that batch to check it fits);
- the pre-pass: the vision tower alone, stock's image features (vision + projector), RC's ``compress_inputs``
  (vision + compression + rebuild); the compression step = RC pre-pass - stock image features, also as a share of
  the vision tower and of RC's TTFT;
- variants: stock, RC at budgets 64, 128, 192 tokens per image and RC's dynamic count (LLaVA-1.5); for LLaVA-NeXT
  the same fractions of the image's 2880 non-newline tokens (320, 640, 960: 64/128/192 of 576 times 5 crops), RC's
  dynamic count and G-Prune at its default (keep_ratio 0.5 per graph);
- FLOPs of the prefill per variant (vision tower, projector, LM) and, for LLaVA-NeXT, G-Prune's reduction at
  LLaVA-1.6-7B geometry next to the paper's -63.57%.
Each measurement alternates the variants after a warm-up and reports medians; ratios are stock / RC from the same
run. The two ceilings (copy bandwidth, matmul FLOP/s in the benchmark dtype) are measured once per run and give
each scenario's roofline ratio (``benchmarks/roofline.py``); efficiency = measured ratio / roofline ratio.

    python benchmarks/latency.py --geometry cpu-small --update-readme            # CPU: ratios only
    python benchmarks/latency.py --geometry llava-1.5-7b --device cuda --dtype float16 --update-readme
    python benchmarks/latency.py --geometry cpu-next-small --repeats 3 --update-readme   # LLaVA-NeXT on CPU
    python benchmarks/latency.py --geometry llava-1.6-7b --device cuda --dtype float16
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import roofline  # benchmarks/roofline.py, beside this script
from bench_common import (  # benchmarks/bench_common.py
    RESULTS, measured_at, now, synchronize, timed, use_cpu_time, write_readme_section, write_result
)
import torch
import transformers
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.initialization import no_init_weights
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from llava_rc import LlavaNextRCConfig, LlavaNextRCForConditionalGeneration, LlavaRCConfig
from llava_rc import LlavaRCForConditionalGeneration, anyres_token_counts
from llava_rc.compression_registry import parse_compression

ROOT = Path(__file__).resolve().parents[1]

IMAGE_TOKEN_ID = 32000
PAD_TOKEN_ID = 32001


@dataclass(frozen=True)
class GeometrySpec:
    """A model geometry: HF config kwargs for the vision tower and the LM, and the run's defaults.

    family selects the model classes in ``MODEL_FAMILIES`` (``"llava"`` or ``"llava_next"``). LLaVA-NeXT geometries
    also give ``grid_pinpoints`` and the (height, width) of the benchmark's images (``image_hw``); every request
    then holds one such image (base view + grid crops). ``variants`` replaces the LLaVA-1.5 ``VARIANTS``.
    """

    description: str
    family: str
    vision: dict
    text: dict
    text_tokens: int = 64  # LLaVA-1.5 template + a short question around one image
    answer_tokens: int = 32  # "typical answer" for end-to-end generate at batch 1
    decode_tokens: int = 32  # new tokens of the batch-16 decode measurement
    memory_budget_gib: float | None = None  # None: weights + 0.5 GiB
    grid_pinpoints: list | None = None
    image_hw: tuple[int, int] | None = None
    variants: dict | None = None
    extra: dict = field(default_factory=dict)


CLIP_VIT_L_336 = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768,
}
LLAMA_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
}

CPU_SMALL_VISION = {
    "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
    "image_size": 336, "patch_size": 14, "projection_dim": 256,
}
CPU_SMALL_TEXT = {
    "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 8,
    "num_key_value_heads": 8, "vocab_size": 32064, "max_position_embeddings": 4096,
}

VARIANTS = {
    "stock": None,
    "rc-64": {"method": "rc", "budget": 64},
    "rc-128": {"method": "rc", "budget": 128},
    "rc-192": {"method": "rc", "budget": 192},
    "rc-dynamic": {"method": "rc"},
}
# LLaVA-NeXT: LLaVA-1.5's 64/128/192 of 576 tokens kept for each of the 5 crops' worth of tokens, i.e. 1/9, 2/9 and
# 3/9 of the 2880 non-newline tokens at 672 px (a budget counts no newline; the 48 newlines are kept on top).
NEXT_VARIANTS_7B = {
    "stock": None,
    "rc-320": {"method": "rc", "budget": 320},
    "rc-640": {"method": "rc", "budget": 640},
    "rc-960": {"method": "rc", "budget": 960},
    "rc-dynamic": {"method": "rc"},
    "gprune": {"method": "gprune"},  # its default: keep_ratio 0.5 per graph (base view, grid)
}
# The same fractions of the CPU geometry's 1280 non-newline tokens (320/640/960 x 1280/2880, rounded).
NEXT_VARIANTS_CPU = {
    "stock": None,
    "rc-142": {"method": "rc", "budget": 142},
    "rc-284": {"method": "rc", "budget": 284},
    "rc-427": {"method": "rc", "budget": 427},
    "rc-dynamic": {"method": "rc"},
    "gprune": {"method": "gprune"},
}
# The paper's figure for G-Prune on LLaVA-NeXT (arXiv 2501.02268, abstract): "reduce 63.57% FLOPs", whole-model FLOPs
# as the authors measured them (how they counted is not stated there).
GPRUNE_PAPER_FLOPS_REDUCTION = 0.6357

GEOMETRIES: dict[str, GeometrySpec] = {
    "llava-1.5-7b": GeometrySpec(
        description="LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 x 1024, 577 tokens) + Llama-7B shape (32 x 4096)",
        family="llava",
        vision=CLIP_VIT_L_336,
        text=LLAMA_7B,
        answer_tokens=64,
        decode_tokens=32,
        memory_budget_gib=40.0,
    ),
    "cpu-small": GeometrySpec(
        description="scaled-down LLaVA-1.5 for CPU ratios: CLIP 336/14 (4 x 256, 577 tokens) + Llama 6 x 512",
        family="llava",
        vision=CPU_SMALL_VISION,
        text=CPU_SMALL_TEXT,
        answer_tokens=32,
        decode_tokens=16,
    ),
    "llava-1.6-7b": GeometrySpec(
        description=(
            "LLaVA-1.6-7B (vicuna) at 672 x 672: CLIP ViT-L/14-336 on 5 crops (base + 2 x 2 grid) + Llama-7B shape; "
            "576 + 2304 + 48 newline = 2928 image tokens"
        ),
        family="llava_next",
        vision=CLIP_VIT_L_336,
        text=LLAMA_7B,
        answer_tokens=64,
        decode_tokens=32,
        memory_budget_gib=40.0,
        grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        image_hw=(672, 672),
        variants=NEXT_VARIANTS_7B,
    ),
    # LLaVA-NeXT scaled down for CPU: the cpu-small towers with 224 px crops (16 x 16 = 256 patches) and pinpoints
    # scaled from 336 to 224, so a 448 x 448 image has the 7B layout at 4/9 of the tokens: base view + 2 x 2 grid,
    # 5 crops, a newline per grid row (256 + 1024 + 32 = 1312 image tokens). At 336 px crops (2928 tokens) one
    # shared CPU thread needs about 2.5x longer (the batch-16 runs dominate), over 15 minutes per run.
    "cpu-next-small": GeometrySpec(
        description=(
            "scaled-down LLaVA-NeXT for CPU ratios: CLIP 224/14 (4 x 256) on 5 crops (base + 2 x 2 grid at 448 px) "
            "+ Llama 6 x 512; 256 + 1024 + 32 newline = 1312 image tokens"
        ),
        family="llava_next",
        vision={**CPU_SMALL_VISION, "image_size": 224},
        text=CPU_SMALL_TEXT,
        answer_tokens=32,
        decode_tokens=16,
        grid_pinpoints=[[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]],
        image_hw=(448, 448),
        variants=NEXT_VARIANTS_CPU,
    ),
}


def llava_classes():
    return LlavaConfig, LlavaForConditionalGeneration, LlavaRCConfig, LlavaRCForConditionalGeneration


def llava_next_classes():
    return LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextRCConfig, LlavaNextRCForConditionalGeneration


MODEL_FAMILIES = {"llava": llava_classes, "llava_next": llava_next_classes}


# ---- devices ----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block: CUDA allocator stats, or on CPU the process's resident high-water mark (VmHWM).

    On CPU the high-water mark is reset through /proc/self/clear_refs and glibc is told to serve every allocation
    over 64 KiB with mmap, so freed tensors leave the resident set and the mark follows live memory. That slows
    allocation down (page faults), so memory is measured in runs of its own, after all timed runs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD

    def _resident(self, key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._resident("VmRSS")

    def increase(self) -> int:
        """Bytes above what was allocated at ``start()``."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self._resident("VmHWM") - self.base


def measure_ceilings(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """Copy bandwidth (read + write bytes / s of a large device-to-device copy) and matmul FLOP/s in ``dtype``."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    buffers = [torch.empty(size, dtype=torch.uint8, device=device).fill_(1) for _ in range(2)]
    copy = median_seconds(lambda: buffers[1].copy_(buffers[0]), device, repeats)
    buffers.clear()
    side = 8192 if device.type == "cuda" else 2048
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    matmul = median_seconds(lambda: a @ b, device, repeats)
    return {
        "bytes_per_second": 2 * size / copy,
        "flops_per_second": 2 * side**3 / matmul,
        "copy_bytes": size,
        "matmul_side": side,
    }


def median_seconds(function, device: torch.device, repeats: int) -> float:
    function()  # warm-up
    return statistics.median(timed(function, device, repeats))


# ---- models and inputs ------------------------------------------------------------------------------------------
def config_kwargs(spec: GeometrySpec) -> dict:
    vision = {"model_type": "clip_vision_model", **spec.vision}
    text = {"model_type": "llama", "pad_token_id": PAD_TOKEN_ID, "bos_token_id": 1, "eos_token_id": 2, **spec.text}
    patches = (spec.vision["image_size"] // spec.vision["patch_size"]) ** 2
    kwargs = {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": IMAGE_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    if spec.family == "llava_next":
        kwargs["image_grid_pinpoints"] = spec.grid_pinpoints
    else:
        kwargs["image_seq_length"] = patches
    return kwargs


def image_token_counts(spec: GeometrySpec) -> tuple[int, int, int]:
    """(base view, high-resolution grid, newline) tokens of the benchmark's image; LLaVA-1.5: (N, 0, 0)."""
    side = spec.vision["image_size"] // spec.vision["patch_size"]
    if spec.family != "llava_next":
        return side * side, 0, 0
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=spec.vision["image_size"], patch_size=spec.vision["patch_size"]),
        image_grid_pinpoints=spec.grid_pinpoints,
    )
    base, grid, newlines = anyres_token_counts(config, [list(spec.image_hw)])[0].tolist()
    return base, grid, newlines


def crops_per_image(spec: GeometrySpec) -> int:
    """Vision-tower crops of the benchmark's image: 1 for LLaVA-1.5, base view + grid crops for LLaVA-NeXT."""
    if spec.family != "llava_next":
        return 1
    return image_size_to_num_patches(
        image_size=list(spec.image_hw), grid_pinpoints=spec.grid_pinpoints, patch_size=spec.vision["image_size"]
    )


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Fill every parameter in place: norms' weights 1, biases 0, the rest N(0, std). Fast on any device."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1 and "norm" in name and name.endswith("weight"):
            parameter.fill_(1.0)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.normal_(0.0, std, generator=generator)


def build_models(spec: GeometrySpec, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(stock, rc): RC built on the device with random weights; stock shares RC's very tensors (no copy)."""
    stock_config_class, stock_class, rc_config_class, rc_class = MODEL_FAMILIES[spec.family]()
    kwargs = config_kwargs(spec)
    with torch.device(device), no_init_weights():
        rc = rc_class._from_config(rc_config_class(**kwargs), dtype=dtype, attn_implementation="sdpa")
    random_init_(rc, seed)
    with torch.device("meta"):
        stock = stock_class._from_config(stock_config_class(**kwargs), dtype=dtype, attn_implementation="sdpa")
    stock.load_state_dict(rc.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies, position ids) are not in the state dict: share them too.
    rc_buffers = dict(rc.named_buffers())
    for name, _ in list(stock.named_buffers()):
        module_name, _, buffer_name = name.rpartition(".")
        stock.get_submodule(module_name).register_buffer(buffer_name, rc_buffers[name], persistent=False)
    for (name, stock_parameter), (_, rc_parameter) in zip(stock.named_parameters(), rc.named_parameters()):
        if stock_parameter.data_ptr() != rc_parameter.data_ptr():
            raise RuntimeError(f"stock and RC do not share {name}")
    for model in (stock, rc):
        model.eval()
        model.generation_config.pad_token_id = PAD_TOKEN_ID
        model.generation_config.eos_token_id = None  # every run generates exactly the requested tokens
        for config in (model.config.text_config, model.config.vision_config):
            if config._attn_implementation != "sdpa":
                raise RuntimeError(f"expected SDPA attention, got {config._attn_implementation!r}")
    return stock, rc


def make_inputs(spec: GeometrySpec, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """``batch`` prompts of ``text_tokens`` random text tokens around one image's placeholders, no padding.

    LLaVA-1.5: N placeholders and pixel_values (B, 3, S, S). LLaVA-NeXT: base + grid + newline placeholders,
    pixel_values (B, crops, 3, S, S) and image_sizes (B, 2), as the processor makes them.
    """
    generator = torch.Generator().manual_seed(seed)
    image_tokens = sum(image_token_counts(spec))
    before = spec.text_tokens // 2
    text = torch.randint(3, IMAGE_TOKEN_ID, (batch, spec.text_tokens), generator=generator)
    image = torch.full((batch, image_tokens), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)  # (B, T + image tokens)
    size = spec.vision["image_size"]
    crops = (crops_per_image(spec),) if spec.family == "llava_next" else ()
    pixel_values = torch.randn(batch, *crops, 3, size, size, generator=generator)
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device, dtype),
    }
    if spec.family == "llava_next":
        inputs["image_sizes"] = torch.tensor([list(spec.image_hw)] * batch, device=device)
    return inputs


# ---- one generate() ---------------------------------------------------------------------------------------------
class TokenClock(LogitsProcessor):
    """Stamps the time at which each new token's logits are ready (after a device synchronisation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(now())
        return scores


def kv_cache_bytes_of(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_generate(
    model, compression, inputs: dict, new_tokens: int, device: torch.device, memory: "PeakMemory | None" = None
) -> dict:
    """One ``generate()``: TTFT, mean decode step, total, KV-cache bytes, kept tokens; peak memory increase when
    ``memory`` is given (then the times are not representative on CPU)."""
    clock = TokenClock(device)
    kwargs = {} if compression is None else {"compression": compression}
    if memory is not None:
        memory.start()
    synchronize(device)
    start = now()
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        return_dict_in_generate=True,
        **kwargs,
    )
    synchronize(device)
    end = now()
    peak = memory.increase() if memory is not None else None
    if len(clock.stamps) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(clock.stamps)}")
    report = out.get("compression")
    kept = report.kept_counts.float() if report is not None else None
    return {
        "ttft": clock.stamps[0] - start,
        "decode_step": (clock.stamps[-1] - clock.stamps[0]) / (new_tokens - 1) if new_tokens > 1 else None,
        "total": end - start,
        "peak_increase": peak,
        "kv_cache_bytes": kv_cache_bytes_of(out.past_key_values),
        "kept_mean": float(kept.mean()) if kept is not None else None,
        "kept_max": float(kept.max()) if kept is not None else None,
    }


def alternate(functions: dict, repeats: int) -> dict[str, list]:
    """Warm up each function once, then run them in turn ``repeats`` times: drift hits them alike."""
    for function in functions.values():
        function()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(function())
    return samples


def median_of(samples: list[dict], key: str):
    values = [sample[key] for sample in samples if sample[key] is not None]
    return statistics.median(values) if values else None


# ---- the benchmark ----------------------------------------------------------------------------------------------
def roofline_shape(spec: GeometrySpec, dtype: torch.dtype) -> roofline.LlavaShape:
    vision, text = spec.vision, spec.text
    crop_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    return roofline.LlavaShape(
        vision=roofline.TransformerShape(
            layers=vision["num_hidden_layers"], hidden=vision["hidden_size"], heads=vision["num_attention_heads"],
            kv_heads=vision["num_attention_heads"], intermediate=vision["intermediate_size"], gated_mlp=False,
        ),
        image_tokens=crop_patches + 1,
        patches=sum(image_token_counts(spec)),  # the LM's image tokens, newlines included
        crops=crops_per_image(spec),
        text=roofline.TransformerShape(
            layers=text["num_hidden_layers"], hidden=text["hidden_size"], heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            intermediate=text["intermediate_size"], gated_mlp=True, vocab=text["vocab_size"],
        ),
        dtype_bytes=torch.finfo(dtype).bits // 8,
    )


def scenario_for(shape: roofline.LlavaShape, spec: GeometrySpec, kept: float | None, compression) -> roofline.Scenario:
    """The LM reads ``kept`` tokens per image (newlines included); the projector runs on every crop patch when the
    method works on projected tokens or scores with "llm" guidance, and (again) on the kept vision tokens when it
    compresses before the projector."""
    if compression is None:
        return roofline.Scenario(spec.text_tokens, shape.patches, shape.crop_patches)
    kept_tokens = round(kept)
    settings = parse_compression(compression)
    projected = shape.crop_patches if settings.stage == "projected" or settings.guidance_source == "llm" else 0
    if settings.stage == "vision":
        projected += kept_tokens - image_token_counts(spec)[2]  # newlines are not projected
    return roofline.Scenario(spec.text_tokens, kept_tokens, projected)


def flops_report(spec: GeometrySpec, shape: roofline.LlavaShape, scenarios: dict) -> dict:
    """Prefill FLOPs at batch 1 per variant by phase (``roofline.prefill_flops``) and the reduction vs stock of the
    LM prefill, of the whole prefill (vision + projector + LM) and of the LM by the FastV formula."""
    stock = roofline.prefill_flops(shape, scenarios["stock"])
    stock_fastv = roofline.fastv_lm_flops(shape.text, scenarios["stock"].prompt_tokens)
    report = {}
    for name, scenario in scenarios.items():
        flops = roofline.prefill_flops(shape, scenario)
        fastv = roofline.fastv_lm_flops(shape.text, scenario.prompt_tokens)
        report[name] = {
            **{f"{phase}_flops": value for phase, value in flops.items()},
            "prompt_tokens": scenario.prompt_tokens,
            "lm_reduction": 1 - flops["lm"] / stock["lm"],
            "total_reduction": 1 - flops["total"] / stock["total"],
            "fastv_lm_reduction": 1 - fastv / stock_fastv,
        }
    return report


def gprune_flops_anchor() -> dict:
    """G-Prune at its default (keep_ratio 0.5 per graph) at LLaVA-1.6-7B geometry (672 x 672, 64 text tokens),
    against the paper's -63.57%: our counts, and the kept image tokens each counting would need to reach it."""
    spec = GEOMETRIES["llava-1.6-7b"]
    shape = roofline_shape(spec, torch.float16)
    base, grid, newlines = image_token_counts(spec)
    side = spec.vision["image_size"] // spec.vision["patch_size"]
    views = ((side, side), (newlines, grid // newlines))
    kept = parse_compression({"method": "gprune"}).fixed_count(views) + newlines
    scenarios = {
        "stock": scenario_for(shape, spec, None, None),
        "gprune": scenario_for(shape, spec, kept, {"method": "gprune"}),
    }
    report = flops_report(spec, shape, scenarios)["gprune"]

    def tokens_for(key: str) -> int:
        """Smallest kept image-token count whose reduction by ``key`` is at most the paper's (bisection)."""
        low, high = 0, shape.patches
        while low < high:
            middle = (low + high) // 2
            trial = {**scenarios, "gprune": scenario_for(shape, spec, middle, {"method": "gprune"})}
            if flops_report(spec, shape, trial)["gprune"][key] > GPRUNE_PAPER_FLOPS_REDUCTION:
                low = middle + 1
            else:
                high = middle
        return low

    return {
        "geometry": "llava-1.6-7b",
        "kept_image_tokens": kept,
        "stock_image_tokens": shape.patches,
        "text_tokens": spec.text_tokens,
        "lm_reduction": report["lm_reduction"],
        "total_reduction": report["total_reduction"],
        "fastv_lm_reduction": report["fastv_lm_reduction"],
        "paper_reduction": GPRUNE_PAPER_FLOPS_REDUCTION,
        "kept_image_tokens_for_paper_reduction": {key: tokens_for(key) for key in
                                                  ("lm_reduction", "total_reduction", "fastv_lm_reduction")},
        "counts": (
            "lm: our roofline's LM prefill (2 FLOPs per multiply-add of every linear layer incl. the gated MLP, "
            "causal half-square attention, last-token LM head); total: + vision tower on 5 crops + projector; "
            "fastv_lm: 4nd^2 + 2n^2d + 2ndm per layer. The paper states a whole-model FLOPs reduction without its "
            "counting."
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Stock LLaVA vs LLaVA-RC: latency, memory and roofline ratios")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (CUDA default), bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=None, help="default: every variant of the geometry")
    parser.add_argument("--memory-budget-gib", type=float, default=None)
    parser.add_argument("--verify-largest-batch", action="store_true", help="run once at each largest batch")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="CPU threads (default 1 on CPU: on shared cores OpenMP barriers stall when one thread is descheduled)",
    )
    parser.add_argument("--sync-audit", action="store_true", help="CUDA: count host syncs per generate() by line")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/latency_<device>.json)")
    parser.add_argument(
        "--ttft-only", action="store_true",
        help="TTFT and the pre-pass only: batch 1 and 8 with one new token each; no decode, memory or largest batch",
    )
    parser.add_argument(
        "--prepass-batches", type=int, nargs="+", default=[1, 8],
        help="batches at which the pre-pass (vision tower, compression step) is timed; must include 1",
    )
    parser.add_argument(
        "--cpu-time", action="store_true",
        help="CPU: time with the process's CPU time, not wall time (one thread on a machine shared with other jobs)",
    )
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--readme-only", action="store_true", help="regenerate the README table from the JSON files")
    args = parser.parse_args()
    if args.readme_only:
        update_readme()
        return
    device = torch.device(args.device)
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    if args.cpu_time:
        if device.type != "cpu" or torch.get_num_threads() != 1:
            threads = torch.get_num_threads()
            raise SystemExit(f"--cpu-time needs --device cpu and one thread, got {device} with {threads} threads")
        use_cpu_time()
    geometry_name = args.geometry or ("llava-1.5-7b" if device.type == "cuda" else "cpu-small")
    spec = GEOMETRIES[geometry_name]
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    available = spec.variants or VARIANTS
    chosen = args.variants or list(available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise SystemExit(f"--variants {unknown} are not variants of {geometry_name}; expected some of {list(available)}")
    if "stock" not in chosen:
        raise SystemExit("--variants must include stock (every ratio is stock / RC)")
    variants = {name: available[name] for name in chosen}
    if 1 not in args.prepass_batches:
        raise SystemExit(f"--prepass-batches must include 1 (the step's share of TTFT), got {args.prepass_batches}")
    if args.ttft_only and (args.verify_largest_batch or args.update_readme):
        raise SystemExit("--ttft-only measures no memory or decode: drop --verify-largest-batch and --update-readme")

    load_at_start = os.getloadavg()  # (1, 5, 15 minutes): reported beside the results (a shared machine's load)
    ceilings_measured = measure_ceilings(device, dtype)
    ceilings = roofline.Ceilings(ceilings_measured["flops_per_second"], ceilings_measured["bytes_per_second"])
    log(f"ceilings: {ceilings_measured}")
    stock, rc = build_models(spec, device, dtype)
    models = {name: (stock if compression is None else rc) for name, compression in variants.items()}
    weight_bytes = sum(parameter.nbytes for parameter in rc.parameters()) + sum(b.nbytes for b in rc.buffers())

    # 1. generate(): (batch, new tokens) -> what it measures.
    runs = {
        "batch1": (1, spec.answer_tokens),  # TTFT, decode and end-to-end at batch 1
        "batch8": (8, 1),  # TTFT at batch 8
        "batch16": (16, spec.decode_tokens),  # decode at batch 16, and per-request memory
    }
    if args.ttft_only:
        runs = {"batch1": (1, 1), "batch8": (8, 1)}
    generate_samples = {}
    with torch.no_grad():
        for run_name, (batch, new_tokens) in runs.items():
            inputs = make_inputs(spec, batch, device, dtype, seed=batch)
            functions = {
                name: partial(run_generate, models[name], compression, inputs, new_tokens, device)
                for name, compression in variants.items()
            }
            generate_samples[run_name] = alternate(functions, args.repeats)
            log(f"{run_name}: " + ", ".join(
                f"{name} ttft {median_of(s, 'ttft') * 1e3:.1f} ms" for name, s in generate_samples[run_name].items()
            ))

        # 2. The pre-pass: vision tower, stock image features, RC compress_inputs per variant.
        prepass = {}
        for batch in args.prepass_batches:
            inputs = make_inputs(spec, batch, device, dtype, seed=batch)
            pixel_values = inputs["pixel_values"]
            image_sizes = inputs.get("image_sizes")
            size_args = () if image_sizes is None else (image_sizes,)
            functions = {
                # Every crop through the tower (LLaVA-NeXT: (B, crops, 3, S, S) -> (B * crops, 3, S, S)).
                "vision": lambda pv=pixel_values.flatten(0, -4): rc.model.vision_tower(pv, output_hidden_states=True),
                "stock_features": lambda pv=pixel_values: stock.model.get_image_features(
                    pv, *size_args, vision_feature_layer=-2, vision_feature_select_strategy="default"
                ),
            }
            for name, compression in variants.items():
                if compression is not None:
                    settings = rc.compression_settings(compression)
                    functions[name] = lambda s=settings, i=inputs: rc.compress_inputs(
                        i["input_ids"], i["pixel_values"], attention_mask=i["attention_mask"], settings=s,
                        pad_left=True, image_sizes=i.get("image_sizes"),
                    )
            timed = {name: (lambda f=function: timed_call(f, device)) for name, function in functions.items()}
            samples = alternate(timed, args.repeats)
            prepass[f"batch{batch}"] = {name: statistics.median(values) for name, values in samples.items()}
            log(f"prepass batch {batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in prepass[f"batch{batch}"].items()))

        # 3. Memory, in runs of its own: peak at batch 1 and 16 (same new tokens), then the largest batch.
        memory = PeakMemory(device)
        memory_samples = {}
        for batch in () if args.ttft_only else (1, 16):
            inputs = make_inputs(spec, batch, device, dtype, seed=batch)
            memory_samples[batch] = {
                name: run_generate(models[name], compression, inputs, spec.decode_tokens, device, memory)
                for name, compression in variants.items()
            }
    budget = (args.memory_budget_gib or spec.memory_budget_gib or 0) * 2**30 or weight_bytes + 0.5 * 2**30
    shape = roofline_shape(spec, dtype)
    results = build_results(
        spec, shape, variants, generate_samples, memory_samples, prepass, runs, ceilings, weight_bytes, budget
    )
    if args.verify_largest_batch:
        with torch.no_grad():
            for name, compression in variants.items():
                row = results["memory"][name]
                batch = row["largest_batch"]
                inputs = make_inputs(spec, batch, device, dtype, seed=batch)
                sample = run_generate(models[name], compression, inputs, spec.decode_tokens, device, memory)
                row["verified_peak_bytes"] = weight_bytes + sample["peak_increase"]
                row["verified_fits"] = row["verified_peak_bytes"] <= budget
                log(f"largest batch {name}: {batch}, peak {row['verified_peak_bytes'] / 2**30:.2f} GiB "
                    f"of {budget / 2**30:.2f} GiB")

    if args.sync_audit and device.type == "cuda":
        results["sync_audit"] = sync_audit(models, variants, make_inputs(spec, 2, device, dtype, seed=2), device)
        log(f"sync audit: {json.dumps(results['sync_audit'], indent=1)}")

    result = {
        "benchmark": "latency",
        "geometry": geometry_name,
        "geometry_description": spec.description,
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attention": "sdpa",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "settings": {
            "repeats": args.repeats,
            "warmup": 1,
            "text_tokens": spec.text_tokens,
            "runs": {name: {"batch": batch, "new_tokens": new_tokens} for name, (batch, new_tokens) in runs.items()},
            "memory_budget_bytes": budget,
            "weights": "random (N(0, 0.02), norms 1); stock shares RC's tensors",
            "variants": variants,
            "command": " ".join(sys.argv),
            "clock": "process CPU time" if args.cpu_time else "wall time",
        },
        "ceilings": ceilings_measured,
        **results,
    }
    prefix = "latency_next" if spec.family == "llava_next" else "latency"
    out_path = Path(args.output) if args.output else ROOT / "benchmarks" / "results" / f"{prefix}_{device.type}.json"
    result = write_result(out_path, result)
    log(f"wrote {out_path}")
    print(json.dumps(result["summary"], indent=2))
    if args.update_readme:
        update_readme()


def sync_audit(models: dict, variants: dict, inputs: dict, device: torch.device) -> dict:
    """Host synchronisations of one 4-token ``generate()`` per variant, by calling line (CUDA sync debug mode)."""
    audit = {}
    for name, compression in variants.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_generate(models[name], compression, inputs, 4, device)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        lines = Counter(
            f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
        )
        audit[name] = {"total": sum(lines.values()), "by_line": dict(lines.most_common())}
    return audit


def timed_call(function, device: torch.device) -> float:
    return timed(function, device, 1)[0]


def build_results(
    spec, shape, variants, generate_samples, memory_samples, prepass, runs, ceilings, weight_bytes, budget
) -> dict:
    """Medians, measured ratios, roofline ratios and efficiencies of every scenario and variant."""
    medians = {
        run: {name: {key: median_of(samples, key) for key in samples[0]} for name, samples in by_variant.items()}
        for run, by_variant in generate_samples.items()
    }
    kept = {
        name: medians["batch1"][name]["kept_mean"] if compression is not None else None
        for name, compression in variants.items()
    }
    scenarios = {name: scenario_for(shape, spec, kept[name], variants[name]) for name in variants}
    flops = flops_report(spec, shape, scenarios)
    batch1_new = runs["batch1"][1]

    def roof_ttft(name, batch):
        return roofline.ttft_seconds(shape, scenarios[name], batch, ceilings)

    def roof_decode(name, batch, new_tokens):
        return roofline.decode_tokens_per_second(shape, scenarios[name], batch, new_tokens, ceilings)

    def roof_generate(name, batch, new_tokens):
        return roofline.generate_seconds(shape, scenarios[name], batch, new_tokens, ceilings)

    # Per-request memory: the slope of peak memory between batch 1 and batch 16 (same prompts and new tokens).
    memory = {}
    for name in variants if memory_samples else ():  # none with --ttft-only
        peak1 = memory_samples[1][name]["peak_increase"]
        peak16 = memory_samples[16][name]["peak_increase"]
        per_sample = max((peak16 - peak1) / 15, 1.0)
        fixed = weight_bytes + peak1 - per_sample
        model_per_sample = roofline.sample_bytes(shape, scenarios[name], spec.decode_tokens)
        memory[name] = {
            "peak_bytes_batch1": weight_bytes + peak1,
            "peak_bytes_batch16": weight_bytes + peak16,
            "kv_cache_bytes_batch16": memory_samples[16][name]["kv_cache_bytes"],
            "kv_cache_bytes_batch16_model": roofline.kv_cache_bytes(
                shape.text, scenarios[name].prompt_tokens + spec.decode_tokens - 1, 16, shape.dtype_bytes
            ),
            "per_sample_bytes": per_sample,
            "per_sample_bytes_model": model_per_sample,
            "fixed_bytes": fixed,
            "largest_batch": roofline.largest_batch(budget, fixed, per_sample),
            "largest_batch_model": roofline.largest_batch(budget, weight_bytes, model_per_sample),
        }

    rows = []
    for name in variants:
        if variants[name] is None:
            continue
        stock, ours = medians, name

        def row(scenario, measured_stock, measured_ours, roof_stock, roof_ours, higher_is_better=False, name=name):
            measured = measured_ours / measured_stock if higher_is_better else measured_stock / measured_ours
            roof = roof_ours / roof_stock if higher_is_better else roof_stock / roof_ours
            rows.append({
                "variant": name, "scenario": scenario, "stock": measured_stock, "rc": measured_ours,
                "ratio": measured, "roofline_ratio": roof, "efficiency": measured / roof,
            })

        for batch_run, batch in (("batch1", 1), ("batch8", 8)):
            row(f"ttft_batch{batch}", stock[batch_run]["stock"]["ttft"], stock[batch_run][ours]["ttft"],
                roof_ttft("stock", batch), roof_ttft(name, batch))
        if "batch16" not in runs:  # --ttft-only: no decode, memory or largest batch
            continue
        for batch_run, batch, new_tokens in (("batch1", 1, batch1_new), ("batch16", 16, runs["batch16"][1])):
            row(f"decode_tokens_per_second_batch{batch}",
                batch / stock[batch_run]["stock"]["decode_step"], batch / stock[batch_run][ours]["decode_step"],
                roof_decode("stock", batch, new_tokens), roof_decode(name, batch, new_tokens), higher_is_better=True)
        row(f"generate_batch1_{batch1_new}_tokens", stock["batch1"]["stock"]["total"], stock["batch1"][ours]["total"],
            roof_generate("stock", 1, batch1_new), roof_generate(name, 1, batch1_new))
        model_ratio = memory["stock"]["per_sample_bytes_model"] / memory[name]["per_sample_bytes_model"]
        rows.append({
            "variant": name, "scenario": "largest_batch", "stock": memory["stock"]["largest_batch"],
            "rc": memory[name]["largest_batch"],
            "ratio": memory[name]["largest_batch"] / max(memory["stock"]["largest_batch"], 1),
            "roofline_ratio": model_ratio,
            "efficiency": memory[name]["largest_batch"] / max(memory["stock"]["largest_batch"], 1) / model_ratio,
        })

    steps = {}
    for batch_key, by_stage in prepass.items():
        for name in variants:
            if variants[name] is None:
                continue
            step = by_stage[name] - by_stage["stock_features"]
            ttft = medians[batch_key][name]["ttft"] if batch_key in medians else None  # no TTFT run at batch 16
            steps.setdefault(name, {})[batch_key] = {
                "vision_seconds": by_stage["vision"],
                "stock_image_features_seconds": by_stage["stock_features"],
                "rc_prepass_seconds": by_stage[name],
                "compression_step_seconds": step,
                "share_of_vision": step / by_stage["vision"],
                "share_of_ttft": step / ttft if ttft is not None else None,
            }

    summary = {
        name: {
            "kept_tokens_mean": kept[name],
            **{r["scenario"]: {k: round(r[k], 3) for k in ("ratio", "roofline_ratio", "efficiency")}
               for r in rows if r["variant"] == name},
            "compression_step_share_of_vision_batch1": round(steps[name]["batch1"]["share_of_vision"], 3),
            "compression_step_share_of_ttft_batch1": round(steps[name]["batch1"]["share_of_ttft"], 3),
        }
        for name in variants if variants[name] is not None
    }
    return {
        "medians": medians,
        "kept_tokens": {name: kept[name] for name in variants},
        "rows": rows,
        "memory": memory,
        "compression_step": steps,
        "roofline": {
            name: {
                "ttft_batch1_seconds": roof_ttft(name, 1),
                "ttft_batch8_seconds": roof_ttft(name, 8),
                "ttft_batch1_lm_bound": roofline.prefill_cost(shape, scenarios[name].prompt_tokens, 1).bound(ceilings),
                "ttft_batch8_lm_bound": roofline.prefill_cost(shape, scenarios[name].prompt_tokens, 8).bound(ceilings),
                "prompt_tokens": scenarios[name].prompt_tokens,
            }
            for name in variants
        },
        "summary": summary,
        "flops": flops,
        **({"gprune_flops_anchor": gprune_flops_anchor()} if spec.family == "llava_next" else {}),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, threads: {torch.get_num_threads()})"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- README ------------------------------------------------------------------------------------------------------
SCENARIO_LABELS = {
    "ttft_batch1": "TTFT, batch 1",
    "ttft_batch8": "TTFT, batch 8",
    "decode_tokens_per_second_batch1": "decode tokens/s, batch 1",
    "decode_tokens_per_second_batch16": "decode tokens/s, batch 16",
    "largest_batch": "largest batch in the memory budget",
}


def readme_table(result: dict) -> list[str]:
    variants = [name for name, compression in result["settings"]["variants"].items() if compression is not None]
    kept = result["kept_tokens"]
    generate_scenario = next(r["scenario"] for r in result["rows"] if r["scenario"].startswith("generate_"))
    labels = dict(SCENARIO_LABELS)
    labels[generate_scenario] = f"generate {generate_scenario.split('_')[2]} tokens, batch 1"
    budget_gib = result["settings"]["memory_budget_bytes"] / 2**30
    lines = [
        (
            f"{result['geometry_description']}; {result['device']}, {result['dtype']}, SDPA, torch {result['torch']}, "
            f"transformers {result['transformers']}. Ceilings measured in the run: "
            f"{result['ceilings']['flops_per_second'] / 1e12:.2f} TFLOP/s matmul, "
            f"{result['ceilings']['bytes_per_second'] / 1e9:.1f} GB/s copy; memory budget {budget_gib:.1f} GiB "
            f"(`benchmarks/results/latency_*.json`). Each cell: measured ratio stock / RC, roofline ratio, efficiency. "
            + measured_at(result)
        ),
        "",
        "| scenario | " + " | ".join(
            f"{name} ({kept[name]:.0f} tokens)" if name == "rc-dynamic" else name for name in variants
        ) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for scenario, label in labels.items():
        cells = []
        for name in variants:
            row = next(r for r in result["rows"] if r["variant"] == name and r["scenario"] == scenario)
            cells.append(f"{row['ratio']:.2f}x / {row['roofline_ratio']:.2f}x ({row['efficiency']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (("share_of_vision", "compression step / vision tower"), ("share_of_ttft", "compression step / TTFT")):
        cells = [
            " / ".join(f"{result['compression_step'][name][b][key]:.1%}" for b in ("batch1", "batch8"))
            for name in variants
        ]
        lines.append(f"| {label} (batch 1 / 8) | " + " | ".join(cells) + " |")
    if "flops" in result:
        cells = [
            f"-{result['flops'][name]['lm_reduction']:.1%} / -{result['flops'][name]['total_reduction']:.1%}"
            for name in variants
        ]
        lines.append("| prefill FLOPs, batch 1: LM / vision + projector + LM | " + " | ".join(cells) + " |")
    anchor = result.get("gprune_flops_anchor")
    if anchor is not None:
        needed = anchor["kept_image_tokens_for_paper_reduction"]
        lines += [
            "",
            (
                f"G-Prune at its default (keep_ratio 0.5 per graph) at LLaVA-1.6-7B geometry (672 x 672, "
                f"{anchor['text_tokens']} text tokens) keeps {anchor['kept_image_tokens']} of "
                f"{anchor['stock_image_tokens']} image tokens (newlines included): LM prefill FLOPs "
                f"-{anchor['lm_reduction']:.1%}, vision + projector + LM -{anchor['total_reduction']:.1%}, FastV's LM "
                f"formula -{anchor['fastv_lm_reduction']:.1%}. The paper reports -{anchor['paper_reduction']:.2%} "
                f"FLOPs for LLaVA-NeXT (whole model, counting not stated); our counts reach it at "
                f"{needed['lm_reduction']} (LM), {needed['total_reduction']} (whole prefill) or "
                f"{needed['fastv_lm_reduction']} (FastV formula) kept image tokens."
            ),
        ]
    return lines


def committed_sections() -> dict[str, list[str]]:
    """The docs tables made from every full ``latency_*.json`` result (``--ttft-only`` runs have no decode or memory
    rows and are skipped; OneVision's results are latency_onevision.py's)."""
    lines = []
    for path in sorted(RESULTS.glob("latency_*.json")):
        result = json.loads(path.read_text())
        if result.get("benchmark") != "latency" or "batch16" not in result["settings"]["runs"]:
            continue
        lines += (readme_table(result) if "provenance" in result else withdrawn(path.name, result)) + [""]
    return {"latency": lines}


def withdrawn(name: str, result: dict) -> list[str]:
    """What a table shows for a result written before provenance was recorded: it describes older code, so its
    figures are not shown."""
    return [
        f"`benchmarks/results/{name}` ({result.get('geometry', 'LLaVA-1.5 geometry')}) was measured before provenance "
        "was recorded, with older code: its figures are withdrawn until `python benchmarks/regenerate.py` measures it "
        "again."
    ]


def update_readme() -> None:
    """Regenerate the docs tables between the latency markers from the JSON results."""
    for marker, lines in committed_sections().items():
        write_readme_section(marker, lines)


if __name__ == "__main__":
    main()
