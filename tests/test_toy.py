"""The shipped toy Qwen2-VL: it answers held-out synthetic questions, pruning costs it accuracy, and the
training script runs end to end and writes a checkpoint the loader reads back."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from clse_exp.api import compose_config
from clse_exp.config import CONF_DIR
from clse_exp.runner import run
from clse_exp.toy.batches import evidence_targets, training_batch
from clse_exp.toy.curriculum import training_sample
from clse_exp.toy.train import build_untrained, save, train

HELDOUT = 256


@pytest.fixture(scope="module")
def accuracy_at(tmp_path_factory):
    """Accuracy of model=toy_qwen2vl on the held-out test split, by (method, keep); runs are cached."""
    cache: dict[tuple[str, float], float] = {}

    def measure(method: str, keep: float) -> float:
        if (method, keep) not in cache:
            cfg = compose_config(["model=toy_qwen2vl", f"prune={method}", f"keep={keep}", f"dataset.size={HELDOUT}",
                                  "eval.reference=false", "logger=none", "device=cpu", "batch_size=32"])
            summary = run(cfg, tmp_path_factory.mktemp(f"{method}{keep}"))
            cache[(method, keep)] = summary["metrics"]["accuracy"]
        return cache[(method, keep)]

    return measure


def test_toy_is_the_default_model():
    assert compose_config([]).model.name == "toy_qwen2vl"


def test_unpruned_toy_answers_heldout_questions(accuracy_at):
    assert accuracy_at("none", 1.0) >= 0.90


def test_random_pruning_to_a_tenth_costs_accuracy(accuracy_at):
    assert accuracy_at("random", 0.1) < accuracy_at("none", 1.0)


def test_evidence_targets_cover_the_named_cell():
    loaded = build_untrained(OmegaConf.to_container(compose_config(["model=toy_qwen2vl"]).model))
    sample = training_sample(3, seed=0, qtypes=["colour"], image_size=224, grid=3)
    batch = training_batch(loaded.adapter, loaded.processor, [sample])
    targets = evidence_targets(batch, [sample], loaded.model.config.image_token_id, grid=3)[0]
    visual = (batch["input_ids"][0] == loaded.model.config.image_token_id).nonzero().flatten()
    row, col = sample.meta["evidence"][0]
    expected = [visual[(2 * row + dr) * 6 + 2 * col + dc].item() for dr in (0, 1) for dc in (0, 1)]
    assert sorted(targets.nonzero().flatten().tolist()) == sorted(expected)
    assert targets.sum().item() == pytest.approx(1.0)
    labels = batch["labels"][0]
    answer = loaded.processor.tokenizer.decode(labels[labels != -100])
    assert answer == sample.answer + "<|im_end|>"


def test_training_script_writes_a_loadable_checkpoint(tmp_path):
    cfg = OmegaConf.to_container(compose_config(["model=toy_qwen2vl"]).model, resolve=True)
    train_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "toy_train.yaml"))
    train_cfg.pop("defaults"), train_cfg.pop("hydra")
    train_cfg.update(model=cfg, eval_size=4, log_every=1, out_dir=str(tmp_path))
    train_cfg["optim"].update(steps=2, batch_size=4)
    lines = []
    loaded, record = train(train_cfg, log=lines.append)
    assert len(record["losses"]) == 2 and lines[0].startswith("step 1/2")
    save(loaded, record, train_cfg, tmp_path)
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["heldout"]["accuracy"] == record["heldout"]["accuracy"]
    reloaded = compose_config(["model=toy_qwen2vl", f"model.weights={tmp_path / 'model.safetensors'}",
                               f"model.tiny.tokenizer_file={tmp_path / 'tokenizer.json'}"]).model
    from clse_exp import models

    again = models.load(reloaded, "cpu")
    sample = training_sample(0, seed=0, qtypes=["colour"], image_size=224, grid=3)
    inputs = loaded.prepare([sample])
    with torch.no_grad():
        torch.testing.assert_close(again.model(**again.prepare([sample])).logits, loaded.model(**inputs).logits)
