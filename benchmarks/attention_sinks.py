"""Does the mean received attention (the [CLS]-free importance score) pick attention sinks, and does the
``attention_sinks`` option restore the content ranking?

Two measurements, written to ``benchmarks/results/attention_sinks.json``:

1. Synthetic sinks. Crops of T random content tokens (queries and keys ~ N(0, 1), A = 64, 4 heads) plus S sink
   tokens whose keys share one large direction that every query has a positive component along (so each query
   sends them a share of its attention whatever they show: the pattern of high-norm tokens in ViTs without
   registers). The sink-free score is the received attention over the content tokens alone. Reported per setting:
   how many of the top-S tokens are sinks, and the overlap of the top-k content tokens (k = 25%) with the sink-free
   top-k, for the plain statistic and with ``num_sinks = S``.
2. The tiny OneVision test model (random SigLIP weights): the share of each crop's received attention that its top
   1 and top 3 tokens get, against a uniform 1/T. Random weights carry no sinks; the row records the baseline.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/tests python benchmarks/attention_sinks.py`` (CPU, about 10 s).
"""

import json
import platform
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_common import write_result  # noqa: E402  (benchmarks/bench_common.py)
from llava_rc.vision_importance import received_attention  # noqa: E402

WIDTH, HEADS, CROPS = 64, 4, 32


def synthetic_crops(num_tokens: int, num_sinks: int, strength: float, seed: int):
    """(queries, keys) (P, T + S, A) with S sink tokens at random positions, and the content mask (P, T + S)."""
    generator = torch.Generator().manual_seed(seed)
    total = num_tokens + num_sinks
    queries = torch.randn(CROPS, total, WIDTH, generator=generator)
    keys = torch.randn(CROPS, total, WIDTH, generator=generator)
    direction = torch.nn.functional.normalize(torch.randn(WIDTH, generator=generator), dim=0)  # (A,)
    # Every query leans towards the sink direction; sink keys point along it with a large norm.
    queries = queries + 3.0 * direction
    positions = torch.rand(CROPS, total, generator=generator).argsort(dim=1)[:, :num_sinks]  # (P, S)
    is_sink = torch.zeros(CROPS, total, dtype=torch.bool).scatter(1, positions, True)
    sink_keys = strength * direction + 0.1 * torch.randn(CROPS, total, WIDTH, generator=generator)
    keys = torch.where(is_sink.unsqueeze(-1), sink_keys, keys)
    return queries, keys, is_sink


def top_overlap(scores: torch.Tensor, reference: torch.Tensor, count: int) -> float:
    """Mean fraction of the top-``count`` of ``scores`` that is in the top-``count`` of ``reference`` (P, T)."""
    top = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(count).indices, True)
    top_reference = torch.zeros_like(top).scatter(1, reference.topk(count).indices, True)
    return float((top & top_reference).sum(1).float().mean() / count)


def synthetic_rows() -> list[dict]:
    rows = []
    for num_tokens, num_sinks, strength in [(196, 1, 40.0), (196, 4, 30.0), (729, 4, 30.0), (196, 4, 5.0)]:
        queries, keys, is_sink = synthetic_crops(num_tokens, num_sinks, strength, seed=num_tokens + num_sinks)
        content = ~is_sink
        clean_queries = queries[content].view(CROPS, num_tokens, WIDTH)
        clean_keys = keys[content].view(CROPS, num_tokens, WIDTH)
        clean = received_attention(clean_queries, clean_keys, HEADS)  # (P, T) the sink-free statistic
        count = num_tokens // 4
        row = {"content_tokens": num_tokens, "sinks": num_sinks, "sink_key_norm": strength}
        for label, option in (("plain", 0), ("sinks_excluded", num_sinks)):
            scores = received_attention(queries, keys, HEADS, num_sinks=option)  # (P, T + S)
            picked = scores.topk(num_sinks).indices
            row[f"{label}_sinks_in_top_s"] = float(is_sink.gather(1, picked).float().mean())
            row[f"{label}_sink_mass"] = float((scores * is_sink).sum(1).mean())
            content_scores = scores[content].view(CROPS, num_tokens)
            row[f"{label}_top25_overlap_with_sink_free"] = top_overlap(content_scores, clean, count)
        rows.append(row)
    return rows


def tiny_model_row() -> dict:
    from tiny_onevision import make_onevision_batch, tiny_onevision_model

    model = tiny_onevision_model({"method": "cls_attention", "budget": 4})
    batch = make_onevision_batch([3], [[(112, 112)]], seed=0)
    geometry = model.image_geometry(batch["image_sizes"], batch["batch_num_images"])
    crops, _ = model._image_crops(batch["pixel_values"], geometry)
    with torch.no_grad():
        hidden = model.model.vision_tower(crops, output_hidden_states=True).hidden_states
        scores = model._crop_importance(hidden, -1, model.compression_settings())[0]  # (P, N)
    ordered = scores.sort(dim=1, descending=True).values
    return {
        "crops": scores.shape[0],
        "tokens_per_crop": scores.shape[1],
        "top1_share": float(ordered[:, 0].mean()),
        "top3_share": float(ordered[:, :3].sum(1).mean()),
        "uniform_share": 1.0 / scores.shape[1],
    }


def main() -> None:
    torch.set_num_threads(1)
    result = {
        "synthetic": synthetic_rows(),
        "tiny_onevision": tiny_model_row(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "hardware": platform.processor() or platform.machine(),
    }
    result = write_result(ROOT / "benchmarks" / "results" / "attention_sinks.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
