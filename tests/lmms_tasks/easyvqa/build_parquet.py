"""Writes easyvqa_test.parquet: easy-VQA test questions with their images, for the local lmms-eval task.

The questions are the first ``--questions`` of the seeded sample that ``benchmarks/accuracy.py`` draws
(``easyvqa.evaluation_sets``), so lmms-eval and the project's own benchmark can be compared on the same ones.

    pip install -e ".[test,eval]" && python tests/lmms_tasks/easyvqa/build_parquet.py
"""

import argparse
import io
from pathlib import Path

from datasets import Dataset, Features, Image, Value

from llava_rc import easyvqa

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "easyvqa_test.parquet")
    args = parser.parse_args()

    (scenes, examples), _ = easyvqa.evaluation_sets(args.questions, 1, args.seed)
    by_key = {scene.key: scene for scene in scenes}
    rows = {"question_id": [], "image_key": [], "image": [], "question": [], "answer": [], "kind": []}
    for number, example in enumerate(examples):
        png = io.BytesIO()
        by_key[example.image_key].image().save(png, format="PNG")
        rows["question_id"].append(number)
        rows["image_key"].append(example.image_key)
        rows["image"].append({"bytes": png.getvalue(), "path": None})
        rows["question"].append(example.question)
        rows["answer"].append(example.answer)
        rows["kind"].append(example.kind)
    features = Features(
        {
            "question_id": Value("int64"),
            "image_key": Value("string"),
            "image": Image(),
            "question": Value("string"),
            "answer": Value("string"),
            "kind": Value("string"),
        }
    )
    Dataset.from_dict(rows, features=features).to_parquet(args.output)


if __name__ == "__main__":
    main()
