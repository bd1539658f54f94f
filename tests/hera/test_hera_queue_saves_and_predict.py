"""A HeRA run of the feature queue saving several checkpoints on two ranks, and then evaluating and writing
predictions as LLaMA-Factory's SFT does (``do_eval``; ``do_predict`` with ``predict_with_generate``).

Each rank writes its own ``hera_queue_rank<N>.pt`` while only the main process writes the model: a rank that gets
there first must find the checkpoint's folder (it failed "Parent directory .../checkpoint-2 does not exist").
``predict_with_generate``'s batches hold the prompt as input and the answer alone as labels, shorter than the input:
HeRA's collator must pass them as the host's collator makes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from dist_runs import launch_runs

from conftest import base_recipe, offline_env
from llamafactory_hera.hera.collator import HeraCollatorMixin
from llamafactory_hera.hera.loss import FeatureQueue
from llamafactory_hera.hera.saved_state import save_optimizer_state

# LLaMA-Factory's parse requires jieba, nltk and rouge_chinese for predict_with_generate (its similarity metrics); the
# test extra installs nltk alone (for the eval extra), so the predicting run sees nltk and these stand-ins (a module and
# its dist-info each)
METRIC_STAND_INS = {
    "jieba": "def cut(text):\n    return iter(text.split())\n",
    "rouge_chinese": (
        "class Rouge:\n"
        "    def get_scores(self, hypothesis, reference):\n"
        "        same = float(hypothesis == reference)\n"
        "        return [{key: {'f': same} for key in ('rouge-1', 'rouge-2', 'rouge-l')}]\n"
    ),
}


def metric_stand_ins(folder: Path) -> Path:
    """A folder for ``PYTHONPATH`` holding :data:`METRIC_STAND_INS` as installed packages."""
    for name, source in METRIC_STAND_INS.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(source)
        info = folder / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    return folder


def test_each_rank_makes_the_checkpoint_folder_it_writes_its_queue_into(tmp_path: Path) -> None:
    """Rank 1 before rank 0 has written the model: its queue file lands in the folder it made."""
    queue = FeatureQueue(4)
    queue.push(torch.ones(1, 2, 3), torch.ones(2, 5))
    folder = tmp_path / "out" / "checkpoint-2"
    save_optimizer_state(str(folder), None, queue, process_index=1, should_save=False)
    assert torch.load(folder / "hera_queue_rank1.pt", weights_only=True)["teacher"].shape == (2, 5)


class _HostCollator:
    """Pads ``input_ids`` and ``labels`` each to its own longest row, as LLaMA-Factory's collator does."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in ("input_ids", "labels"):
            width = max(len(feature[key]) for feature in features)
            batch[key] = torch.tensor([feature[key] + [-100] * (width - len(feature[key])) for feature in features])
        return batch


class _Collator(HeraCollatorMixin, _HostCollator):
    hera_multimodal_ids = frozenset({7})


def test_a_generation_batch_passes_the_collator_as_the_hosts() -> None:
    """predict_with_generate's rows: labels (the answer) shorter than the input (the prompt); the batch is the
    host's, with no pooling (before: "The size of tensor a (2) must match the size of tensor b (4)")."""
    features = [{"input_ids": [1, 7, 3, 4], "labels": [5, 6], "images": []} for _ in range(2)]
    batch = _Collator()(features)
    assert sorted(batch) == ["input_ids", "labels"]
    assert batch["labels"].shape == (2, 2)
    training = _Collator()([{"input_ids": [1, 7, 3, 4], "labels": [-100, -100, 3, 4], "images": []}])
    assert training["hera_pooling_weights"].tolist() == [[0.0, 0.0, 0.5, 0.5]]


def test_queue_saves_then_eval_and_predictions_on_two_ranks(assets, tmp_path: Path) -> None:
    """Batch 1 on 2 ranks with k=3: the queue is on; 3 steps, a checkpoint at each, every rank's queue in each. Then
    LLaMA-Factory's evaluation (``do_eval``) and, in a second run, ``do_predict`` with ``predict_with_generate``
    write their metrics and predictions."""
    common = dict(per_device_train_batch_size=1, per_device_eval_batch_size=2, hera_k=3, max_samples=8,
                  eval_dataset="hera_demo", save_strategy="steps", save_steps=1)
    evaluated = tmp_path / "eval" / "out"
    predicted = tmp_path / "predict" / "out"
    runs = [
        {"recipe": base_recipe(assets, "qwen2_5_vl", evaluated, do_eval=True, **common)},
        {"recipe": base_recipe(assets, "qwen2_5_vl", predicted, max_steps=1, do_predict=True,
                               predict_with_generate=True, max_new_tokens=4, **common)},
    ]
    stand_ins = metric_stand_ins(tmp_path / "metric_stand_ins")
    hidden = [name for name in offline_env(tmp_path)["HERA_TESTS_HIDDEN"].split(",") if name != "nltk"]
    results = launch_runs(runs, tmp_path, 2, env={"PYTHONPATH": str(stand_ins), "HERA_TESTS_HIDDEN": ",".join(hidden)})
    assert "queue " in results[0]["stdout"] and "queue off" not in results[0]["stdout"]
    assert [entry["hera_queue_size"] > 0 for entry in results[0]["logs"]] == [True] * 3
    for step in (1, 2, 3):
        names = {path.name for path in (evaluated / f"checkpoint-{step}").iterdir()}
        assert {"hera_queue_rank0.pt", "hera_queue_rank1.pt", "hera_state.json"} <= names, (step, names)
    assert "eval_loss" in json.loads((evaluated / "eval_results.json").read_text())
    metrics = json.loads((predicted / "predict_results.json").read_text())
    assert "predict_rouge-1" in metrics, metrics
    lines = (predicted / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8
    assert {"prompt", "predict", "label"} <= set(json.loads(lines[0]))
