"""The ``demo`` task set: tiny offline tasks for lmms-eval and lm-eval, as local task folders (an include path)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llamafactory_hera.evaluation.presets import DEMO_MLLM_TASK, DEMO_TEXT_TASK

LETTERS = "ABCD"
_MLLM_ITEMS = (  # (shape, colour, background, asked)
    ("circle", "red", "white", "colour"),
    ("square", "blue", "yellow", "shape"),
    ("triangle", "green", "black", "colour"),
    ("cross", "yellow", "blue", "shape"),
    ("square", "purple", "white", "colour"),
    ("circle", "orange", "black", "shape"),
    ("cross", "white", "red", "colour"),
    ("triangle", "black", "white", "shape"),
)
_IMAGE_SIZES = ((48, 48), (96, 64), (40, 72), (128, 128), (64, 48), (56, 112), (32, 32), (80, 80))  # (width, height)
_OPTIONS = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "shape": ("circle", "square", "triangle", "cross"),
}
_TEXT_ITEMS = (
    ("What colour is the sky on a clear day?", ("green", "blue", "red", "black"), 1),
    ("How many legs does a dog have?", ("two", "six", "four", "eight"), 2),
    ("Which animal says meow?", ("cat", "cow", "dog", "duck"), 0),
    ("What do bees make?", ("milk", "silk", "wool", "honey"), 3),
    ("Which is the largest?", ("a mouse", "an elephant", "a cat", "a bee"), 1),
    ("What falls from clouds?", ("rain", "sand", "bread", "paper"), 0),
    ("Which season is the coldest?", ("summer", "spring", "winter", "autumn"), 2),
    ("What do you use to write?", ("a spoon", "a shoe", "a cup", "a pen"), 3),
)


def mllm_rows() -> list[dict[str, Any]]:
    rows = []
    for index, (shape, colour, background, asked) in enumerate(_MLLM_ITEMS):
        truth = colour if asked == "colour" else shape
        others = [o for o in _OPTIONS[asked] if o != truth and o != background][:3]
        options = [*others[: index % 4], truth, *others[index % 4 :]]  # the answer's letter cycles A, B, C, D
        rows.append(
            {
                "id": index,
                "shape": shape,
                "colour": colour,
                "background": background,
                "seed": 1000 + index,
                "size": list(_IMAGE_SIZES[index]),
                "question": f"What {asked} is the object in the image?",
                "options": options,
                "answer": LETTERS[options.index(truth)],
            }
        )
    return rows


def text_rows() -> list[dict[str, Any]]:
    return [{"id": i, "question": q, "choices": list(c), "answer": a} for i, (q, c, a) in enumerate(_TEXT_ITEMS)]


def mllm_doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """The row's RGB image of ``size`` [width, height]: the shape on a square of the shorter side, centred."""
    # lazy: the demo task's images, drawn only for it
    import numpy as np
    from PIL import Image

    # lazy: as above
    from llamafactory_hera.fixtures.dataset import IMAGE_SIZE, draw_shape

    width, height = doc.get("size") or (IMAGE_SIZE, IMAGE_SIZE)
    side = min(width, height)
    square = draw_shape(
        np.random.default_rng(doc["seed"]), doc["shape"], doc["colour"], doc["background"], scale="large", size=side
    )
    if width == height:
        return [square]
    canvas = Image.new("RGB", (width, height), square.getpixel((0, 0)))
    canvas.paste(square, ((width - side) // 2, (height - side) // 2))
    return [canvas]


def mllm_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    options = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(doc["options"]))
    return f"{doc['question']}\n{options}\nAnswer with the option's letter from the given choices directly."


_ANSWER_PATTERNS = (
    r"(?i:answer is|answer:)\s*\(?([A-D])\b",  # "... so the answer is B."
    r"^\s*\(?([A-D])(?:[.):]|$|\s(?![a-z]))",  # "B", "(C) a circle", "D. ..."; not "A red circle"
    r"\b([A-D])\b(?!\s+[a-z])",  # a letter standing alone, not the article in "A blue square"
)


def answer_letter(text: str) -> str | None:
    for pattern in _ANSWER_PATTERNS:
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    return None


def mllm_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"accuracy": float(answer_letter(results[0] if results else "") == doc["answer"])}


_MLLM_YAML = f"""task: {DEMO_MLLM_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.mllm_doc_to_visual
doc_to_text: !function utils.mllm_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 32
  temperature: 0
  do_sample: false
process_results: !function utils.mllm_process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""
_TEXT_YAML = f"""task: {DEMO_TEXT_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""
_UTILS = (
    "# callbacks of the llamafactory-hera demo task (see llamafactory_hera.evaluation.demo_tasks)\n"
    "from llamafactory_hera.evaluation.demo_tasks import (  # noqa: F401\n"
    "    mllm_doc_to_text, mllm_doc_to_visual, mllm_process_results)\n"
)


def write_demo_tasks(folder: Path, library: str) -> Path:
    """Write ``library``'s demo task into ``folder``; return it (the include path)."""
    mllm = library == "lmms-eval"
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / ("demo_mllm.jsonl" if mllm else "demo_text.jsonl")
    data.write_text("".join(json.dumps(row) + "\n" for row in (mllm_rows() if mllm else text_rows())), encoding="utf-8")
    yaml_text = (_MLLM_YAML if mllm else _TEXT_YAML).replace("{data}", str(data))
    (folder / f"{DEMO_MLLM_TASK if mllm else DEMO_TEXT_TASK}.yaml").write_text(yaml_text, encoding="utf-8")
    if mllm:
        (folder / "utils.py").write_text(_UTILS, encoding="utf-8")
    return folder
