"""Benchmark prompts exactly as lmms-eval's default `doc_to_text` builds them (see shared benchmarks.md).

Each builder maps one dataset row (a dict of HF columns, images removed) to the question text the
model sees; the images or frames are attached by the loader. Quirks are kept on purpose: TextVQA and
VizWiz use `str.capitalize()` (which lower-cases the rest of the question), MMBench-CN keeps the English
options header, MMBench-EN and Video-MME get a double newline before the instruction, LongVideoBench ends in a
newline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).lower() == "nan"


def pope(doc: dict) -> str:
    return doc["question"].strip() + SHORT_ANSWER


def mme(doc: dict) -> str:
    question = doc["question"].strip()
    suffix = " Please answer yes or no."
    if question.endswith(suffix):
        question = question[: -len(suffix)]
    return question + SHORT_ANSWER


def gqa(doc: dict) -> str:
    return doc["question"] + SHORT_ANSWER


def textvqa(doc: dict) -> str:
    return doc["question"].capitalize() + SHORT_ANSWER


def textvqa_ocr(doc: dict) -> str:
    """The LLaVA / DART / CLSE protocol: OCR tokens are given as a hint."""
    return doc["question"].capitalize() + "\nReference OCR token: " + ", ".join(doc["ocr_tokens"]) + SHORT_ANSWER


def vizwiz(doc: dict) -> str:
    return (doc["question"].capitalize() + "\nWhen the provided information is insufficient, respond with "
            "'Unanswerable'." + SHORT_ANSWER)


def scienceqa(doc: dict) -> str:
    context = f"Context: {doc['hint']}\n" if doc.get("hint") else ""
    options = "\n".join(f"{chr(65 + i)}. {choice}" for i, choice in enumerate(doc["choices"]))
    return f"{context}{doc['question']}\n{options}" + LETTER_ANSWER


def _mmbench(doc: dict, post_prompt: str) -> str:
    options = "".join(f"{letter}. {doc[letter]}\n" for letter in "ABCD"
                      if letter in doc and not _missing(doc[letter]))
    options = "There are several options:\n" + options
    hint = doc.get("hint")
    query = f"{doc['question']} {options}" if _missing(hint) else f"{hint} {doc['question']} {options}"
    return query + "\n" + post_prompt


def mmbench_en(doc: dict) -> str:
    return _mmbench(doc, LETTER_ANSWER)


def mmbench_cn(doc: dict) -> str:
    return _mmbench(doc, "\n请直接使用所提供的选项字母作为答案回答。")


def ocrbench(doc: dict) -> str:
    return doc["question"].strip()


def mmstar(doc: dict) -> str:
    return doc["question"].strip() + "\nAnswer with the option's letter from the given choices directly"


def seedbench(doc: dict) -> str:
    options = "".join(f"\n{letter}. {doc[f'choice_{letter.lower()}']}" for letter in "ABCD")
    return doc["question"] + options + LETTER_ANSWER


def videomme(doc: dict) -> str:
    head = ("Select the best answer to the following multiple-choice question based on the video and the "
            "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\n")
    return head + doc["question"] + "\n" + "\n".join(doc["options"]) + "\n" + LETTER_ANSWER


def mvbench(doc: dict) -> str:
    options = "".join(f"({chr(65 + i)}) {candidate}\n" for i, candidate in enumerate(doc["candidates"]))
    return "Question:" + doc["question"] + "\nOption:\n" + options + "Only give the best option.\n"


def egoschema(doc: dict) -> str:
    """EvolvingLMMs-Lab/lmms-eval@75571cfe0fa3:lmms_eval/tasks/egoschema/utils.py:42-58 (egoschema_doc_to_text):
    the question, then each entry of `option` on its own line as given (the dataset's options carry their own
    letters), then the post prompt; with `option` present that line always sets it (egoschema_subset.yaml:17)."""
    return doc["question"] + "".join("\n" + option for option in doc.get("option", [])) + LETTER_ANSWER


def longvideobench(doc: dict) -> str:
    """lmms-eval@75571cfe0fa3:lmms_eval/tasks/longvideobench/utils.py:129-152 (no subtitles): `option0..4`
    without the "N/A" ones, lettered A, B, ... by position, then the post prompt of longvideobench_val_v.yaml:27,
    which has no leading newline and a trailing one."""
    candidates = [doc.get(f"option{i}") for i in range(5)]
    options = [". ".join((chr(65 + i), c)) for i, c in enumerate(c for c in candidates if c != "N/A")]
    return doc["question"] + "\n" + "\n".join(options) + "\n" + LETTER_ANSWER.lstrip("\n") + "\n"


PROMPTS: dict[str, Callable[[dict], str]] = {
    "pope": pope, "mme": mme, "gqa": gqa, "textvqa": textvqa, "textvqa_ocr": textvqa_ocr, "vizwiz": vizwiz,
    "scienceqa": scienceqa, "mmbench_en": mmbench_en, "mmbench_cn": mmbench_cn, "ocrbench": ocrbench,
    "mmstar": mmstar, "seedbench": seedbench, "videomme": videomme, "mvbench": mvbench, "egoschema": egoschema,
    "longvideobench": longvideobench,
}
