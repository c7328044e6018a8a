"""How RC shares a fixed budget: accuracy per ``recovered_share`` / ``recovered_fill`` on training-split mosaics.

The default of ``recovered_share`` (``llava_rc/compression_rc.py``) is chosen here, on mosaics of easy-VQA's
*training* images (a seed the model was not trained on: new combinations of known images), never on the test set
that ``benchmarks/accuracy.py`` reports. TRSM with ``"clip"`` guidance is measured beside,
on the same questions. Writes ``benchmarks/results/rc_budget_share.json``.

    OMP_NUM_THREADS=1 python benchmarks/rc_budget_share.py --update-docs  # ~8 min on 1 free CPU thread
    python benchmarks/rc_budget_share.py --docs-only                      # the docs/rc.md table from the JSON
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench_common import ROOT, checkpoint_sources, write_readme_section, write_result  # benchmarks/bench_common.py
from llava_rc import easyvqa

CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
SELECTION_SEED = 1000  # training-split mosaics of this seed were never trained on (training uses seed 0)
SHARES = (None, 0.25, 0.5, 0.75, 0.9, 1.0)  # with "text" fill; 0.5 also with "visual" fill


def settings_to_run(budgets) -> list[dict]:
    runs = []
    for budget in budgets:
        runs.append({"method": "trsm", "budget": budget, "guidance": "clip"})
        for share in SHARES:
            runs.append({"method": "rc", "budget": budget, "guidance": "clip", "recovered_share": share,
                         "recovered_fill": "text"})
        runs.append({"method": "rc", "budget": budget, "guidance": "clip", "recovered_share": 0.5,
                     "recovered_fill": "visual"})
    return runs


def label(settings: dict) -> str:
    """A row's name from its settings (the budget is a column)."""
    return " ".join(f"{key}={value}" for key, value in settings.items() if key != "budget")


def docs_lines(result: dict) -> list[str]:
    """The table for docs/rc.md: accuracy of each setting at each budget, and the mean over the budgets."""
    budgets = sorted({row["settings"]["budget"] for row in result["rows"]}, reverse=True)
    by_label: dict[str, dict] = {}
    for row in result["rows"]:
        by_label.setdefault(label(row["settings"]), {})[row["settings"]["budget"]] = row["accuracy"]
    lines = [
        "| settings run | " + " | ".join(f"at {budget:.0%}" for budget in budgets) + " | mean |",
        "|---|" + "---|" * (len(budgets) + 1),
    ]
    for name, values in by_label.items():
        mean = sum(values[budget] for budget in budgets) / len(budgets)
        lines.append(f"| {name} | " + " | ".join(f"{values[budget]:.1%}" for budget in budgets) + f" | {mean:.1%} |")
    lines += ["", f"{result['questions']} questions of {result['mosaics']} mosaics of the {result['split']} split "
              f"(seed {result['seed']}); torch {result['torch']}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--mosaics", type=int, default=150, help="training-split mosaics (about 3.7 questions each)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "rc_budget_share.json")
    parser.add_argument("--update-docs", action="store_true", help="regenerate the table in docs/rc.md")
    parser.add_argument("--docs-only", action="store_true", help="only regenerate that table from the saved JSON")
    args = parser.parse_args()
    if args.docs_only:
        write_readme_section("rc-budget-share", docs_lines(json.loads(args.output.read_text())))
        return

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    scenes = easyvqa.mosaic_scenes("train", args.mosaics, SELECTION_SEED)
    examples = [example for scene in scenes for example in scene.examples]
    batches = easyvqa.prepare_batches(processor, scenes, examples, args.batch_size)
    rows = []
    started = time.perf_counter()
    for settings in settings_to_run(args.budgets):
        result = easyvqa.evaluate(model, processor, batches, settings)
        rows.append({"settings": settings, "accuracy": result["accuracy"], "per_kind": result["per_kind"],
                     "kept_mean": result["kept_mean"]})
        print(f"{json.dumps(settings):110s} {result['accuracy']:.4f}", flush=True)
    result = {
        "checkpoint": str(args.checkpoint.relative_to(ROOT)) if args.checkpoint.is_relative_to(ROOT) else str(args.checkpoint),
        "split": "train",
        "seed": SELECTION_SEED,
        "mosaics": args.mosaics,
        "questions": len(examples),
        "seconds": time.perf_counter() - started,
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = write_result(args.output, result, extra_sources=checkpoint_sources(args.checkpoint))
    if args.update_docs:
        write_readme_section("rc-budget-share", docs_lines(result))


if __name__ == "__main__":
    main()
