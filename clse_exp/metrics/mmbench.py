"""MMBench CircularEval as lmms-eval's MMBench_Evaluator runs it, without the GPT judge.

Rows whose `index % 1_000_000` agree are circular-shift copies of one question (the main row has
index < 1e6); a main question is a hit only if every copy is answered right. Each row's letter is read by
`can_infer_option` (one stand-alone letter, or one "X." / "(X)" / ... token), else `can_infer_text`
(exactly one option text inside the answer). lmms-eval sends rows neither rule reads to a GPT judge (and
picks a seeded random letter when the API fails). We have no judge: `mmbench_en_dev` / `mmbench_cn_dev`
count those rows as wrong and report how many could have changed the score (`judge_rows`);
`mmbench_en_dev_static` reads them with `extract_letter`, like lmms-eval's static task.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from clse_exp.metrics.mcq_extract import extract_letter

# can_infer_option runs with its default num_choice=5, so "E" is a letter too.
_LETTERS = "ABCDE"
_WRAPPED = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
            (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))
COPY_STRIDE = 1_000_000


def _is_none(value: object) -> bool:
    """The evaluator's is_none: None, NaN, "nan" and (quirk) the option text "none" are all no option."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def options(doc: dict) -> dict[str, str]:
    """Letter -> option text for the options A-D that exist."""
    return {k: str(doc[k]) for k in "ABCD" if k in doc and not _is_none(doc[k])}


def infer_option(answer: str) -> str | None:
    """can_infer_option: exactly one distinct stand-alone letter among the whitespace tokens (unless that
    letter is "A" in an answer of more than 3 tokens, where it may be an article), else the first wrapping
    form ("X.", "X,", "X:", "X)", "X).", "(X)", "(X).", ":X", ...) under which exactly one letter occurs."""
    tokens = answer.split()
    bare = [c for c in _LETTERS if c in tokens]
    if len(bare) == 1 and not ("A" in tokens and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _WRAPPED:
        found = [c for c in _LETTERS if prefix + c + suffix in tokens]
        if len(found) == 1:
            return found[0]
    return None


def infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """can_infer_text: the one option whose lower-cased text is a substring of the lower-cased answer."""
    hits = [k for k, text in choices.items() if text.lower() in answer.lower()]
    return hits[0] if len(hits) == 1 else None


def read_letter(prediction: str, choices: dict[str, str]) -> str | None:
    """can_infer: the option rule, then the text rule; None when neither reads the answer."""
    return infer_option(prediction) or infer_text(prediction, choices)


def _circular(docs: list[dict], predictions: list[str], fallback: Callable[[str, dict], str | None]) -> dict:
    letters, groups = [], defaultdict(list)
    for row, (doc, pred) in enumerate(zip(docs, predictions, strict=True)):
        choices = options(doc)
        letter = read_letter(str(pred), choices)
        letters.append(letter if letter is not None else fallback(str(pred), choices))
        groups[int(doc["index"]) % COPY_STRIDE].append(row)

    def right(row: int) -> bool:
        return letters[row] is not None and letters[row] == str(docs[row]["answer"]).strip()

    hits = {idx: all(right(r) for r in rows) for idx, rows in groups.items()}
    # Only main rows are questions; a copy whose main row is absent is ignored, as lmms-eval does.
    main = [int(d["index"]) for d in docs if int(d["index"]) < COPY_STRIDE]
    # The judge is only asked when every readable copy of a question is right.
    undecided = [idx for idx in set(main) if all(right(r) or letters[r] is None for r in groups[idx])]
    judge_rows = sum(letters[r] is None for idx in undecided for r in groups[idx])
    out = {"gpt_eval_score": 100 * sum(hits[idx] for idx in main) / len(main) if main else 0.0,
           "judge_rows": judge_rows}
    if judge_rows:
        out["note"] = f"{judge_rows} rows no rule could read count as wrong (lmms-eval would ask a GPT judge)"
    return out


def mmbench(docs: list[dict], predictions: list[str]) -> dict:
    """`gpt_eval_score` (percent of main questions with all copies right); unreadable rows are wrong."""
    return _circular(docs, predictions, lambda pred, choices: None)


def mmbench_static(docs: list[dict], predictions: list[str]) -> dict:
    """lmms-eval's `mmbench_en_dev_static`: unreadable rows go to `extract_letter` instead of a judge."""
    def fallback(pred: str, choices: dict[str, str]) -> str | None:
        return extract_letter(pred, tuple(choices) or ("A", "B", "C", "D")) or None

    return _circular(docs, predictions, fallback)
