"""vLLM serving with the llava-rc plugin: throughput and TTFT of stock vs compressed LLaVA, and the plugin's overhead.

One engine serves a LLaVA-RC repo with random weights at a geometry of ``latency.py`` (``cpu-small`` on CPU,
``llava-1.5-7b`` on GPU). Each round sends ``--requests`` concurrent requests (fresh random images every round, so
neither the encoder cache nor prefix caching can serve them), all with one variant's per-request settings; the
variants alternate round by round in the same run: ``stock`` (``{"method": "none"}``: every patch, the uncompressed
LLaVA prompt) and the compressed ones. Reported per variant: medians over rounds of requests/s, generated tokens/s,
mean and p90 TTFT, the prompt length; and ratios against stock.

Plugin overhead (inside the engine, on the same model, one batch of ``--overhead-images`` images): the plugin's encoder
(``embed_multimodal``: settings decoded, requests grouped, synthetic rows built, the transformers pre-pass, tokens
split) against the transformers pre-pass alone (``compress_inputs`` on prepared rows), and against the stock path.
The load average is recorded beside the numbers.

    python benchmarks/vllm_serving.py --output benchmarks/results/vllm_serving_cpu.json --update-readme  # CPU
    python benchmarks/vllm_serving.py --geometry llava-1.5-7b --dtype float16 --output out.json        # GPU

``--update-readme`` regenerates the table of docs/serving.md from the result written; ``--readme-only`` from the
committed ``benchmarks/results/vllm_serving_cpu.json``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model runs in this process

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, measured_at, write_readme_section, write_result  # noqa: E402  (bench_common.py)
from latency import GEOMETRIES, config_kwargs, random_init_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
VARIANTS = {
    "stock": {"method": "none"},
    "cls_attention-64": {"method": "cls_attention", "budget": 64},
    "rc-64": {"method": "rc", "budget": 64, "guidance": "llm"},
}
QUESTION = "what is the color of the shape?"
CPU_RESULT = "vllm_serving_cpu.json"
CPU_COMMAND = f"python benchmarks/vllm_serving.py --output benchmarks/results/{CPU_RESULT} --update-readme"


def write_repo(directory: Path, geometry: str, dtype: torch.dtype) -> None:
    """A LLaVA-RC repo with random weights at ``geometry``; the shipped checkpoint's word-level tokenizer."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    from llava_rc import LlavaRCConfig, LlavaRCForConditionalGeneration

    spec = GEOMETRIES[geometry]
    if spec.family != "llava":
        raise SystemExit(f"--geometry {geometry} is a {spec.family} geometry; this benchmark serves LLaVA-1.5")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(SHIPPED)
    kwargs = config_kwargs(spec)
    kwargs.update(image_token_index=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    kwargs["text_config"].update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    config = LlavaRCConfig(**kwargs, compression={"method": "cls_attention", "budget": 64})
    model = LlavaRCForConditionalGeneration(config).to(dtype)
    random_init_(model, seed=0)
    model.save_pretrained(directory)
    size = spec.vision["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.vision["patch_size"],
                   vision_feature_select_strategy="default",
                   chat_template=(SHIPPED / "chat_template.jinja").read_text()).save_pretrained(directory)


def images(round_index: int, count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(1000 + round_index)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def run_round(llm, sampling, variant: dict, batch_images) -> dict:
    requests = [
        {"prompt": f"USER: <image>\n{QUESTION} ASSISTANT:", "multi_modal_data": {"image": image},
         "mm_processor_kwargs": {"compression": variant}}
        for image in batch_images
    ]
    start = time.perf_counter()
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    seconds = time.perf_counter() - start
    ttft = sorted(output.metrics.first_token_latency for output in outputs)
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {
        "seconds": seconds,
        "requests_per_s": len(outputs) / seconds,
        "generated_tokens_per_s": generated / seconds,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "prompt_tokens": len(outputs[0].prompt_token_ids),
    }


def plugin_overhead(llm, processor, variant: dict, batch_images, repeats: int) -> dict:
    """Median seconds of the plugin's encoder and of the transformers pre-pass alone, inside the engine."""
    from llava_rc.compression_registry import update_compression
    from llava_rc.vllm_model import GUIDANCE_IDS_FIELD, GUIDANCE_MASK_FIELD, SETTINGS_FIELD, encode_settings

    inputs = processor(images=batch_images, text=[f"USER: <image>\n{QUESTION} ASSISTANT:"] * len(batch_images),
                       return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")

    def measure(model, variant=variant):
        settings = update_compression(model.config.compression, variant)
        text = [row[row != image_token] for row in inputs["input_ids"]]
        kwargs = {
            "pixel_values": inputs["pixel_values"],
            SETTINGS_FIELD: torch.tensor([encode_settings(settings)] * len(text)),
            GUIDANCE_IDS_FIELD: torch.stack(text),
            GUIDANCE_MASK_FIELD: torch.ones_like(torch.stack(text)),
        }
        pixels = list(inputs["pixel_values"])
        masks = [torch.ones_like(row) for row in text]

        with torch.no_grad():
            prepared = model.prepass_inputs(pixels, None, settings, text, masks)
            functions = {
                "plugin_encoder_s": lambda: model.embed_multimodal(**kwargs),
                "prepass_only_s": lambda: model.compressor.compress_inputs(**prepared),
            }
            samples = {name: [] for name in functions}
            for _ in range(repeats):  # alternating, so load drifts hit both alike
                for name, function in functions.items():
                    start = time.perf_counter()
                    function()
                    samples[name].append(time.perf_counter() - start)
            return {name: statistics.median(values) for name, values in samples.items()}

    return llm.apply_model(measure)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="cpu-small", choices=sorted(GEOMETRIES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--overhead-images", type=int, default=8, help="images in the encoder-overhead batch")
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", type=Path)
    parser.add_argument("--update-readme", action="store_true",
                        help="regenerate the docs/serving.md table from the result written")
    parser.add_argument("--readme-only", action="store_true",
                        help=f"only regenerate the docs/serving.md table from benchmarks/results/{CPU_RESULT}")
    args = parser.parse_args()
    if args.readme_only:
        for marker, lines in committed_sections().items():
            write_readme_section(marker, lines)
        return
    if args.output is None:
        raise SystemExit("--output is required (the results JSON to write), unless --readme-only")
    if "stock" not in args.variants:
        raise SystemExit("--variants must include stock (the ratios are against it)")

    import vllm
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    dtype = getattr(torch, args.dtype)
    spec = GEOMETRIES[args.geometry]
    with tempfile.TemporaryDirectory() as directory:
        write_repo(Path(directory), args.geometry, dtype)
        processor = AutoProcessor.from_pretrained(directory)
        llm = LLM(model=directory, trust_remote_code=True, dtype=args.dtype, max_model_len=1024,
                  enforce_eager=True, max_num_seqs=args.requests, enable_prefix_caching=False,
                  disable_log_stats=False, seed=0)
        sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        size = spec.vision["image_size"]
        run_round(llm, sampling, VARIANTS["stock"], images(-1, args.requests, size))  # warm-up
        rounds: dict[str, list] = {name: [] for name in args.variants}
        load = [os.getloadavg()]
        for round_index in range(args.rounds):
            for offset, name in enumerate(args.variants):  # alternate, every variant on fresh images
                batch = images(round_index * len(args.variants) + offset, args.requests, size)
                rounds[name].append(run_round(llm, sampling, VARIANTS[name], batch))
            load.append(os.getloadavg())
        overhead = {
            name: plugin_overhead(llm, processor, VARIANTS[name], images(99, args.overhead_images, size),
                                  repeats=args.overhead_repeats)
            for name in args.variants
        }
        load.append(os.getloadavg())

    def median(name, key):
        return statistics.median(sample[key] for sample in rounds[name])

    variants = {}
    for name in args.variants:
        summary = {key: median(name, key) for key in rounds[name][0]}
        summary["rounds"] = rounds[name]
        summary["encoder"] = overhead[name]
        encoder = overhead[name]
        summary["encoder"]["plugin_glue_s"] = encoder["plugin_encoder_s"] - encoder["prepass_only_s"]
        summary["encoder"]["plugin_glue_share"] = summary["encoder"]["plugin_glue_s"] / encoder["plugin_encoder_s"]
        variants[name] = summary
    for name in args.variants:
        variants[name]["vs_stock"] = {
            "requests_per_s": variants[name]["requests_per_s"] / variants["stock"]["requests_per_s"],
            "ttft_mean": variants[name]["ttft_mean_s"] / variants["stock"]["ttft_mean_s"],
            "encoder": variants[name]["encoder"]["plugin_encoder_s"] / variants["stock"]["encoder"]["plugin_encoder_s"],
        }
    result = {
        "benchmark": "vllm_serving",
        "command": " ".join(["python", *sys.argv]),
        "geometry": args.geometry,
        "description": spec.description,
        "dtype": args.dtype,
        "requests_per_round": args.requests,
        "overhead_images": args.overhead_images,
        "overhead_repeats": args.overhead_repeats,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "variants_settings": {name: VARIANTS[name] for name in args.variants},
        "variants": variants,
        "load_average_1_5_15": load,
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "notes": (
            "stock = the plugin with method 'none' (every patch kept; the full vision tower): vLLM's own LLaVA module "
            "cannot be imported beside CPU torch (it needs torchvision). Random weights; ignore_eos, so every request "
            "generates max_tokens tokens. TTFT from vLLM's request metrics (first_token_latency)."
        ),
    }
    result = write_result(args.output, result)
    if args.update_readme:
        write_readme_section("vllm_serving", serving_table(result, args.output))
    for name in args.variants:
        summary = variants[name]
        print(f"{name:18s} prompt {summary['prompt_tokens']:4d}  req/s {summary['requests_per_s']:.3f} "
              f"({summary['vs_stock']['requests_per_s']:.2f}x)  TTFT {summary['ttft_mean_s']:.3f}s "
              f"({summary['vs_stock']['ttft_mean']:.2f}x)  encoder {summary['encoder']['plugin_encoder_s']:.3f}s, "
              f"glue {100 * summary['encoder']['plugin_glue_share']:.1f}%")
    print("load average", load)


VARIANT_LABELS = {
    "stock": 'stock (`"none"`)',
    "cls_attention-64": "`cls_attention`, budget 64",
    "rc-64": '`rc`, budget 64, `"llm"` guidance',
}


def committed_sections() -> dict[str, list[str]]:
    """The docs/serving.md table made from the committed CPU result (none committed: how to measure it)."""
    path = RESULTS / CPU_RESULT
    if not path.exists():
        return {"vllm_serving": [
            "No current result: the last run (5 Dec 2026, with the plugin as first merged, "
            f"`benchmarks/results/history/{CPU_RESULT}`) describes older code, so its figures are withdrawn. Measure "
            f"it in the vLLM environment with `{CPU_COMMAND}`."
        ]}
    return {"vllm_serving": serving_table(json.loads(path.read_text()), path)}


def serving_table(result: dict, path: Path) -> list[str]:
    """Per variant: prompt tokens, throughput and TTFT against stock, the plugin's encoder and its own share."""
    loads = [load[0] for load in result["load_average_1_5_15"]]
    lines = [
        f"{result['description']} ({result['geometry']}), random weights, {result['dtype']}, one engine, "
        f"{result['requests_per_round']} concurrent requests per round with fresh images, {result['max_tokens']} "
        f"generated tokens each, {result['rounds']} round(s) with the variants alternating; vLLM "
        f"{result['versions']['vllm']}, {result['hardware']['cpu_count']} CPU cores "
        f"({result['hardware']['cuda'] or 'no GPU'}), 1-minute load average {min(loads):.1f} to {max(loads):.1f} "
        f"(`{Path(path).name}`). " + measured_at(result),
        "",
        "| per request | prompt tokens | requests/s | vs stock | generated tokens/s | mean TTFT | vs stock "
        f"| plugin encoder ({result['overhead_images']} images) | of it outside the transformers pre-pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, variant in result["variants"].items():
        lines.append(
            f"| {VARIANT_LABELS.get(name, name)} | {variant['prompt_tokens']} | {variant['requests_per_s']:.2f} | "
            f"{variant['vs_stock']['requests_per_s']:.2f}x | {variant['generated_tokens_per_s']:.1f} | "
            f"{variant['ttft_mean_s']:.2f} s | {variant['vs_stock']['ttft_mean']:.2f}x | "
            f"{variant['encoder']['plugin_encoder_s']:.2f} s | {variant['encoder']['plugin_glue_share']:.1%} |"
        )
    return lines


if __name__ == "__main__":
    main()
