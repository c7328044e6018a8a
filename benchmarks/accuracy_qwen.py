"""Accuracy vs kept visual tokens of the tiny Qwen2.5-VL-RC, on the test sets of the LLaVA table.

Loads ``llava_rc/checkpoints/qwen2_5-vl-rc-easyvqa`` through ``AutoModelForImageTextToText.from_pretrained(...,
trust_remote_code=True)`` and answers the questions of ``benchmarks/accuracy.py`` (the same seeded 1000 easy-VQA test
questions and 400 test mosaics) with the first greedy token, in Qwen's chat prompt: compression off, adaptive RC,
and every method at 10% and 25% of the image's language-model tokens (36 per image: a budget counts tokens after the
2 x 2 merge, so 10% keeps 3 of them, 12 ViT patches), plus RC and TRSM at 10% with ``guidance="llm"`` (their default
``"auto"`` guidance is none on Qwen, which has no CLIP text tower). Writes ``benchmarks/results/accuracy_qwen.json``;
``--update-readme`` regenerates its tables (README summary, docs/qwen.md), ``--readme-only`` from the JSON.

    OMP_NUM_THREADS=1 python benchmarks/accuracy_qwen.py --update-readme
    python benchmarks/accuracy_qwen.py --readme-only
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageTextToText

from accuracy import UNIQUE_OBJECT, paired_comparison, settings_label, table_row  # benchmarks/accuracy.py
from bench_common import ROOT, checkpoint_sources, measured_at, write_readme_section, write_result
from llava_rc import METHODS, easyvqa
from llava_rc.train_qwen_easyvqa import PROMPT, load_processor

CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "qwen2_5-vl-rc-easyvqa"
BUDGETS = (0.25, 0.1)
LLAVA_RESULT = ROOT / "benchmarks" / "results" / "accuracy.json"


def settings_to_run() -> list[tuple[str, dict]]:
    """(key, settings): compression off, adaptive RC, every method at every budget, then RC and TRSM with the
    language model's guidance at 10%."""
    runs = [("none", {"method": "none"}), ("rc", {"method": "rc"})]
    for budget in BUDGETS:
        runs += [(f"{method}@{budget}", {"method": method, "budget": budget}) for method in METHODS if method != "none"]
    runs += [(f"{method} guidance=llm@0.1", {"method": method, "budget": 0.1, "guidance": "llm"}) for method in ("rc", "trsm")]
    return runs


def llava_rows() -> dict:
    """The mosaic rows of the LLaVA table (benchmarks/results/accuracy.json) at this table's settings, copied into
    this result when it is measured (so its tables do not change when the LLaVA result is regenerated)."""
    if not LLAVA_RESULT.exists():
        return {}
    keys = {key for key, _ in settings_to_run()}
    result = json.loads(LLAVA_RESULT.read_text())
    commit = result.get("provenance", {}).get("commit", "")[:10]
    return {
        row["key"]: {"kept_mean": row["mosaic_test"]["kept_mean"], "accuracy": row["mosaic_test"]["accuracy"],
                     "commit": commit}
        for row in result["rows"] if row["key"] in keys
    }


def llava_side_by_side(result: dict) -> list[str]:
    """The same settings on the LLaVA model, where both measured them: a line per setting with the mosaic accuracy
    of each family."""
    llava = result.get("llava_mosaic_rows", {})
    lines = []
    for row in result["rows"]:
        other = llava.get(row["key"])
        if other is None or row["budget"] is None:
            continue
        lines.append(
            f"| {settings_label(row['settings'], {})} | {other['kept_mean']:.0f} of 144 patches: "
            f"{other['accuracy']:.1%} | {row['mosaic_test']['kept_mean']:.0f} of 36 merged tokens "
            f"({4 * row['mosaic_test']['kept_mean']:.0f} patches): {row['mosaic_test']['accuracy']:.1%} |"
        )
    if not lines:
        return []
    return [
        "| setting | LLaVA-RC mosaic | Qwen2.5-VL-RC mosaic |",
        "|---|---|---|",
        *lines,
        "",
        "The LLaVA column is `benchmarks/results/accuracy.json` as it was when this table was measured (commit "
        f"{next(iter(llava.values()))['commit']}; its text-guided rows read CLIP's text tower, on Qwen the same "
        "settings run without guidance).",
    ]


def generated_sections(result: dict) -> dict[str, list[str]]:
    """The tables made from a result, by marker: the README summary (``accuracy-qwen``) and every row for
    docs/qwen.md (``accuracy-qwen-table``)."""
    rows = {row["key"]: row for row in result["rows"]}
    header = [
        f"| settings run | visual tokens per image | easy-VQA | mosaic | mosaic: {UNIQUE_OBJECT.replace('_', ' ')} |",
        "|---|---|---|---|---|",
    ]
    source = (
        f"{result['questions']['easy_vqa_test']} easy-VQA test and {result['questions']['mosaic_test']} mosaic test "
        f"questions (those of the LLaVA table), {result['num_tokens']} language-model tokens per image (2 x 2 merges "
        "of 144 ViT patches); a float budget is a share of those tokens; tokens are the mean kept per image on "
        "easy-VQA / mosaics; accuracy with its 95% Wilson interval; rows named by the settings passed (in brackets "
        f"the defaults they resolved to); torch {result['torch']}, transformers {result['transformers']} "
        "(`benchmarks/results/accuracy_qwen.json`). " + measured_at(result)
    )
    summary_keys = ["none", "rc", "rc@0.1", "rc guidance=llm@0.1"]
    others = [rows[f"{method}@0.1"] for method in METHODS if method not in ("none", "rc", "random")]
    best = max(others, key=lambda row: row["mosaic_test"]["accuracy"])
    summary = [table_row(rows[key]["label"], rows[key]) for key in summary_keys]
    summary += [table_row("best other: " + best["label"], best), table_row(rows["random@0.1"]["label"], rows["random@0.1"])]
    comparison = paired_comparison(rows["rc guidance=llm@0.1"]["mosaic_test"]["correct"], rows["trsm guidance=llm@0.1"]["mosaic_test"]["correct"])
    paired = (
        f"RC against TRSM with the language model's guidance at 10%, same mosaic questions: "
        f"{comparison['difference'] * 100:+.1f} points [{comparison['low'] * 100:+.1f}, {comparison['high'] * 100:+.1f}] "
        f"({comparison['only_first']} questions only RC answers, {comparison['only_second']} only TRSM; McNemar "
        f"p = {comparison['mcnemar_p']:.2g})."
    )
    every_row = [table_row(row["label"], row) for row in result["rows"]]
    return {
        "accuracy-qwen": [*header, *summary, "", source],
        "accuracy-qwen-table": [*header, *every_row, "", source, "", paired, "", *llava_side_by_side(result)],
    }


def committed_sections() -> dict[str, list[str]]:
    """The tables made from the committed ``benchmarks/results/accuracy_qwen.json``."""
    return generated_sections(json.loads((ROOT / "benchmarks" / "results" / "accuracy_qwen.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--questions", type=int, default=1000, help="easy-VQA test questions (as benchmarks/accuracy.py)")
    parser.add_argument("--mosaics", type=int, default=400, help="test mosaics (as benchmarks/accuracy.py)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--update-readme", action="store_true", help="regenerate the README and docs/qwen.md tables")
    parser.add_argument("--readme-only", action="store_true", help="only regenerate the tables from the saved JSON")
    args = parser.parse_args()
    if args.readme_only:
        for marker, lines in committed_sections().items():
            write_readme_section(marker, lines)
        return

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = load_processor(args.checkpoint)  # the stock processor's files, built without torchvision
    (singles, single_examples), (mosaics, mosaic_examples) = easyvqa.evaluation_sets(
        args.questions, args.mosaics, args.seed
    )
    datasets = {
        "easy_vqa_test": easyvqa.prepare_batches(processor, singles, single_examples, args.batch_size, PROMPT),
        "mosaic_test": easyvqa.prepare_batches(processor, mosaics, mosaic_examples, args.batch_size, PROMPT),
    }
    rows = []
    run_started = time.perf_counter()
    for key, settings in settings_to_run():
        started = time.perf_counter()
        resolved = model.compression_settings(settings).to_dict()
        row = {"key": key, "label": settings_label(settings, resolved), "method": settings["method"],
               "budget": settings.get("budget"), "settings": settings, "resolved": resolved}
        for name, batches in datasets.items():
            row[name] = easyvqa.evaluate(model, processor, batches, settings)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        measured = "  ".join(f"{name} {row[name]['accuracy']:.3f} ({row[name]['kept_mean']:.1f} tokens)"
                             for name in datasets)
        print(f"{key:24s} {measured}  unique {row['mosaic_test']['per_kind'][UNIQUE_OBJECT]:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    first = datasets["easy_vqa_test"][0].inputs
    num_tokens = int((first["input_ids"][0] == model.config.image_token_id).sum())
    result = {
        "checkpoint": str(args.checkpoint.relative_to(ROOT)) if args.checkpoint.is_relative_to(ROOT) else str(args.checkpoint),
        "num_tokens": num_tokens,
        "questions": {name: sum(len(batch.answers) for batch in batches) for name, batches in datasets.items()},
        "seed": args.seed,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": time.perf_counter() - run_started,
        "loadavg": os.getloadavg(),
        "rows": rows,
        "llava_mosaic_rows": llava_rows(),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    result = write_result(args.output_dir / "accuracy_qwen.json", result, extra_sources=checkpoint_sources(args.checkpoint))
    if args.update_readme:
        for marker, lines in generated_sections(result).items():
            write_readme_section(marker, lines)


if __name__ == "__main__":
    main()
