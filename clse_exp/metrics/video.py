"""Video multiple-choice scorers: Video-MME (HEAD, and v0.3.0 as `videomme_legacy`), MVBench, the EgoSchema
subset and LongVideoBench (val, video only).

EgoSchema and LongVideoBench give a RANDOM letter when their parser reads none (lmms-eval's `random.choice`,
seeded once per process, so the draw depends on everything drawn before it). We cannot reproduce that draw:
such an answer counts as wrong here, and `egoschema_unparsed` / `lvb_unparsed` count them (each would add
1 / (number of options) of a hit to lmms-eval's count on average). Their parsing is unchanged since v0.3.0;
HEAD sets EgoSchema's max_new_tokens to 16 where v0.3.0 left the model's default.
"""

from __future__ import annotations

import re
from collections import defaultdict

from clse_exp.metrics.mcq_extract import extract_letter
from clse_exp.metrics.vqa import strip_punctuation

# v0.3.0's prefixes, including two pairs that a missing comma glued into one string each.
_LEGACY_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option isThe correct option is", "Best answer:Best option:")


def videomme_legacy_letter(prediction: str) -> str:
    """v0.3.0's extract_characters_regex: drop the answer prefixes, then the FIRST capital A-D anywhere, so
    "Based on ..." reads as "B"; "" when there is none. (Its "> 10 words and no A-D -> empty" rule gives the
    same "" and needs no branch here.)"""
    text = prediction.strip()
    for prefix in _LEGACY_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"[ABCD]", text)
    return found.group(0) if found else ""


def _videomme(docs: list[dict], letters: list[str]) -> dict:
    """`videomme_perception_score`: 100 * correct / rows (every row counts as answered), plus the same by
    `duration` (short, medium, long) when the column is there."""
    by_duration: dict[str, list[bool]] = defaultdict(list)
    hits = []
    for doc, letter in zip(docs, letters, strict=True):
        hit = letter == str(doc["answer"]).strip()
        hits.append(hit)
        if "duration" in doc:
            by_duration[str(doc["duration"])].append(hit)
    return {"videomme_perception_score": 100 * sum(hits) / len(hits),
            **{f"videomme_{d}": 100 * sum(h) / len(h) for d, h in sorted(by_duration.items())}}


def videomme(docs: list[dict], predictions: list[str]) -> dict:
    """HEAD: letters read by `extract_letter`."""
    return _videomme(docs, [extract_letter(p) for p in predictions])


def videomme_legacy(docs: list[dict], predictions: list[str]) -> dict:
    """v0.3.0 / DART: letters read by `videomme_legacy_letter`."""
    return _videomme(docs, [videomme_legacy_letter(p) for p in predictions])


def mvbench_option(text: str) -> str:
    """mcq_acc's `process`, applied to the prediction and to the gold letter alike: "X. ..." gives X;
    else VQA punctuation handling, strip quotes and brackets, lower-case, and the first stand-alone a-e,
    upper-cased (an article "a" reads as A); with no such letter, the processed text itself (it never
    equals a letter)."""
    option = re.match(r"^([A-E])\.\s*(.+)$", text.strip())
    if option:
        return option.group(1)
    cleaned = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    cleaned = cleaned.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([a-e])\b", cleaned)
    return letter.group(1).upper() if letter else cleaned


def mvbench(docs: list[dict], predictions: list[str]) -> dict:
    """`mvbench_accuracy` = 100 * correct / answered: empty predictions leave the denominator. The gold letter
    is the position of `answer` in `candidates`."""
    correct = answered = 0
    for doc, pred in zip(docs, predictions, strict=True):
        candidates = list(doc["candidates"])
        if doc["answer"] not in candidates:
            raise ValueError(f"MVBench answer={doc['answer']!r} is not one of its candidates {candidates}")
        if pred.strip() == "":
            continue
        answered += 1
        correct += mvbench_option(pred) == mvbench_option(chr(65 + candidates.index(doc["answer"])))
    return {"mvbench_accuracy": 100 * correct / answered if answered else 0.0}


_EGOSCHEMA_LETTERS = ("A", "B", "C", "D", "E")


def egoschema_letter(prediction: str, options: list[str]) -> str | None:
    """EgoSchema's parse_multi_choice_response (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa3:
    lmms_eval/tasks/egoschema/utils.py:93-161, from MMMU); None where it draws at random (line 128).

    Strip ,.!?;:' from both ends (one character kind after the other), pad with a space on each side, then
    collect "(X)", "X " and "X." for X in A-E (a plain substring test: "DNA " holds "A "). With none and more
    than 5 words, the options whose text (stripped, its "A. " prefix included) occurs, case-insensitively.
    Of several, the one whose LAST occurrence starts first (np.argmin, the earlier candidate on ties)."""
    if len(options) != 5:
        raise ValueError(f"EgoSchema has 5 options per question, this row has {len(options)}: {options}")
    index2ans = {letter: option.strip() for letter, option in zip(_EGOSCHEMA_LETTERS, options, strict=True)}
    response = prediction
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    candidates = [f"({x})" for x in _EGOSCHEMA_LETTERS if f"({x})" in response]
    candidates += [f"{x} " for x in _EGOSCHEMA_LETTERS if f"{x} " in response]
    candidates += [f"{x}." for x in _EGOSCHEMA_LETTERS if f"{x}." in response]
    by_content = False
    if not candidates and len(response.split()) > 5:
        candidates = [x for x, text in index2ans.items() if text.lower() in response.lower()]
        by_content = bool(candidates)
    if not candidates:
        return None
    if by_content:
        starts = [response.lower().rfind(index2ans[x].lower()) for x in candidates]
    else:
        starts = [response.rfind(x) for x in candidates]
    best = candidates[starts.index(min(starts))]
    return best.replace("(", "").replace(")", "").replace(".", "").strip()


def egoschema_subset(docs: list[dict], predictions: list[str]) -> dict:
    """`score` = correct / rows (a fraction, as lmms-eval reports it; utils.py:165-175, 238-248): the letter
    becomes its index 0-4 and is compared with `answer` as strings. The full `egoschema` test set has no
    public answers (its rows hold None) and is refused."""
    correct = unparsed = 0
    for doc, pred in zip(docs, predictions, strict=True):
        if doc.get("answer") is None or str(doc["answer"]).strip() == "":
            raise ValueError("EgoSchema row without an answer: only the 500-question subset (task egoschema_subset) "
                             "has public answers; the full egoschema test can only be scored by its server")
        letter = egoschema_letter(pred, list(doc["option"]))
        unparsed += letter is None
        index = _EGOSCHEMA_LETTERS.index(letter) if letter in _EGOSCHEMA_LETTERS else -1
        correct += str(doc["answer"]) == str(index)
    return {"score": correct / len(docs), "egoschema_unparsed": unparsed}


_LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:")


def longvideobench_letter(prediction: str) -> str | None:
    """LongVideoBench's parse_multi_choice_response (EvolvingLMMs-Lab/lmms-eval@75571cfe0fa3:
    lmms_eval/tasks/longvideobench/utils.py:187-213); None where it draws at random (lines 208, 212).

    Delete every occurrence of the answer prefixes (in order), then the FIRST capital A-E anywhere, so
    "Based on ..." reads as B and "E" counts even with 4 options. (Its "> 10 words and no A-E -> random" rule
    gives the same None and needs no branch here.)"""
    text = prediction.strip()
    for prefix in _LVB_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"[ABCDE]", text)
    return found.group(0) if found else None


def longvideobench(docs: list[dict], predictions: list[str]) -> dict:
    """`lvb_acc` (utils.py:263-308): every row is counted in its `duration_group` and its `question_category`,
    the overall accuracy is the count-weighted mean over those groups (so correct / rows), rounded to 5
    decimals, a fraction. The gold letter is chr(65 + correct_choice). `lvb_acc_<duration_group>` (seconds:
    15, 60, 600, 3600) are the per-duration accuracies lmms-eval logs."""
    groups: dict[object, list[bool]] = defaultdict(list)
    by_duration: dict[str, list[bool]] = defaultdict(list)
    unparsed = 0
    for doc, pred in zip(docs, predictions, strict=True):
        letter = longvideobench_letter(pred)
        unparsed += letter is None
        hit = letter == chr(65 + int(doc["correct_choice"]))
        groups[doc.get("duration_group")].append(hit)
        groups[doc.get("question_category")].append(hit)
        if doc.get("duration_group") is not None:
            by_duration[str(doc["duration_group"])].append(hit)
    weighted = sum(sum(hits) / len(hits) * len(hits) for hits in groups.values())
    overall = weighted / sum(len(hits) for hits in groups.values())
    return {"lvb_acc": round(overall, 5), "lvb_unparsed": unparsed,
            **{f"lvb_acc_{d}": round(sum(h) / len(h), 5) for d, h in sorted(by_duration.items())}}
