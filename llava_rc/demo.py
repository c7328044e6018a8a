"""The main job: build a small LLaVA-RC model and generate with compression off and on.

Run ``python -m llava_rc`` (or ``llava-rc-demo``). Prints, for every registered method, the tokens each image
kept, the prompt length the language model read, and the median generate time against compression off.
The model has random weights (no download is possible here), so the answers themselves are noise; the kept
counts and times are real.
"""

import argparse
import statistics
import time

import torch

from .compression_registry import METHODS
from .configuration_llava_rc import LlavaRCConfig
from .modeling_llava_rc import LlavaRCForConditionalGeneration

# Scaled-down LLaVA-1.5 geometry: CLIP ViT (patch 14) on 224 px -> 256 patches, a small Llama language model.
DEMO_IMAGE_SIZE = 224
DEMO_PATCH_SIZE = 14
DEMO_IMAGE_TOKEN_ID = 3


def demo_config(compression: dict | None = None) -> LlavaRCConfig:
    """A CPU-sized LLaVA-RC configuration (random weights)."""
    num_patches = (DEMO_IMAGE_SIZE // DEMO_PATCH_SIZE) ** 2
    return LlavaRCConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=8,
            image_size=DEMO_IMAGE_SIZE,
            patch_size=DEMO_PATCH_SIZE,
            projection_dim=128,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=1024,
            max_position_embeddings=2048,
            pad_token_id=0,
        ),
        image_token_index=DEMO_IMAGE_TOKEN_ID,
        image_seq_length=num_patches,
        compression=compression,
    )


def demo_inputs(batch_size: int, num_patches: int, seed: int = 0) -> dict:
    """Left-padded prompts of different lengths, one image each."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in range(batch_size):
        question = torch.randint(10, 1000, (8 + 3 * row,), generator=generator)
        rows.append(torch.cat([question[:2], torch.full((num_patches,), DEMO_IMAGE_TOKEN_ID), question[2:]]))
    width = max(len(row) for row in rows)
    input_ids = torch.zeros((batch_size, width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = row
        attention_mask[index, width - len(row) :] = 1
    pixel_values = torch.randn((batch_size, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def timed_generate(model, inputs: dict, compression: dict, max_new_tokens: int, repeats: int):
    """Median seconds of ``repeats`` greedy generate calls (after one warm-up) and the last output."""
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    output = model.generate(**inputs, compression=compression, **settings)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = model.generate(**inputs, compression=compression, **settings)
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def method_settings() -> list[dict]:
    """Every registered method at its default settings ("none" first, the baseline)."""
    return [config_class().to_dict() for config_class, _ in METHODS.values()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = demo_config()
    model = LlavaRCForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    num_patches = config.image_seq_length
    inputs = demo_inputs(args.batch_size, num_patches)
    prompt_length = inputs["input_ids"].shape[1]
    print(f"LLaVA-RC demo: {args.batch_size} images of {num_patches} patches, {args.max_new_tokens} new tokens")
    baseline = None
    for settings in method_settings():
        seconds, output = timed_generate(model, inputs, settings, args.max_new_tokens, args.repeats)
        baseline = baseline or seconds
        report = output.get("compression")
        kept = report.kept_counts.tolist() if report is not None else [num_patches] * args.batch_size
        # One image per row: the language model read each prompt shortened by the image's dropped tokens.
        read = (inputs["attention_mask"].sum(1) - num_patches + torch.tensor(kept)).tolist()
        print(
            f"{settings['method']:>14}: kept {kept} of {num_patches} tokens per image, prompts read {read} "
            f"tokens, generate {seconds * 1000:.0f} ms ({baseline / seconds:.2f}x faster than none)"
        )
        print(f"{'':>16}new tokens: {output.sequences[0, prompt_length:].tolist()}")


if __name__ == "__main__":
    main()
