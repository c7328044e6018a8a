"""Accuracy vs kept visual tokens on easy-VQA test and mosaic test, for every registered method.

Loads the shipped tiny LLaVA-RC (``llava_rc/checkpoints/llava-rc-easyvqa``) through ``from_pretrained(...,
trust_remote_code=True)`` and answers each question with the first greedy token, with compression off, RC and
PruMerge(+) at their adaptive counts, and every method (and a content-blind random selection) at fixed budgets.
Writes ``benchmarks/results/accuracy.json`` and ``accuracy.png``; ``--update-readme`` regenerates the tables made
from them (README summary, docs/easyvqa.md, benchmarks/NOTES.md goals); ``--readme-only`` does that from the JSON.

    pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --update-readme  # ~15 min on 1 free CPU thread
    python benchmarks/accuracy.py --questions 200 --mosaics 50  # a quick look
    python benchmarks/accuracy.py --readme-only              # tables only, from the saved JSON
"""

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

from bench_common import ROOT, checkpoint_sources, measured_at, write_readme_section, write_result  # benchmarks/bench_common.py
from llava_rc import METHODS, easyvqa

CHECKPOINT = ROOT / "llava_rc" / "checkpoints" / "llava-rc-easyvqa"
BUDGETS = (0.5, 0.25, 0.1, 0.05)
TEXT_METHODS = ("rc", "trsm")  # the methods that read the question
VISION_ONLY = ("cls_attention", "prumerge", "prumerge_plus")
UNIQUE_OBJECT = "color_of_unique_shape"
# Defaults a row's label spells out when the run did not set them (what they resolved to on the model): the
# settings this release changed or made model-dependent. accuracy.json holds every row's full resolved settings.
SHOWN_DEFAULTS = ("guidance", "recovered_share", "token_order")


# Our variations of the baselines (named options, off by default), measured beside the released defaults.
ADAPTIVE_VARIANTS = [
    ("prumerge merge=average (ours before)", "prumerge",
     {"merge": "average", "attention": "per_head", "extra_token": False}),
    ("prumerge merge=none", "prumerge", {"merge": "none"}),
    ("prumerge_plus merge=none", "prumerge_plus", {"merge": "none"}),
    ("prumerge_plus lattice, merge=average (ours before)", "prumerge_plus",
     {"sampling": "lattice", "merge": "average", "attention": "per_head", "extra_token": False}),
    ("prumerge raster order", "prumerge", {"token_order": "raster"}),
    ("prumerge_plus raster order", "prumerge_plus", {"token_order": "raster"}),
]
BUDGET_VARIANTS = [
    ("prumerge merge=average", "prumerge", {"merge": "average", "attention": "per_head", "extra_token": False}),
    ("prumerge no extra token", "prumerge", {"extra_token": False}),
    ("prumerge merge=none", "prumerge", {"merge": "none"}),
    ("trsm merge=nearest", "trsm", {"merge": "nearest"}),
    ("prumerge raster order", "prumerge", {"token_order": "raster"}),
    ("prumerge_plus raster order", "prumerge_plus", {"token_order": "raster"}),
]
# Measured only at the budgets the README compares: the budget split before recovered_share, and "llm" guidance.
SUMMARY_BUDGETS = (0.1, 0.05)
SUMMARY_VARIANTS = [
    ("rc proportional split", "rc", {"recovered_share": None}),
    ("trsm guidance=llm", "trsm", {"guidance": "llm"}),
    ("rc guidance=llm", "rc", {"guidance": "llm"}),
    ("rc vision only", "rc", {"guidance": None}),
    ("trsm guidance=None", "trsm", {"guidance": None}),
]


def settings_to_run() -> list[tuple[str, str, dict, bool]]:
    """(key, method, settings, variant): compression off, the adaptive methods, every method at every budget
    (the registered defaults), then our variants (``variant`` True: kept out of the goals and the plot's main
    lines). ``key`` finds a row; the tables label each row from its settings (``settings_label``)."""
    runs = [
        ("none", "none", {"method": "none"}, False),
        ("rc", "rc", {"method": "rc"}, False),
        ("rc (vision only)", "rc", {"method": "rc", "guidance": None}, False),
        ("prumerge", "prumerge", {"method": "prumerge"}, False),
        ("prumerge_plus", "prumerge_plus", {"method": "prumerge_plus"}, False),
    ]
    for budget in BUDGETS:
        for method in METHODS:
            if method == "none":
                continue
            runs.append((f"{method}@{budget}", method, {"method": method, "budget": budget}, False))
    runs += [(label, method, {"method": method, **settings}, True) for label, method, settings in ADAPTIVE_VARIANTS]
    for budget in BUDGETS:
        for label, method, settings in BUDGET_VARIANTS:
            runs.append((f"{label}@{budget}", method, {"method": method, "budget": budget, **settings}, True))
    for budget in SUMMARY_BUDGETS:
        for label, method, settings in SUMMARY_VARIANTS:
            runs.append((f"{label}@{budget}", method, {"method": method, "budget": budget, **settings}, True))
    return runs


def settings_label(settings: dict, resolved: dict) -> str:
    """A row's name made from the settings dict the run passed (``method`` then ``key=value``), and in brackets
    the ``SHOWN_DEFAULTS`` it ran with without setting them (as resolved on the model)."""
    given = " ".join(f"{key}={value}" for key, value in settings.items() if key != "method")
    implied = [
        f"{key}={resolved[key]}"
        for key in SHOWN_DEFAULTS
        if key in resolved and key not in settings and (key != "recovered_share" or settings.get("budget") is not None)
    ]
    label = f"`{settings['method']}`" + (f" {given}" if given else "")
    return label + (f" ({', '.join(implied)})" if implied else "")


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96)."""
    if total == 0:
        return 0.0, 1.0
    share = correct / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparison(first: str, second: str, z: float = 1.96) -> dict:
    """Two settings on the same questions (``correct`` strings): the accuracy difference first - second with its
    95% interval for paired proportions, and the exact (binomial) two-sided McNemar p-value on the discordant
    questions."""
    if len(first) != len(second):
        raise ValueError(f"paired results must cover the same questions, got {len(first)} and {len(second)}")
    total = len(first)
    only_first = sum(a == "1" and b == "0" for a, b in zip(first, second))
    only_second = sum(a == "0" and b == "1" for a, b in zip(first, second))
    difference = (only_first - only_second) / total
    spread = math.sqrt(max(only_first + only_second - (only_first - only_second) ** 2 / total, 0.0)) / total
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1)) / 2**discordant
    return {
        "difference": difference,
        "low": difference - z * spread,
        "high": difference + z * spread,
        "only_first": only_first,
        "only_second": only_second,
        "mcnemar_p": min(1.0, 2 * tail),
    }


def goals(rows: list[dict], num_patches: int) -> dict:
    """The issue's goals, checked on the measured rows."""
    rows = [row for row in rows if not row.get("variant")]
    fixed = [row for row in rows if row["budget"] is not None]
    full = next(row for row in rows if row["method"] == "none")
    checks = {}
    for dataset in ("easy_vqa_test", "mosaic_test"):
        for budget in BUDGETS:
            at_budget = {row["method"]: row[dataset]["accuracy"] for row in fixed if row["budget"] == budget}
            best_other = max(value for method, value in at_budget.items() if method != "rc")
            checks[f"{dataset}: rc >= every other method at {budget:.0%}"] = {
                "rc": at_budget["rc"],
                "best_other": best_other,
                "met": at_budget["rc"] >= best_other,
            }
            checks[f"{dataset}: rc above random at {budget:.0%} (by >= 5 points)"] = {
                "rc": at_budget["rc"],
                "random": at_budget["random"],
                "met": at_budget["rc"] - at_budget["random"] >= 0.05,
            }
    # RC at <= 15% of the tokens keeps >= 95% of full-token accuracy on easy-VQA (adaptive RC and RC at 10%).
    for row in rows:
        if row["method"] == "rc" and row["key"] in ("rc", "rc@0.1"):
            share = row["easy_vqa_test"]["kept_mean"] / num_patches
            kept = row["easy_vqa_test"]["accuracy"] / full["easy_vqa_test"]["accuracy"]
            checks[f"easy_vqa_test: {row['key']} keeps >= 95% of full accuracy at <= 15% tokens"] = {
                "token_share": share,
                "relative_accuracy": kept,
                "met": share <= 0.15 and kept >= 0.95,
            }
    # Unique-object mosaic questions: text-guided beats vision-only at the same budget by >= 5 points.
    for budget in BUDGETS:
        by_method = {row["method"]: row["mosaic_test"]["per_kind"][UNIQUE_OBJECT] for row in fixed if row["budget"] == budget}
        guided = min(by_method[method] for method in TEXT_METHODS)
        vision = max(by_method[method] for method in VISION_ONLY)
        checks[f"mosaic {UNIQUE_OBJECT}: text-guided (rc, trsm) beat vision-only by >= 5 points at {budget:.0%}"] = {
            "worst_text_guided": guided,
            "best_vision_only": vision,
            "met": guided - vision >= 0.05,
        }
    # RC with a budget against TRSM on the same mosaic questions (paired): >= at 10%, within 2 points at 5%.
    for budget, margin in ((0.1, 0.0), (0.05, 0.02)):
        comparison = rc_against_trsm(rows, budget)
        name = f"mosaic_test: rc >= trsm at {budget:.0%}" if not margin else (
            f"mosaic_test: rc within {margin * 100:.0f} points of trsm at {budget:.0%}")
        checks[name] = {**{key: comparison[key] for key in ("difference", "low", "high", "mcnemar_p")},
                        "met": comparison["difference"] >= -margin}
    return checks


def rc_against_trsm(rows: list[dict], budget: float, dataset: str = "mosaic_test") -> dict:
    """Paired comparison of RC and TRSM at their defaults at ``budget`` on the same questions (rc - trsm)."""
    rc, trsm = default_row(rows, "rc", budget), default_row(rows, "trsm", budget)
    return paired_comparison(rc[dataset]["correct"], trsm[dataset]["correct"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [
        ("easy_vqa_test", "accuracy", "easy-VQA test"),
        ("mosaic_test", "accuracy", "mosaic test"),
        ("mosaic_test", UNIQUE_OBJECT, "mosaic: color of the unique shape"),
    ]
    full = next(row for row in result["rows"] if row["method"] == "none")
    for axis, (dataset, metric, title) in zip(axes, panels):
        def value(row):
            return row[dataset]["accuracy"] if metric == "accuracy" else row[dataset]["per_kind"][metric]

        colours = {}
        for method in [m for m in METHODS if m != "none"]:
            points = sorted(
                (row[dataset]["kept_mean"], value(row))
                for row in result["rows"]
                if row["method"] == method and row["budget"] is not None and not row.get("variant")
            )
            line = axis.plot(*zip(*points), marker="o", label=method)[0]
            colours[method] = line.get_color()
            for row in result["rows"]:
                if row["method"] == method and row["budget"] is None and not row.get("variant"):
                    axis.scatter(row[dataset]["kept_mean"], value(row), marker="*", s=160, color=line.get_color())
        styles = [("--", "x"), (":", "v"), ("-.", "s")]
        for index, (label, method, _) in enumerate(BUDGET_VARIANTS):  # our variants, in their method's colour
            earlier = sum(other == method for _, other, _ in BUDGET_VARIANTS[:index])
            linestyle, marker = styles[earlier % len(styles)]
            points = sorted(
                (row[dataset]["kept_mean"], value(row))
                for row in result["rows"]
                if row.get("variant") and row["key"].startswith(label + "@")
            )
            axis.plot(*zip(*points), marker=marker, linestyle=linestyle, color=colours[method],
                      label=f"{label} (variant)")
        axis.axhline(value(full), color="black", linestyle="--", label="all tokens")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("mean visual tokens per image (stars: adaptive count)")
        axis.set_ylabel("accuracy")
        axis.set_title(title)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


SUMMARY_BUDGET = 0.1  # the README compares methods at 10% of the patches


def default_row(rows: list[dict], method: str, budget: float) -> dict | None:
    """The row of ``method`` at ``budget`` with its default settings (key ``method@budget``; variants differ)."""
    return next((row for row in rows if row["key"] == f"{method}@{budget}"), None)


def summary_rows(rows: list[dict]) -> list[tuple[str, dict]]:
    """(label, row) for the README: all tokens, adaptive RC, RC at 10%, the best other method at 10% (by mosaic
    accuracy, where token choice matters) and random at 10%; each labelled by the settings it ran."""
    others = [
        default_row(rows, method, SUMMARY_BUDGET) for method in METHODS if method not in ("none", "rc", "random")
    ]
    best = max((row for row in others if row is not None), key=lambda row: row["mosaic_test"]["accuracy"])
    chosen = [
        ("", next(row for row in rows if row["key"] == "none")),
        ("", next(row for row in rows if row["key"] == "rc")),
        ("", default_row(rows, "rc", SUMMARY_BUDGET)),
        ("best other: ", best),
        ("", default_row(rows, "random", SUMMARY_BUDGET)),
    ]
    return [(prefix + row["label"], row) for prefix, row in chosen]


def percent_with_interval(result: dict) -> str:
    """Accuracy with its 95% Wilson interval, in percent."""
    correct = result["correct"]
    low, high = wilson_interval(correct.count("1"), len(correct))
    return f"{result['accuracy']:.1%} [{low * 100:.1f}, {high * 100:.1f}]"


def table_row(label: str, row: dict) -> str:
    return (
        f"| {label} | {row['easy_vqa_test']['kept_mean']:.1f} / {row['mosaic_test']['kept_mean']:.1f} | "
        f"{percent_with_interval(row['easy_vqa_test'])} | {percent_with_interval(row['mosaic_test'])} | "
        f"{row['mosaic_test']['per_kind'][UNIQUE_OBJECT]:.1%} |"
    )


def comparison_lines(rows: list[dict]) -> list[str]:
    """RC against TRSM at every budget on the same mosaic questions: difference, interval, McNemar p."""
    lines = []
    for budget in BUDGETS:
        comparison = rc_against_trsm(rows, budget)
        rc, trsm = default_row(rows, "rc", budget), default_row(rows, "trsm", budget)
        lines.append(
            f"- at {budget:.0%}: {rc['label']} {rc['mosaic_test']['accuracy']:.1%} vs {trsm['label']} "
            f"{trsm['mosaic_test']['accuracy']:.1%}: {comparison['difference'] * 100:+.1f} points "
            f"[{comparison['low'] * 100:+.1f}, {comparison['high'] * 100:+.1f}] "
            f"({comparison['only_first']} questions only RC answers, {comparison['only_second']} only TRSM; "
            f"McNemar p = {comparison['mcnemar_p']:.2g})"
        )
    return lines


def generated_sections(result: dict) -> dict[str, list[str]]:
    """The tables made from a result, by marker: the README's summary (``accuracy``), every row for
    docs/easyvqa.md (``accuracy-table``) and the goal checks for benchmarks/NOTES.md (``accuracy-goals``)."""
    header = [
        f"| settings run | visual tokens per image | easy-VQA | mosaic | mosaic: {UNIQUE_OBJECT.replace('_', ' ')} |",
        "|---|---|---|---|---|",
    ]
    source = (
        f"{result['questions']['easy_vqa_test']} easy-VQA test and {result['questions']['mosaic_test']} mosaic test "
        f"questions, {result['num_patches']} patch tokens per image; tokens are the mean kept per image on easy-VQA / "
        f"mosaics; accuracy with its 95% Wilson interval; torch {result['torch']}, transformers "
        f"{result['transformers']} (`benchmarks/results/accuracy.json`). "
        + measured_at(result)
    )
    naming = (
        "Each row is named by the settings passed to the model (`method`, then `key=value`; a float budget is a "
        f"share of the patches) and, in brackets, the defaults it ran with for {', '.join(SHOWN_DEFAULTS)}."
    )
    summary = [table_row(label, row) for label, row in summary_rows(result["rows"])]
    best_other_note = (
        f"Best other: the highest mosaic accuracy at {SUMMARY_BUDGET:.0%} among the other methods at their default "
        "settings."
    )
    paired = [
        "RC against TRSM at the same budget, on the same mosaic questions (paired: difference with its 95% "
        "interval, exact McNemar test):",
        "",
        *comparison_lines(result["rows"]),
    ]
    every_row = [table_row(row["label"], row) for row in result["rows"]]
    goal_lines = []
    for name, check in result["goals"].items():
        detail = ", ".join(f"{key} {value:.3f}" for key, value in check.items() if key != "met")
        goal_lines.append(f"- {'met' if check['met'] else '**missed**'}: {name} ({detail})")
    return {
        "accuracy": [*header, *summary, "", f"{best_other_note} {naming} {source}", "", *paired],
        "accuracy-table": [*header, *every_row, "", f"{naming} {source}", "", *paired],
        "accuracy-goals": [*goal_lines, "", measured_at(result)],
    }


def committed_sections() -> dict[str, list[str]]:
    """The tables made from the committed ``benchmarks/results/accuracy.json``."""
    return generated_sections(json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text()))


def update_readme(result: dict) -> None:
    """Regenerate every table made from a result between its markers (README, docs/easyvqa.md, NOTES.md)."""
    for marker, lines in generated_sections(result).items():
        write_readme_section(marker, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--questions", type=int, default=1000, help="easy-VQA test questions (seeded sample)")
    parser.add_argument("--mosaics", type=int, default=400, help="test mosaics (about 3.7 questions each)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--update-readme", action="store_true", help="regenerate the README, docs/easyvqa.md and NOTES.md tables"
    )
    parser.add_argument(
        "--readme-only", action="store_true", help="only regenerate those tables from the saved accuracy.json"
    )
    parser.add_argument(
        "--only", action="append", metavar="KEY",
        help="run only the rows with this key (repeatable, e.g. rc@0.1 trsm@0.1); writes accuracy_subset.json, no "
        "tables, goals or plot",
    )
    parser.add_argument("--mosaics-only", action="store_true", help="with --only: skip the easy-VQA questions")
    args = parser.parse_args()
    if args.readme_only:
        update_readme(json.loads((args.output_dir / "accuracy.json").read_text()))
        return

    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint, trust_remote_code=True)
    (singles, single_examples), (mosaics, mosaic_examples) = easyvqa.evaluation_sets(
        args.questions, args.mosaics, args.seed
    )
    datasets = {
        "easy_vqa_test": easyvqa.prepare_batches(processor, singles, single_examples, args.batch_size),
        "mosaic_test": easyvqa.prepare_batches(processor, mosaics, mosaic_examples, args.batch_size),
    }
    runs = settings_to_run()
    if args.only:
        unknown = sorted(set(args.only) - {key for key, *_ in runs})
        if unknown:
            parser.error(f"--only: unknown row keys {unknown}; known: {[key for key, *_ in runs]}")
        runs = [run for run in runs if run[0] in args.only]
        if args.mosaics_only:
            del datasets["easy_vqa_test"]
    rows = []
    run_started = time.perf_counter()
    for key, method, settings, variant in runs:
        started = time.perf_counter()
        resolved = model.compression_settings(settings).to_dict()  # what the model runs for these settings
        row = {"key": key, "label": settings_label(settings, resolved), "method": method,
               "budget": settings.get("budget"), "settings": settings, "resolved": resolved, "variant": variant}
        for name, batches in datasets.items():
            row[name] = easyvqa.evaluate(model, processor, batches, settings)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        measured = "  ".join(f"{name} {row[name]['accuracy']:.3f} ({row[name]['kept_mean']:.1f} tokens)"
                             for name in datasets)
        print(f"{key:24s} {measured}  unique {row['mosaic_test']['per_kind'][UNIQUE_OBJECT]:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
    num_patches = model.config.image_seq_length
    result = {
        "checkpoint": str(args.checkpoint.relative_to(ROOT)) if args.checkpoint.is_relative_to(ROOT) else str(args.checkpoint),
        "num_patches": num_patches,
        "questions": {name: sum(len(batch.answers) for batch in batches) for name, batches in datasets.items()},
        "seed": args.seed,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": time.perf_counter() - run_started,
        "loadavg": os.getloadavg(),
        "rows": rows,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.only:
        (args.output_dir / "accuracy_subset.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    result["goals"] = goals(rows, num_patches)
    result = write_result(args.output_dir / "accuracy.json", result, extra_sources=checkpoint_sources(args.checkpoint))
    plot(result, args.output_dir / "accuracy.png")
    for name, check in result["goals"].items():
        print(("met     " if check["met"] else "MISSED  ") + name)
    if args.update_readme:
        update_readme(result)


if __name__ == "__main__":
    main()
