"""The public entry point: a registry of task names, and errors that name the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import clse_exp
from clse_exp.metrics import SCORERS, TASKS, score

LMMS_EVAL_TASKS = {"pope", "mme", "gqa", "textvqa_val", "vizwiz_vqa_val", "scienceqa_img", "mmbench_en_dev",
                   "mmbench_cn_dev", "ocrbench", "mmstar", "seedbench", "videomme", "mvbench", "egoschema_subset",
                   "longvideobench_val_v"}


def test_tasks_are_the_sorted_registry_names():
    assert TASKS == tuple(sorted(SCORERS))
    assert LMMS_EVAL_TASKS | {"pope_llava", "textvqa_val_ocr"} <= set(TASKS)


def test_every_dataset_config_names_a_scorer():
    conf = Path(clse_exp.__file__).parent / "conf" / "dataset"
    for path in conf.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("task", cfg["name"]) in TASKS, path.name


def test_unknown_task_names_itself_and_lists_the_choices():
    with pytest.raises(ValueError, match=r"task='popee'.*gqa.*vizwiz_vqa_val"):
        score("popee", [{"answer": "yes"}], ["yes"])


def test_length_mismatch_and_empty_input_are_refused():
    with pytest.raises(ValueError, match="2 docs but 1 predictions"):
        score("gqa", [{"answer": "a"}] * 2, ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score("gqa", [], [])


@pytest.mark.parametrize(("task", "doc", "keys"), [
    ("pope", {"answer": "yes"}, {"pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score",
                                 "pope_yes_ratio"}),
    ("mme", {"question_id": "a", "answer": "Yes", "category": "color"}, {"mme_perception_score",
                                                                        "mme_cognition_score"}),
    ("gqa", {"answer": "yes"}, {"exact_match"}),
    ("textvqa_val", {"answers": ["yes"] * 10}, {"exact_match"}),
    ("vizwiz_vqa_val", {"answers": ["yes"] * 10}, {"exact_match"}),
    ("scienceqa_img", {"answer": 0}, {"exact_match"}),
    ("mmbench_en_dev", {"index": 0, "answer": "A", "A": "yes", "B": "no"}, {"gpt_eval_score"}),
    ("ocrbench", {"dataset": "x", "question_type": "Doc-oriented VQA", "answer": ["yes"]},
     {"ocrbench_accuracy"}),
    ("mmstar", {"answer": "A", "category": "math", "l2_category": "numeric"}, {"average", "math"}),
    ("seedbench", {"answer": "A", "data_type": "image"}, {"seed_image", "seed_all"}),
    ("videomme", {"answer": "A"}, {"videomme_perception_score"}),
    ("mvbench", {"candidates": ["yes", "no"], "answer": "yes"}, {"mvbench_accuracy"}),
    ("egoschema_subset", {"option": [f"{x}. o" for x in "ABCDE"], "answer": "0"}, {"score"}),
    ("longvideobench_val_v", {"correct_choice": 0, "duration_group": 15, "question_category": "S2E"}, {"lvb_acc"}),
])
def test_metric_keys_are_lmms_evals(task, doc, keys):
    assert keys <= set(score(task, [doc], ["A"]))


def test_the_full_egoschema_test_is_not_offered():
    """Its answers are not public (lmms-eval@75571cfe0fa3:lmms_eval/tasks/egoschema/egoschema.yaml:10, a server
    submission); only the 500-question subset is scored."""
    assert "egoschema" not in TASKS
    with pytest.raises(ValueError, match="task='egoschema'.*egoschema_subset"):
        score("egoschema", [{"answer": None}], ["A"])
