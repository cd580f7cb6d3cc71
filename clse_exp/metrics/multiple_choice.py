"""Image multiple-choice scorers, each with its task's own answer-reading rule as lmms-eval has it:
ScienceQA-IMG, SEED-Bench and MMStar (HEAD, and v0.3.0 as `*_legacy` where the rule changed).
"""

from __future__ import annotations

from collections import defaultdict

from clse_exp.metrics.mcq_extract import extract_letter

__all__ = ["extract_letter", "mmstar", "mmstar_legacy", "scienceqa", "scienceqa_legacy", "seedbench"]


def _scienceqa_target(doc: dict) -> str:
    return chr(65 + int(doc["answer"]))  # `answer` is the index into `choices`


def scienceqa_hit(prediction: str, target: str) -> bool:
    """HEAD: the letter itself (any case), or "X. ..." with an upper-case X. "(B)" and "The answer is B"
    score 0."""
    pred = prediction.strip()
    if pred.lower() == target.lower():
        return True
    return len(pred) >= 2 and pred[0].isupper() and pred[1] == "." and pred[0] == target


def scienceqa(docs: list[dict], predictions: list[str]) -> dict:
    """`exact_match` with HEAD's rule."""
    hits = [scienceqa_hit(p, _scienceqa_target(d)) for d, p in zip(docs, predictions, strict=True)]
    return {"exact_match": sum(hits) / len(hits)}


def scienceqa_legacy(docs: list[dict], predictions: list[str]) -> dict:
    """`exact_match` as in v0.3.0 and DART: the prediction was lower-cased first, which made the "X." branch
    dead, so only the bare letter (any case) scores."""
    hits = [p.strip().lower() == _scienceqa_target(d).lower() for d, p in zip(docs, predictions, strict=True)]
    return {"exact_match": sum(hits) / len(hits)}


def seedbench(docs: list[dict], predictions: list[str]) -> dict:
    """Only the first character of the prediction counts ("(C)" -> "(" is wrong), compared case-insensitively
    with `answer`; `seed_<data_type>` (image, video) and `seed_all` are accuracies in [0, 1]."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for doc, pred in zip(docs, predictions, strict=True):
        by_type[str(doc["data_type"])].append(pred.strip()[:1].lower() == str(doc["answer"]).lower().strip())
    every = [hit for hits in by_type.values() for hit in hits]
    return {**{f"seed_{kind}": sum(h) / len(h) for kind, h in sorted(by_type.items())},
            "seed_all": sum(every) / len(every)}


def _mmstar_macro(docs: list[dict], hits: list[bool]) -> dict:
    """lmms-eval's mmstar_aggregate_results: mean over l2 categories of their accuracy. Each category key
    averages its own l2 categories; `average` averages all of them (18 on the full set)."""
    by_l2: dict[str, list[bool]] = defaultdict(list)
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for doc, hit in zip(docs, hits, strict=True):
        by_l2[doc["l2_category"]].append(hit)
        by_category[doc["category"]][doc["l2_category"]].append(hit)

    def macro(groups: dict[str, list[bool]]) -> float:
        return sum(sum(h) / len(h) for h in groups.values()) / len(groups)

    return {**{category: macro(groups) for category, groups in sorted(by_category.items())},
            "average": macro(by_l2)}


def mmstar(docs: list[dict], predictions: list[str]) -> dict:
    """HEAD: the letter from `extract_letter`, macro-averaged over l2 categories."""
    hits = [extract_letter(p) == str(d["answer"]).strip().upper()
            for d, p in zip(docs, predictions, strict=True)]
    return _mmstar_macro(docs, hits)


def mmstar_legacy_hit(prediction: str, answer: str) -> bool:
    """v0.3.0 / DART: the lower-cased prediction's first character, or the character after "(", "option "
    or "the answer is ". Quirk kept: "a cat" matches gold "A"."""
    gold = answer.lower().replace("\n", " ").strip()
    pred = prediction.lower().replace("\n", " ").strip()
    for prefix in ("", "(", "option ", "the answer is "):
        if pred.startswith(prefix) and pred[len(prefix):len(prefix) + 1] == gold:
            return True
    return False


def mmstar_legacy(docs: list[dict], predictions: list[str]) -> dict:
    """v0.3.0's reading rule with the same macro average."""
    hits = [mmstar_legacy_hit(p, str(d["answer"])) for d, p in zip(docs, predictions, strict=True)]
    return _mmstar_macro(docs, hits)
