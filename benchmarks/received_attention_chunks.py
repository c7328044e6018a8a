"""Memory and time of the received-attention statistic in query chunks against the whole attention at once.

``vision_importance.received_attention(..., query_chunk=c)`` holds (P, H, c, T) attention rows at a time; with
``c >= T`` it is the previous computation, the whole (P, H, T, T) at once. Two geometries, queries and keys random:

- OneVision-7B: 5 crops of 729 SigLIP tokens (27 x 27), 16 heads x 72;
- Qwen2.5-VL: one 672 x 672 px image, 48 x 48 = 2304 patches at its last full-attention block, 16 heads x 80.

Per geometry and statistic (per head, joint): the largest tensor any operation returns (elements x 4 bytes: the
attention that must be resident at once), the median time of each, alternating full and chunked, and the largest
score difference. ``os.getloadavg()`` is recorded beside the times (the machine may be shared).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/received_attention_chunks.py`` (CPU, about a minute);
writes ``benchmarks/results/received_attention_chunks.json``.
"""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_common  # noqa: E402  (benchmarks/bench_common.py; first, it notes the start time)

from llava_rc.vision_importance import QUERY_CHUNK, received_attention  # noqa: E402

GEOMETRIES = {"onevision_7b_5_crops": (5, 729, 16, 72), "qwen2_5_vl_672px": (1, 2304, 16, 80)}
REPEATS = 5


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def measure(name: str, crops: int, tokens: int, heads: int, head_dim: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(crops, tokens, heads * head_dim, generator=generator)
    keys = torch.randn(crops, tokens, heads * head_dim, generator=generator)
    rows = []
    for per_head in (True, False):
        variants = {"full": tokens, "chunked": QUERY_CHUNK}
        largest, scores, times = {}, {}, {label: [] for label in variants}
        for label, chunk in variants.items():
            with LargestTensor() as probe:
                scores[label] = received_attention(queries, keys, heads, per_head=per_head, query_chunk=chunk)
            largest[label] = probe.largest
        for _ in range(REPEATS):  # alternate A and B
            for label, chunk in variants.items():
                start = time.perf_counter()
                received_attention(queries, keys, heads, per_head=per_head, query_chunk=chunk)
                times[label].append(time.perf_counter() - start)
        full_s, chunked_s = statistics.median(times["full"]), statistics.median(times["chunked"])
        rows.append({
            "geometry": name,
            "crops": crops, "tokens": tokens, "heads": heads, "head_dim": head_dim,
            "statistic": "per_head" if per_head else "joint",
            "query_chunk": QUERY_CHUNK,
            "largest_tensor_mb": {label: round(value * 4 / 2**20, 1) for label, value in largest.items()},
            "memory_ratio_full_over_chunked": round(largest["full"] / largest["chunked"], 1),
            "median_s": {"full": round(full_s, 4), "chunked": round(chunked_s, 4)},
            "time_ratio_chunked_over_full": round(chunked_s / full_s, 3),
            "max_abs_score_difference": float((scores["full"] - scores["chunked"]).abs().max()),
            "loadavg": os.getloadavg(),
        })
    return rows


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = [row for name, geometry in GEOMETRIES.items() for row in measure(name, *geometry)]
    result = {
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "hardware": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    path = ROOT / "benchmarks" / "results" / "received_attention_chunks.json"
    result = bench_common.write_result(path, result)
    print(result["rows"])


if __name__ == "__main__":
    main()
