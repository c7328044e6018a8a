"""G-Prune's graph scores against the token count N: time and peak memory, chunked (now) and dense (before).

G-Prune builds a cosine-similarity graph over an image's projected tokens (D = 4,096 for a 7B language model) and
propagates the token norms over it. The released algorithm is dense; ``graph_scores`` builds the transition matrix in
chunks of rows within ``GRAPH_MEMORY_BYTES`` (rows kept across steps while they fit, recomputed otherwise), so its
peak memory is bounded whatever N. This measures, per N and batch: CPU time (median), the peak memory torch
allocated during one call (profiler memory events, above the inputs), for the current code and, with
``--with-previous``, the dense implementation before issue 28 (``tests/reference_step.py``), alternated in one run.
Also checks that both keep the same tokens (half of them, as the default ``keep_ratio``).

    OMP_NUM_THREADS=1 python benchmarks/gprune_scaling.py --with-previous --sizes 576 1152 2880 5760 --batch-sizes 1
"""

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers

import bench_common  # benchmarks/bench_common.py
from llava_rc.compression_common import select_mask
from llava_rc.compression_gprune import GRAPH_MEMORY_BYTES, graph_scores
from rc_step import profiled_call  # benchmarks/rc_step.py

ROOT = Path(__file__).resolve().parents[1]


def clustered_features(batch_size: int, num_tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """(I, N, D) tokens around a few cluster centres, so the graph has many edges (as image regions do)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(batch_size, 16, width, generator=generator)
    member = torch.randint(0, 16, (batch_size, num_tokens), generator=generator)
    noise = torch.randn(batch_size, num_tokens, width, generator=generator)
    return centres.gather(1, member.unsqueeze(-1).expand(-1, -1, width)) + 0.8 * noise


def main() -> None:
    parser = argparse.ArgumentParser(description="G-Prune graph scores: time and peak memory against N")
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 1152, 2880, 5760])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-previous", action="store_true", help="also the dense implementation before issue 28")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gprune_scaling_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench_common.use_cpu_time()
    implementations = {"chunked": graph_scores}
    if args.with_previous:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference_step import reference_graph_scores

        implementations["dense (before)"] = reference_graph_scores
    device = torch.device("cpu")
    rows = []
    for batch_size in args.batch_sizes:
        for num_tokens in args.sizes:
            features = clustered_features(batch_size, num_tokens, args.width)
            calls = {name: (lambda f=function: f(features, 0.5, 0.03, 5)) for name, function in implementations.items()}
            peaks = {name: profiled_call(call)[0] for name, call in calls.items()}  # also the warm-up
            samples = {name: [] for name in calls}
            for _ in range(args.repeats):  # alternate the implementations
                for name, call in calls.items():
                    samples[name] += bench_common.timed(call, device, 1)
            kept = {name: select_mask(call(), num_tokens // 2) for name, call in calls.items()}
            row = {
                "batch_size": batch_size,
                "num_tokens": num_tokens,
                "cpu_seconds": {name: statistics.median(values) for name, values in samples.items()},
                "peak_bytes": peaks,
                "same_kept_tokens": all(torch.equal(mask, kept["chunked"]) for mask in kept.values()),
                "load_average": os.getloadavg(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = {
                "benchmark": "gprune_scaling",
                "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread, process CPU time)",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "width": args.width,
                "graph_memory_bytes": GRAPH_MEMORY_BYTES,
                "command": " ".join(sys.argv),
                "rows": rows,
            }
            bench_common.write_result(Path(args.output), result)


if __name__ == "__main__":
    main()
