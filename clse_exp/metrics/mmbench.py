"""MMBench CircularEval: a question counts only if every circular-shift copy of it is answered right.

Copies share `index % 1_000_000`. Answers are read by can_infer_option (one bare letter or forms like "B." or
"(B)") then can_infer_text (exactly one option text inside the answer). lmms-eval asks a GPT judge for rows
it cannot read; we have no judge, so those rows count as wrong (reported in `note`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict


def _options(doc: dict) -> dict[str, str]:
    return {k: str(doc[k]) for k in "ABCD" if k in doc and doc[k] is not None and str(doc[k]).lower() != "nan"
            and not (isinstance(doc[k], float) and math.isnan(doc[k]))}


def infer_option(answer: str, choices: dict[str, str]) -> str | None:
    words = re.sub(r"[.,:!?()\"']", " ", answer).split()
    letters = [w for w in words if w in choices]
    if len(words) > 3 and letters == ["A"]:  # "A" as a quantifier in a sentence
        return None
    if len(set(letters)) == 1 and len(letters) >= 1:
        return letters[0]
    return None


def infer_text(answer: str, choices: dict[str, str]) -> str | None:
    hits = [k for k, v in choices.items() if v.lower() in answer.lower()]
    return hits[0] if len(hits) == 1 else None


def mmbench(docs: list[dict], predictions: list[str]) -> dict:
    groups: dict[int, list[bool]] = defaultdict(list)
    unreadable = 0
    for doc, pred in zip(docs, predictions, strict=True):
        choices = _options(doc)
        letter = infer_option(pred.strip(), choices) or infer_text(pred.strip(), choices)
        unreadable += letter is None
        groups[int(doc["index"]) % 1_000_000].append(letter == doc["answer"])
    hits = [all(copies) for copies in groups.values()]
    return {"gpt_eval_score": 100 * sum(hits) / len(hits), "unreadable_rows": unreadable,
            "note": "rows no rule could read count as wrong (lmms-eval would ask a GPT judge)"}
