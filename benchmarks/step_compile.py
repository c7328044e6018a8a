"""The compression step with and without ``torch.compile``: its share of TTFT at batch 1 and of the vision tower.

For each variant (a method with a fixed budget: its step is one graph, ``tests/test_compile.py``), with the
models, inputs and timing of ``latency.py`` (random weights, SDPA, no padding):
- the pre-pass at each batch of ``--batches``: the vision tower alone, stock's image features (vision tower +
  projector) and RC's ``compress_inputs``; step = ``compress_inputs`` - stock's image features;
- TTFT at batch 1 (``generate()`` of one token) of stock and of the variant;
each eager and with the method's function compiled (``fullgraph=True``, static shapes; on CUDA
``mode="reduce-overhead"``, i.e. captured in a CUDA graph). The rest of the step (signals, gathers, projector,
rebuild) stays eager. The compiled runs come after a warm-up that compiles, so compile time is not in the medians
(``compile_seconds``: the compiling pass, a warm-up and one timed run). The JSON is written after each variant.

    python benchmarks/step_compile.py --geometry llava-1.5-7b --device cuda --dtype float16 --batches 1 16
    python benchmarks/step_compile.py --geometry cpu-small --device cpu --backend aot_eager --repeats 1  # dry run
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

import latency  # benchmarks/latency.py, beside this script
from bench_common import synchronize
from llava_rc import compression_registry

DEFAULT_VARIANTS = {
    "rc-64": {"method": "rc", "budget": 64},
    "cls_attention-64": {"method": "cls_attention", "budget": 64},
}


@contextmanager
def compiled_method(method: str, **compile_kwargs):
    """The registry's function for ``method`` replaced by its compiled version while the block runs."""
    config_class, function = compression_registry.METHODS[method]
    torch._dynamo.reset()
    compression_registry.METHODS[method] = (config_class, torch.compile(function, **compile_kwargs))
    try:
        yield
    finally:
        compression_registry.METHODS[method] = (config_class, function)


def measure(stock, rc, spec, compression, batches, repeats, device, dtype) -> dict:
    """Medians (seconds) of the vision tower, stock features and RC pre-pass per batch, and TTFT at batch 1."""
    settings = rc.compression_settings(compression)
    result = {}
    for batch in batches:
        inputs = latency.make_inputs(spec, batch, device, dtype, seed=batch)
        size_args = () if inputs.get("image_sizes") is None else (inputs["image_sizes"],)
        functions = {
            "vision": lambda pv=inputs["pixel_values"].flatten(0, -4): rc.model.vision_tower(
                pv, output_hidden_states=True
            ),
            "stock_features": lambda i=inputs: stock.model.get_image_features(
                i["pixel_values"], *size_args, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ),
            "rc_prepass": lambda i=inputs: rc.compress_inputs(
                i["input_ids"], i["pixel_values"], attention_mask=i["attention_mask"], settings=settings,
                pad_left=True, image_sizes=i.get("image_sizes"),
            ),
        }
        timed = {name: (lambda f=function: latency.timed_call(f, device)) for name, function in functions.items()}
        medians = {name: statistics.median(values) for name, values in latency.alternate(timed, repeats).items()}
        step = medians["rc_prepass"] - medians["stock_features"]
        result[f"batch{batch}"] = {**medians, "step": step, "step_share_of_vision": step / medians["vision"]}
    inputs = latency.make_inputs(spec, 1, device, dtype, seed=1)
    ttft = latency.alternate({
        "stock": lambda: latency.run_generate(stock, None, inputs, 1, device)["ttft"],
        "rc": lambda: latency.run_generate(rc, compression, inputs, 1, device)["ttft"],
    }, repeats)
    result["ttft_batch1"] = {name: statistics.median(values) for name, values in ttft.items()}
    if "batch1" in result:
        result["step_share_of_ttft_batch1"] = result["batch1"]["step"] / result["ttft_batch1"]["rc"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="The compression step eager vs torch.compile")
    parser.add_argument("--geometry", choices=sorted(latency.GEOMETRIES), default="llava-1.5-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float16 (CUDA default) or float32 (CPU default)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(DEFAULT_VARIANTS))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a fast dry run)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    spec = latency.GEOMETRIES[args.geometry]
    stock, rc = latency.build_models(spec, device, dtype)
    mode = "reduce-overhead" if device.type == "cuda" and args.backend == "inductor" else None
    compile_kwargs = {"fullgraph": True, "dynamic": False, "backend": args.backend, "mode": mode}
    result = {
        "benchmark": "step_compile",
        "geometry": args.geometry,
        "geometry_description": spec.description,
        "device": latency.device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "compile": {key: value for key, value in compile_kwargs.items()},
        "command": " ".join(sys.argv),
        "variants": {},
    }
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name in args.variants:
            compression = DEFAULT_VARIANTS[name]
            row = {"settings": compression, "eager": measure(stock, rc, spec, compression, args.batches,
                                                             args.repeats, device, dtype)}
            latency.log(f"{name} eager: {json.dumps(row['eager'])}")
            result["variants"][name] = row
            out_path.write_text(json.dumps(result, indent=2) + "\n")  # kept if the compile runs out of time
            try:
                with compiled_method(compression["method"], **compile_kwargs):
                    synchronize(device)
                    start = time.perf_counter()
                    measure(stock, rc, spec, compression, args.batches, 1, device, dtype)  # compiles each batch
                    synchronize(device)
                    row["compile_seconds"] = time.perf_counter() - start
                    row["compiled"] = measure(stock, rc, spec, compression, args.batches, args.repeats, device, dtype)
                latency.log(f"{name} compiled: {json.dumps(row['compiled'])}")
            except Exception as error:  # a failed compile is a result too; the eager numbers stay
                row["compiled_error"] = f"{type(error).__name__}: {str(error)[:2000]}"
                latency.log(f"{name} compiled: FAILED {row['compiled_error'][:300]}")
            result["variants"][name] = row
            out_path.write_text(json.dumps(result, indent=2) + "\n")
    latency.log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
