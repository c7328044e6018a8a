"""RC's compression step against TTFT at batch 1 on the CPU geometries, with the step timed on its own.

``benchmarks/latency.py`` reads the step as RC's pre-pass minus the stock image features: a difference of two
timings of the vision tower, which on CPU are each noisy by more than the step itself (it came out negative). Here
the step is timed directly. For each geometry (``cpu-small``: LLaVA-1.5, 576 patches; ``cpu-next-small``:
LLaVA-NeXT, 5 crops, 1,280 patches; the models and prompts of ``latency.py``), batch 1, the following run in turn
after a warm-up, ``--repeats`` times, and their medians are reported:
- stock and RC ``generate()`` with one new token: time to first token (TTFT);
- the vision tower alone over every crop of the image;
- the step: RC's ``compress_inputs`` with its tower call replayed from the first call (``replayed_tower``), i.e.
  everything RC does after the tower: the importance read from the tower's states, the projector, the method, the
  plan applied to the tokens and the batch rebuilt around them. The stock model runs the projector over every
  token, so the step's net cost over stock is the step minus that projector call (timed too: ``projector``); it can
  be negative, since RC projects only the tokens it keeps where its method reads the tower's own features.
Before timing, the replayed call's rebuilt embeddings are checked equal to a normal call's.

Share = step / RC's TTFT. Goal (issue 28): <= 5% at batch 1 on both geometries, on a quiet machine: the load
average is recorded at the start and end of each geometry.

    OMP_NUM_THREADS=1 python benchmarks/step_share.py --repeats 15 --update-readme
    python benchmarks/step_share.py --readme-only
"""

import argparse
import json
import os
import platform
import statistics
import sys
from functools import partial
from pathlib import Path

import latency  # benchmarks/latency.py: geometries, models, inputs, one generate()
from bench_common import RESULTS, measured_at, timed, use_cpu_time, write_readme_section, write_result
import torch
import transformers

GOAL = 0.05
DEFAULT_GEOMETRIES = ("cpu-small", "cpu-next-small")


def replayed_tower(model, call):
    """A function running ``call`` (a ``compress_inputs`` call) with ``model._encode_images`` answered from the
    first run's result, so that from the second run on the vision tower is not run; ``.encoded`` holds that result."""
    original = model._encode_images
    cached = []

    def replay(*args, **kwargs):
        if not cached:
            cached.append(original(*args, **kwargs))
        return cached[0]

    def run():
        model._encode_images = replay  # the instance attribute shadows the method
        try:
            return call()
        finally:
            del model._encode_images

    run.encoded = cached
    return run


def compress_call(model, settings, inputs: dict):
    return partial(
        model.compress_inputs, inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"],
        settings=settings, pad_left=True, image_sizes=inputs.get("image_sizes"),
    )


def measure_geometry(name: str, variants: list[str] | None, repeats: int, device: torch.device) -> dict:
    spec = latency.GEOMETRIES[name]
    available = spec.variants or latency.VARIANTS
    chosen = variants or [key for key, value in available.items() if value is not None and value["method"] == "rc"]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise SystemExit(f"--variants {unknown} are not variants of {name}; expected some of {list(available)}")
    uncompressed = [variant for variant in chosen if available[variant] is None]
    if uncompressed:
        raise SystemExit(f"--variants {uncompressed} compress nothing (stock is always timed); expected compressing ones")
    load_start = os.getloadavg()
    stock, rc = latency.build_models(spec, device, torch.float32)
    inputs = latency.make_inputs(spec, 1, device, torch.float32, seed=1)
    crops = inputs["pixel_values"].flatten(0, -4)
    functions = {
        "stock ttft": partial(latency.run_generate, stock, None, inputs, 1, device),
        "vision tower": lambda: rc.model.vision_tower(crops, output_hidden_states=True),
    }
    projector_input = None
    for variant in chosen:
        settings = rc.compression_settings(available[variant])
        call = compress_call(rc, settings, inputs)
        step = replayed_tower(rc, call)
        with torch.no_grad():
            expected = call()
            step()  # runs the tower, keeps its result
            replayed = step()  # replays it
        if not torch.equal(expected.inputs_embeds, replayed.inputs_embeds):
            raise RuntimeError(f"{variant}: compress_inputs with the replayed tower differs from a normal call")
        functions[f"{variant} ttft"] = partial(latency.run_generate, rc, available[variant], inputs, 1, device)
        functions[f"{variant} step"] = step
        if projector_input is None:
            encoded = step.encoded[0]
            states = encoded.state["hidden_states"]
            projector_input = states[encoded.state["feature_layer"]][:, rc._num_prefix_tokens():]  # (P, N, C)
    functions["projector"] = lambda: rc.model.multi_modal_projector(projector_input)

    def seconds(key, function):
        if key.endswith("ttft"):
            return lambda: function()["ttft"]
        return lambda: timed(function, device, 1)[0]

    with torch.no_grad():
        samples = latency.alternate({key: seconds(key, function) for key, function in functions.items()}, repeats)
    medians = {key: statistics.median(values) for key, values in samples.items()}
    spread = {key: [min(values), max(values)] for key, values in samples.items()}
    rows = []
    for variant in chosen:
        step = medians[f"{variant} step"]
        rows.append({
            "variant": variant,
            "settings": available[variant],
            "ttft_stock_s": medians["stock ttft"],
            "ttft_rc_s": medians[f"{variant} ttft"],
            "ttft_ratio": medians["stock ttft"] / medians[f"{variant} ttft"],
            "step_s": step,
            "step_without_projector_s": step - medians["projector"],
            "share_of_ttft": step / medians[f"{variant} ttft"],
            "share_of_ttft_without_projector": (step - medians["projector"]) / medians[f"{variant} ttft"],
            "share_of_vision": step / medians["vision tower"],
        })
        latency.log(f"{name} {variant}: step {step * 1e3:.1f} ms = {rows[-1]['share_of_ttft']:.1%} of TTFT")
    return {
        "geometry": name,
        "geometry_description": spec.description,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "medians_s": medians,
        "min_max_s": spread,
        "rows": rows,
    }


def table(result: dict) -> list[str]:
    clock = result["settings"]["clock"]
    lines = [
        "| geometry | variant | stock TTFT | RC TTFT | stock / RC | step | step - stock projector | step / RC TTFT | "
        "step / tower | load average (start; end) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for geometry in result["geometries"]:
        load = "; ".join(", ".join(f"{value:.1f}" for value in geometry["load_average"][key]) for key in ("start", "end"))
        for row in geometry["rows"]:
            lines.append(
                f"| {geometry['geometry']} | {row['variant']} | {row['ttft_stock_s'] * 1e3:.0f} ms | "
                f"{row['ttft_rc_s'] * 1e3:.0f} ms | {row['ttft_ratio']:.2f}x | {row['step_s'] * 1e3:.1f} ms | "
                f"{row['step_without_projector_s'] * 1e3:.1f} ms | **{row['share_of_ttft']:.1%}** | "
                f"{row['share_of_vision']:.1%} | {load} |"
            )
    worst = max(row["share_of_ttft"] for geometry in result["geometries"] for row in geometry["rows"])
    lines += [
        "",
        (
            f"Batch 1, one new token, {result['settings']['repeats']} alternating repeats after a warm-up, medians "
            f"({clock}); {result['device']}, float32, SDPA, torch {result['torch']}, transformers "
            f"{result['transformers']} (`benchmarks/results/step_share_cpu.json`). The step is RC's `compress_inputs` "
            "with the tower replayed (importance, projector, method, plan, batch rebuild); the stock model runs the "
            "projector over every token, so step - stock projector is the step's net cost over stock (negative where "
            "RC projects only the tokens it keeps). The share counts the whole step. Largest share "
            f"{worst:.1%} (goal <= {GOAL:.0%}: {'met' if worst <= GOAL else 'not met'}). " + measured_at(result)
        ),
    ]
    return lines


def committed_sections() -> dict[str, list[str]]:
    return {"step-share": table(json.loads((RESULTS / "step_share_cpu.json").read_text()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometries", nargs="+", choices=DEFAULT_GEOMETRIES, default=list(DEFAULT_GEOMETRIES))
    parser.add_argument("--variants", nargs="+", default=None, help="default: every RC variant of each geometry")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (a shared machine)")
    parser.add_argument("--output", type=Path, default=RESULTS / "step_share_cpu.json")
    parser.add_argument("--update-readme", action="store_true", help="regenerate the benchmarks/NOTES.md table")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate the table from the saved JSON")
    args = parser.parse_args()
    if args.readme_only:
        for marker, lines in committed_sections().items():
            write_readme_section(marker, lines)
        return
    torch.set_num_threads(1)
    if args.cpu_time:
        use_cpu_time()
    device = torch.device("cpu")
    geometries = [measure_geometry(name, args.variants, args.repeats, device) for name in args.geometries]
    result = {
        "benchmark": "step_share",
        "device": latency.device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "settings": {
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "clock": "process CPU time" if args.cpu_time else "wall time",
            "command": " ".join(sys.argv),
        },
        "geometries": geometries,
    }
    result = write_result(args.output, result)
    print(json.dumps([geometry["rows"] for geometry in result["geometries"]], indent=1))
    if args.update_readme:
        for marker, lines in committed_sections().items():
            write_readme_section(marker, lines)


if __name__ == "__main__":
    main()
