"""The cost of the RC step against the vision tower, and against the released code's cost structure.

At LLaVA-1.5 geometry (CLIP ViT-L/14-336: 24 layers, 1024 wide, 577 tokens; random weights, timing needs none):
- ``vision``: the vision tower forward (hidden states kept), as LLaVA runs it;
- ``rc_step``: everything our RC adds after it: [CLS] q/k recomputed from the stored hidden states, the text
  scores ("llm" guidance: projector + cosine), ``compress_rc`` (torch LOF, vectorised merge) and ``apply_plan``;
- ``released``: the released code's structure re-created: a second vision forward (for the CLIP projection),
  sklearn LOF on the CPU for each stage, and a Python loop over centres with a top-k per centre.
Runs alternate, after a warm-up; medians are reported, and ratios come from the same run. Writes JSON (versions,
hardware, settings) to ``benchmarks/results/`` and, with ``--update-readme``, the README table between markers.

    OMP_NUM_THREADS=1 python benchmarks/rc_step.py --batch-sizes 1 4 --repeats 3 --update-readme

``--scaling LABEL`` instead measures how ``compress_rc`` + ``apply_plan`` grow with the patch count N (one image of
N patches, as RC runs on a LLaVA-NeXT image's crops together) at ViT-L/14-336 width (C = A = 1024, 16 heads): time
(median), peak memory allocated by torch during one call (torch profiler memory events), the number of operators
dispatched, and the share of the vision tower over the same tokens (N / 576 crops per image; the tower is timed on
one crop and scaled by the crop count, which is exact up to noise: crops are independent forwards). Each label's
rows are stored in ``benchmarks/results/rc_step_scaling_cpu.json`` beside the other labels measured on the same
sources (e.g. "adaptive" and "budget320"); comparisons across code versions ("before" / "after", one machine) are
kept in ``benchmarks/results/history/``:

    OMP_NUM_THREADS=1 python benchmarks/rc_step.py --scaling after --batch-sizes 1 8 --sizes 576 1152 2880 5760

``--budget 320 0.1`` adds fixed budgets (an int count or a float ratio of N); ``--with-previous`` also times the
implementation before issue 28 (dense (I, K, N) plans, ``tests/reference_step.py``) in the same run.
"""

import argparse
import itertools
import os
import time
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel

import bench_common
from bench_common import (  # benchmarks/bench_common.py
    HISTORY, RESULTS, measured_at, provenance, timed, use_cpu_time, write_readme_section, write_result
)
from llava_rc.compression_common import CompressionInputs, apply_plan, cls_attention
from llava_rc.compression_rc import RCConfig, compress_rc

ROOT = Path(__file__).resolve().parents[1]
FEATURE_LAYER = -2
TEXT_WIDTH = 4096  # the 7B language model's width: the projector's output


def clip_vit_l_336() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )


def rc_step(tower, projector, hidden_states, question, settings: RCConfig):
    """Our RC step after the vision forward; returns the compressed (pre-projector) tokens."""
    layer = tower.encoder.layers[FEATURE_LAYER % (len(tower.encoder.layers) + 1)]
    features = hidden_states[FEATURE_LAYER][:, 1:]  # (I, N, C)
    normed = layer.layer_norm1(hidden_states[FEATURE_LAYER])  # (I, 1 + N, C)
    projected = projector(features)  # (I, N, D)
    scores = torch.nn.functional.cosine_similarity(projected.float(), question.unsqueeze(1), dim=-1)  # (I, N)
    side = int(features.shape[1] ** 0.5)
    inputs = CompressionInputs(
        features=features,
        cls_query=layer.self_attn.q_proj(normed[:, 0]),
        attention_keys=layer.self_attn.k_proj(normed),
        num_heads=layer.self_attn.num_heads,
        text_scores=scores,
        guidance_dim=projected.shape[-1],
        has_text=torch.ones(features.shape[0], dtype=torch.bool, device=features.device),
        grid=(side, side),
    )
    return apply_plan(features, compress_rc(inputs, settings))


def have_sklearn() -> bool:
    """The released structure runs sklearn's LOF; the ``bench`` extra (and the GPU machine) may not have it."""
    try:
        import sklearn.neighbors  # noqa: F401
    except ImportError:
        return False
    return True


def sklearn_ratio(values: np.ndarray, neighbors: int) -> float:
    from sklearn.neighbors import LocalOutlierFactor

    if len(values) < 2:
        return 0.0
    lof = LocalOutlierFactor(n_neighbors=min(neighbors, len(values) - 1), contamination="auto")
    return float((lof.fit_predict(values.reshape(-1, 1)) == -1).mean())


def released_structure(tower, pixel_values, hidden_states, question, settings: RCConfig):
    """The released code's costs: a second vision forward, CPU sklearn LOF per stage, a loop over centres."""
    second = tower(pixel_values, output_hidden_states=True)  # the second encoder pass of the released code
    final_patches = second.last_hidden_state[:, 1:]
    layer = tower.encoder.layers[-1]
    outputs = []
    for image in range(pixel_values.shape[0]):  # batch size 1 only in the released code: loop over images
        normed = layer.layer_norm1(hidden_states[FEATURE_LAYER][image : image + 1])
        inputs = CompressionInputs(
            features=normed,
            cls_query=layer.self_attn.q_proj(normed[:, 0]),
            attention_keys=layer.self_attn.k_proj(normed),
            num_heads=layer.self_attn.num_heads,
        )
        attention = cls_attention(inputs, per_head=False)[0]
        keys = inputs.patch_keys[0]
        features = hidden_states[FEATURE_LAYER][image, 1:]
        num_patches = attention.shape[0]
        attention_host = attention.cpu().numpy()
        n_visual = int(num_patches * sklearn_ratio(attention_host, settings.lof_neighbors_visual))
        kept = np.argsort(-attention_host)[:n_visual]
        # Stand-in for CLIP text embedding vs visual projection: same cost order (one cosine per patch).
        clip_question = question[image, : final_patches.shape[-1]].to(final_patches.dtype)
        scores = torch.nn.functional.cosine_similarity(final_patches[image], clip_question.unsqueeze(0), dim=-1)
        scores_host = scores.cpu().numpy().copy()
        scores_host[kept] = scores_host.min()
        n_text = int((num_patches - n_visual) * sklearn_ratio(scores_host, settings.lof_neighbors_text))
        recovered = np.argsort(-scores_host)[:n_text]
        remaining = np.setdiff1d(np.arange(num_patches), np.concatenate([kept, recovered]))
        n_centres = int(len(remaining) * sklearn_ratio(attention_host[remaining], settings.lof_neighbors_merge))
        centres = remaining[np.argsort(-attention_host[remaining])[:n_centres]]
        others = np.setdiff1d(remaining, centres)
        merged = []
        for centre in centres:  # one top-k per centre, as released
            similarity = torch.nn.functional.cosine_similarity(keys[centre].unsqueeze(0), keys[others], dim=-1)
            picked = torch.topk(
                similarity + settings.text_weight * scores[others], min(settings.merge_neighbors, len(others))
            ).indices
            members = torch.as_tensor(others)[picked]
            merged.append(features[centre] + (attention[members].unsqueeze(-1) * features[members]).sum(0))
        outputs.append(torch.stack([features[i] for i in np.sort(np.concatenate([kept, recovered]))] + merged))
    return outputs


def scaling_inputs(batch_size: int, num_patches: int, seed: int = 0) -> CompressionInputs:
    """Random inputs at ViT-L/14-336 width whose [CLS] attention has a few standout patches, as CLIP's does."""
    generator = torch.Generator().manual_seed(seed)
    width, num_heads = 1024, 16
    keys = torch.randn(batch_size, 1 + num_patches, width, generator=generator)
    query = torch.randn(batch_size, width, generator=generator)
    for image in range(batch_size):
        standouts = torch.randperm(num_patches, generator=generator)[: max(2, num_patches // 50)]
        keys[image, 1 + standouts] += 0.2 * (1.0 + image % 3) * query[image]
    return CompressionInputs(
        features=torch.randn(batch_size, num_patches, width, generator=generator),
        cls_query=query,
        attention_keys=keys,
        num_heads=num_heads,
        text_scores=torch.rand(batch_size, num_patches, generator=generator) * 0.6 - 0.1,
        guidance_dim=TEXT_WIDTH,
        has_text=torch.ones(batch_size, dtype=torch.bool),
    )


def profiled_call(function) -> tuple[int, int]:
    """(peak bytes torch allocated above the start during one call of ``function``, operators dispatched)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    events = profiler.events()
    # Each operator's own net allocation at its start, frees outside operators as "[memory]" events: the running
    # sum is the allocated total (an operator's internal workspace, freed before it returns, is not seen).
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in events)
    allocated = peak = 0
    for _, change in changes:
        allocated += change
        peak = max(peak, allocated)
    operators = sum(1 for event in events if event.name.startswith("aten::") and event.cpu_parent is None)
    return peak, operators


def scaling(args) -> None:
    """Time, peak memory and operator count of the RC step against N; appends a labelled run to the JSON."""
    torch.manual_seed(0)
    tower = CLIPVisionModel(clip_vit_l_336()).eval()
    pixel_values = torch.randn(1, 3, 336, 336)
    device = torch.device("cpu")
    with torch.no_grad():
        tower(pixel_values, output_hidden_states=True)  # warm-up
        crop_seconds = statistics.median(
            timed(lambda: tower(pixel_values, output_hidden_states=True), device, args.tower_repeats)
        )
    settings = {"adaptive": RCConfig()}
    for budget in args.budget or []:
        settings[f"budget {budget}"] = RCConfig(budget=budget)
    implementations = {"": (compress_rc, apply_plan)}
    if args.with_previous:  # the implementation before issue 28, kept verbatim in tests/reference_step.py
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_step import reference_compress_rc

        def dense_apply(features, plan):
            return torch.bmm(plan.merge_weights, features.float()).to(features.dtype)

        implementations["previous "] = (reference_compress_rc, dense_apply)
    rows = []
    for (prefix, (compress, apply)), (name, config) in itertools.product(implementations.items(), settings.items()):
        for batch_size in args.batch_sizes:
            for num_patches in args.sizes:
                inputs = scaling_inputs(batch_size, num_patches)

                def step():
                    plan = compress(inputs, config)
                    return plan, apply(inputs.features, plan)

                peak_bytes, operators = profiled_call(step)  # also the warm-up
                plan, _ = step()
                seconds, plan_seconds = [], []
                while len(seconds) < args.repeats and sum(seconds) < args.max_seconds:
                    seconds += timed(step, device, 1)
                    plan_seconds += timed(lambda: compress(inputs, config), device, 1)
                tower_seconds = crop_seconds * batch_size * num_patches / 576
                rows.append(
                    {
                        "settings": prefix + name,
                        "batch_size": batch_size,
                        "num_patches": num_patches,
                        "step_seconds": statistics.median(seconds),
                        "compress_rc_seconds": statistics.median(plan_seconds),
                        "timed_calls": len(seconds),
                        "peak_bytes": peak_bytes,
                        "operators": operators,
                        "mean_tokens": plan.counts.float().mean().item(),
                        "tower_seconds": tower_seconds,
                        "share_of_tower": statistics.median(seconds) / tower_seconds,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                write_scaling_run(args.scaling, crop_seconds, rows)  # after each row: a cut-off run keeps its rows


def write_scaling_run(label: str, crop_seconds: float, rows: list[dict]) -> None:
    """Store (or replace) the run ``label`` in ``benchmarks/results/rc_step_scaling_cpu.json``, beside the stored
    runs of the same sources (runs of earlier code are dropped: compare across versions in results/history/)."""
    path = RESULTS / "rc_step_scaling_cpu.json"
    result = json.loads(path.read_text()) if path.exists() else {"benchmark": "rc_step_scaling", "runs": {}}
    fingerprint = provenance()["fingerprint"]
    if result.get("provenance", {}).get("fingerprint") != fingerprint:
        result["runs"] = {}
    result.pop("provenance", None)
    result["runs"][label] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "geometry": "one image of N patches, C = A = 1024, 16 heads; tower: CLIP ViT-L/14-336, N / 576 crops",
        "tower_seconds_per_crop": crop_seconds,
        "clock": "process CPU time" if bench_common._clock is time.process_time else "wall time",
        "load_average": os.getloadavg(),
        "rows": rows,
        "growth_exponents": growth_exponents(rows),
    }
    write_result(path, result)


def growth_exponents(rows: list[dict]) -> dict:
    """Least-squares slope of log(step seconds) and log(peak bytes) against log(N), per settings and batch."""
    exponents = {}
    groups = {(row["settings"], row["batch_size"]) for row in rows}
    for settings, batch_size in sorted(groups):
        group = [row for row in rows if (row["settings"], row["batch_size"]) == (settings, batch_size)]
        if len(group) < 2:
            continue
        sizes = np.log([row["num_patches"] for row in group])
        exponents[f"{settings}, batch {batch_size}"] = {
            "time": float(np.polyfit(sizes, np.log([row["step_seconds"] for row in group]), 1)[0]),
            "memory": float(np.polyfit(sizes, np.log([max(row["peak_bytes"], 1) for row in group]), 1)[0]),
        }
    return exponents


def scaling_table(before: str = "before", after: str = "after") -> str:
    """Markdown table of two stored scaling runs of different code side by side (for benchmarks/NOTES.md's history:
    results/history/rc_step_scaling_cpu.json)."""
    runs = json.loads((HISTORY / "rc_step_scaling_cpu.json").read_text())["runs"]
    rows = {(row["settings"], row["batch_size"], row["num_patches"]): row for row in runs[after]["rows"]}
    old = {(row["settings"], row["batch_size"], row["num_patches"]): row for row in runs[before]["rows"]}
    lines = [
        "| batch | N | step before (ms) | step after (ms) | speed-up | peak MiB before | peak MiB after | "
        "ops before / after | tokens | share of tower before | share after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for key, row in sorted(rows.items()):
        was = old.get(key)
        before_cells = (
            [f"{was['step_seconds'] * 1e3:.0f}", f"{row['step_seconds'] * 1e3:.0f}",
             f"{was['step_seconds'] / row['step_seconds']:.1f}x", f"{was['peak_bytes'] / mib:.1f}"]
            if was
            else ["-", f"{row['step_seconds'] * 1e3:.0f}", "-", "-"]
        )
        cells = [str(key[1]), str(key[2]), *before_cells, f"{row['peak_bytes'] / mib:.1f}",
                 f"{was['operators'] if was else '-'} / {row['operators']}", f"{row['mean_tokens']:.1f}",
                 f"{was['share_of_tower']:.2%}" if was else "-", f"{row['share_of_tower']:.2%}"]
        lines.append("| " + " | ".join(cells) + " |")
    for label in (before, after):
        exponents = ", ".join(
            f"{name}: time {values['time']:.2f}, memory {values['memory']:.2f}"
            for name, values in runs[label]["growth_exponents"].items()
        )
        lines.append(f"\nGrowth exponents in N ({label}): {exponents}.")
    return "\n".join(lines)


def budget_argument(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description="RC step cost vs the vision tower and vs the released structure")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (GPU default)")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate the docs table from the saved JSON")
    parser.add_argument("--scaling", metavar="LABEL", help="measure growth in N instead; store the run as LABEL")
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1152, 2880, 5760], help="N for --scaling")
    parser.add_argument("--budget", type=budget_argument, nargs="+", default=None,
                        help="--scaling: also these fixed budgets (int: tokens; float: ratio of N)")
    parser.add_argument("--with-previous", action="store_true",
                        help="--scaling: also time the implementation before issue 28 (tests/reference_step.py)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="--scaling: stop repeating after this")
    parser.add_argument("--tower-repeats", type=int, default=3)
    parser.add_argument("--cpu-time", action="store_true",
                        help="--scaling: time with this process's CPU time (one thread, shared machine)")
    parser.add_argument("--no-released", action="store_true", help="skip the released structure (needs sklearn)")
    parser.add_argument("--scaling-table", action="store_true", help="print the before/after table and exit")
    args = parser.parse_args()
    if args.readme_only:
        write_readme_section("rc_step", committed_sections()["rc_step"])
        return
    if args.scaling_table:
        print(scaling_table())
        return
    if args.scaling:
        if args.cpu_time:
            use_cpu_time()
        scaling(args)
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    tower = CLIPVisionModel(clip_vit_l_336()).to(device, dtype).eval()
    projector = torch.nn.Sequential(
        torch.nn.Linear(1024, TEXT_WIDTH), torch.nn.GELU(), torch.nn.Linear(TEXT_WIDTH, TEXT_WIDTH)
    ).to(device, dtype)
    settings = RCConfig()
    with_released = have_sklearn() and not args.no_released
    if not with_released:
        print("released structure not timed: scikit-learn is not installed (or --no-released)")
    rows = []
    with torch.no_grad():
        for batch_size in args.batch_sizes:
            pixel_values = torch.randn(batch_size, 3, 336, 336, device=device, dtype=dtype)
            question = torch.randn(batch_size, TEXT_WIDTH, device=device)
            hidden_states = tower(pixel_values, output_hidden_states=True).hidden_states
            stages = {
                "vision": lambda: tower(pixel_values, output_hidden_states=True),
                "rc_step": lambda: rc_step(tower, projector, hidden_states, question, settings),
            }
            if with_released:
                stages["released"] = lambda: released_structure(tower, pixel_values, hidden_states, question, settings)
            for function in stages.values():  # warm-up
                function()
            samples = {name: [] for name in stages}
            for _ in range(args.repeats):  # alternate the stages so drift hits them alike
                for name, function in stages.items():
                    samples[name] += timed(function, device, 1)
            medians = {name: statistics.median(values) for name, values in samples.items()}
            rows.append(
                {
                    "batch_size": batch_size,
                    "median_seconds": medians,
                    "rc_step_share_of_vision": medians["rc_step"] / medians["vision"],
                    "released_over_rc_step": medians["released"] / medians["rc_step"] if with_released else None,
                }
            )
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "rc_step",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "geometry": "CLIP ViT-L/14-336 (24 layers, 1024 wide, 577 tokens), projector 1024->4096, random weights",
        "repeats": args.repeats,
        "released_structure": "timed" if with_released else "not timed (no scikit-learn, or --no-released)",
        "rows": rows,
    }
    path = RESULTS / f"rc_step_{device.type}.json"
    result = write_result(path, result)
    print(f"wrote {path}")
    if args.update_readme:
        update_readme(result)


def committed_sections() -> dict[str, list[str]]:
    """The docs table made from the committed CPU result (none committed: the table says how to measure it)."""
    path = RESULTS / "rc_step_cpu.json"
    if not path.exists():
        return {"rc_step": [
            "No current result: the last run (5 Dec 2026, `benchmarks/results/history/rc_step_cpu.json`) describes "
            "older code, so its figures are withdrawn. Measure it with `OMP_NUM_THREADS=1 python benchmarks/rc_step.py "
            "--batch-sizes 1 4 --repeats 3 --update-readme`."
        ]}
    return {"rc_step": rc_step_table(json.loads(path.read_text()))}


def update_readme(result: dict) -> None:
    """Regenerate the docs table between the rc_step markers from a result."""
    write_readme_section("rc_step", rc_step_table(result))


def rc_step_table(result: dict) -> list[str]:
    if "provenance" not in result:  # older code: the figures are not shown
        return [
            "`benchmarks/results/rc_step_cpu.json` was measured before provenance was recorded, with older code: its "
            "figures are withdrawn until `python benchmarks/regenerate.py` measures it again."
        ]
    lines = [
        f"RC step at LLaVA-1.5 geometry on {result['device']}, {result['dtype']}, {result['repeats']} repeats, "
        f"torch {result['torch']}, transformers {result['transformers']} (`benchmarks/results/rc_step_cpu.json`). "
        + measured_at(result),
        "",
        "| batch | vision tower (ms) | RC step (ms) | RC step / vision | released structure (ms) | released / ours |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        seconds = row["median_seconds"]
        if "released" not in seconds:
            raise ValueError("the README table needs the released structure timed (scikit-learn installed)")
        lines.append(
            f"| {row['batch_size']} | {seconds['vision'] * 1000:.0f} | {seconds['rc_step'] * 1000:.1f} | "
            f"{row['rc_step_share_of_vision']:.1%} | {seconds['released'] * 1000:.0f} | {row['released_over_rc_step']:.1f}x |"
        )
    return lines


if __name__ == "__main__":
    main()
