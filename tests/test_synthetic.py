"""The synthetic dataset: deterministic, split-disjoint, and its answers agree with its pixels."""

from __future__ import annotations

import pytest

from clse_exp.data.synthetic import (
    ANSWER_VOCAB,
    COLOURS,
    QTYPES,
    make_sample,
    synthetic_dataset,
)
from clse_exp.metrics.synthetic import normalize_answer, score


def test_same_arguments_give_identical_samples():
    a, b = make_sample(7, "test", seed=3), make_sample(7, "test", seed=3)
    assert a.images[0].tobytes() == b.images[0].tobytes() and a.question == b.question and a.answer == b.answer
    assert make_sample(7, "test", seed=4).images[0].tobytes() != a.images[0].tobytes()


def test_splits_are_disjoint():
    keys = {split: {(s.images[0].tobytes(), s.question) for s in synthetic_dataset(150, split)}
            for split in ("train", "validation", "test")}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]


def _answer_from_scene(meta: dict, question: str) -> str:
    """An independent re-derivation of the answer from the scene description."""
    scene, q = meta["scene"], question.lower()
    if meta["qtype"] in ("colour", "shape"):
        row, col = meta["cell"]
        item = next(s for s in scene if (s["row"], s["col"]) == (row, col))
        return item[meta["qtype"]]
    if meta["qtype"] == "count":
        return str(sum(s["colour"] in q.split() or f"{s['shape']}s" in q.split() for s in scene))
    if meta["qtype"] == "relation" and "pair" in meta:
        (r1, c1), (r2, c2) = meta["pair"]
        return "yes" if ((c1 < c2) if "left of" in q else (r1 < r2)) else "no"
    words = q.split()
    colour, shape = words[3], words[4]
    return "yes" if any(s["colour"] == colour and s["shape"] == shape for s in scene) else "no"


def test_answers_agree_with_scene_and_pixels():
    for sample in synthetic_dataset(60, "validation"):
        assert sample.answer == _answer_from_scene(sample.meta, sample.question)
        assert sample.answer in ANSWER_VOCAB
        grid, image = sample.meta["grid"], sample.images[0]
        cell = image.size[0] / grid
        for item in sample.meta["scene"]:
            centre = (int((item["col"] + 0.5) * cell), int((item["row"] + 0.6) * cell))
            assert image.getpixel(centre) == COLOURS[item["colour"]]


def test_every_question_type_appears_and_yes_no_is_balanced():
    samples = synthetic_dataset(200, "train")
    assert {s.meta["qtype"] for s in samples[:20]} == set(QTYPES)
    yes_no = [s.answer for s in samples if s.answer in ("yes", "no")]
    assert 0.3 < yes_no.count("yes") / len(yes_no) < 0.7


def test_variants_have_the_right_visual_inputs():
    assert len(make_sample(0, variant="multi_image").images) == 2
    video = make_sample(0, variant="video", num_frames=4)
    assert video.images == [] and len(video.video) == 4


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"split": "dev"}, "train, validation, test"),
    ({"variant": "gif"}, "image, multi_image, video"),
    ({"qtypes": ["size"]}, "exist"),
    ({"grid": 1}, "grid=1"),
    ({"image_size": 100}, "multiple of 28"),
    ({"variant": "video", "num_frames": 3}, "num_frames=3"),
])
def test_bad_arguments_name_the_value_and_choices(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_sample(0, **kwargs)


def test_scorer_normalises_the_first_word():
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("red, I think") == "red"
    docs = [{"answer": "yes", "qtype": "exist"}, {"answer": "2", "qtype": "count"}]
    assert score(docs, ["Yes.", "three"]) == {"accuracy": 0.5, "n": 2, "accuracy_count": 0.0, "accuracy_exist": 1.0}
