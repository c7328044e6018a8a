"""How many operators the compression step dispatches per method at batch 1 (torch profiler, CPU).

On a GPU at batch 1 the step is launch-bound: each operator is at least one kernel launch (about 5-10 us), so the
count sets its floor. Two counts per method, top-level aten operators only (an operator called inside another,
e.g. the kernels of ``topk``, is not counted again; nor are views and ``to()`` calls that copy nothing):
- ``method``: the pure method function (``compression_registry.METHODS``) on ``CompressionInputs`` of the model's
  shapes;
- ``step``: RC's ``compress_inputs`` (vision tower, signals, method, projector, rebuild) minus stock LLaVA's image
  features (vision tower + projector) on the same batch: what compression adds to the pre-pass.
The counts do not depend on the widths, only on the code path and the views, so the scaled CPU geometries of
``latency.py`` stand for 7B.

    python benchmarks/step_ops.py                     # LLaVA-1.5 (cpu-small) and LLaVA-NeXT (cpu-next-small)
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import latency  # benchmarks/latency.py, beside this script
from bench_common import write_result  # benchmarks/bench_common.py
from llava_rc.compression_common import CompressionInputs, cls_attention
from llava_rc.compression_registry import method_function

ROOT = Path(__file__).resolve().parents[1]

# Budgets of LLaVA-1.5's 576 patches (64 tokens); for LLaVA-NeXT the latency benchmark's 142 of 1280.
METHODS_15 = {
    "random": {"method": "random", "budget": 64},
    "cls_attention": {"method": "cls_attention", "budget": 64},
    "prumerge": {"method": "prumerge", "budget": 64},
    "prumerge_plus": {"method": "prumerge_plus", "budget": 64},
    "gprune": {"method": "gprune"},
    "trsm": {"method": "trsm", "budget": 64},
    "rc-64": {"method": "rc", "budget": 64},
    "rc-dynamic": {"method": "rc"},
}
METHODS_NEXT = {
    "gprune": {"method": "gprune"},
    "rc-142": {"method": "rc", "budget": 142},
    "rc-dynamic": {"method": "rc"},
}


# Operators that only make a new view or alias of a tensor: no kernel on any device.
METADATA_OPERATORS = {
    "aten::view", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::expand", "aten::expand_as",
    "aten::slice", "aten::select", "aten::transpose", "aten::view_as", "aten::detach", "aten::detach_",
    "aten::lift_fresh", "aten::resolve_neg", "aten::resolve_conj", "aten::unbind", "aten::alias", "aten::permute",
    "aten::t", "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::as_strided", "aten::_unsafe_view",
    "aten::unfold",
}


def top_level_operators(function) -> dict[str, int]:
    """Top-level aten operators of one call of ``function`` that do work, by name (after one warm-up call).

    Views (``METADATA_OPERATORS``), ``to``/``reshape``/``contiguous`` calls that return their input, and ops called
    inside another op are not counted.
    """
    function()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    counts: dict[str, int] = {}
    for event in profiler.events():
        if not event.name.startswith("aten::") or event.name in METADATA_OPERATORS:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is not None:
            continue
        if event.name in ("aten::to", "aten::reshape", "aten::contiguous") and not any(
            child.name not in METADATA_OPERATORS for child in event.cpu_children
        ):
            continue  # returned its input (or a view of it)
        counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def method_inputs(rc, batch: dict, settings) -> CompressionInputs:
    """The method's inputs at the model's shapes for a single-view batch, built as the model builds them."""
    feature_layer = rc.config.vision_feature_layer
    hidden_states = rc.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    features = hidden_states[feature_layer][:, 1:]  # (I, N, C)
    signals = {}
    if settings.needs_attention:
        query, keys, num_heads = rc._attention_inputs(hidden_states, feature_layer, settings)
        crops = CompressionInputs(features=features, cls_query=query, attention_keys=keys, num_heads=num_heads)
        signals = {
            "attention_per_head": cls_attention(crops, per_head=True),
            "attention_joint": cls_attention(crops, per_head=False),
            "keys": keys[:, 1:],
            "num_heads": num_heads,
        }
    projected = rc.model.multi_modal_projector(features)
    side = int(features.shape[1] ** 0.5)
    text = torch.nn.functional.cosine_similarity(projected.float(), projected.float().mean(1, keepdim=True), dim=-1)
    return CompressionInputs(
        features=projected if settings.stage == "projected" else features,
        text_scores=text,
        guidance_dim=projected.shape[-1],
        has_text=torch.ones(features.shape[0], dtype=torch.bool),
        grid=(side, side),
        **signals,
    )


def count(geometry: str, methods: dict) -> dict:
    spec = latency.GEOMETRIES[geometry]
    device, dtype = torch.device("cpu"), torch.float32
    stock, rc = latency.build_models(spec, device, dtype)
    batch = latency.make_inputs(spec, 1, device, dtype, seed=1)
    size_args = () if batch.get("image_sizes") is None else (batch["image_sizes"],)
    with torch.no_grad():
        stock_ops = top_level_operators(lambda: stock.model.get_image_features(
            batch["pixel_values"], *size_args, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ))
        rows = {}
        for name, compression in methods.items():
            settings = rc.compression_settings(compression)
            prepass = top_level_operators(lambda s=settings: rc.compress_inputs(
                batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"], settings=s,
                pad_left=True, image_sizes=batch.get("image_sizes"),
            ))
            row = {"prepass": sum(prepass.values()), "stock_image_features": sum(stock_ops.values())}
            row["step"] = row["prepass"] - row["stock_image_features"]
            if spec.family == "llava":
                inputs = method_inputs(rc, batch, settings)
                method_ops = top_level_operators(lambda s=settings, i=inputs: method_function(s)(i, s))
                row["method"] = sum(method_ops.values())
                row["method_by_operator"] = dict(sorted(method_ops.items(), key=lambda item: -item[1]))
            step_by_operator = {op: prepass.get(op, 0) - stock_ops.get(op, 0) for op in set(prepass) | set(stock_ops)}
            nonzero = ((op, count) for op, count in step_by_operator.items() if count)
            row["step_by_operator"] = dict(sorted(nonzero, key=lambda item: -item[1]))
            rows[name] = row
            latency.log(f"{geometry} {name}: method {row.get('method', '-')}, step {row['step']}")
    return {"description": spec.description, "methods": methods, "counts": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description="Operators the compression step dispatches per method, batch 1")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "step_ops_cpu.json"))
    parser.add_argument("--geometries", nargs="+", default=["cpu-small", "cpu-next-small"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    tables = {"cpu-small": METHODS_15, "cpu-next-small": METHODS_NEXT}
    result = {
        "benchmark": "step_ops",
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "counted": "top-level aten operators of one call at batch 1 (torch.profiler, CPU), after a warm-up call",
        "command": " ".join(sys.argv),
        "geometries": {name: count(name, tables.get(name, METHODS_15)) for name in args.geometries},
    }
    path = Path(args.output)
    write_result(path, result)
    latency.log(f"wrote {path}")


if __name__ == "__main__":
    main()
