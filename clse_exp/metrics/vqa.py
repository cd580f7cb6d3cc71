"""VQA accuracy as lmms-eval scores TextVQA and VizWiz.

EvalAI's answer normaliser (MMF's copy of the official VQA evaluator) is applied to the prediction AND to
every human answer, then accuracy = mean over the 10 leave-one-out subsets of min(#humans agreeing / 3, 1),
returned under lmms-eval's key `exact_match` (a fraction in [0, 1]).
"""

from __future__ import annotations

import re

# The official VQA table. Keys with capitals ("Im", "Ive", "Id've", "I'dve") are left out: the text is
# lower-cased before lookup, so they can never match. Keys with "'s" never match either ("'s" is split off
# first); they are kept because they are harmless identities.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# "none" -> "0" is EvalAI's, not ours: a model answering "None" to "how many ..." gets credit for "0".
NUMBERS = {"none": "0", **{w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# Sic: "(?!<=\d)" is a lookahead for the text "<=digit", not a lookbehind, so every period NOT followed by a
# digit goes ("5." -> "5", "3.5" stays).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The evaluators call PERIOD_STRIP.sub("", text, re.UNICODE): the flag lands in `count`, so at most 32
# periods are removed. Kept for number-for-number agreement.
_PERIOD_COUNT = int(re.UNICODE)


def strip_punctuation(text: str) -> str:
    """The evaluator's processPunctuation: a mark next to a space (or anywhere, once the text holds a
    digit,digit group) is deleted, otherwise it becomes a space; then periods not before a digit go."""
    glued = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or glued:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def normalize(answer: str) -> str:
    """EvalAIAnswerProcessor: "Two dogs!" -> "2 dogs", "None" -> "0", "The cat." -> "cat"."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str] | None) -> float:
    """Mean over i of min(1, #{j != i : answer_j == prediction} / 3), all sides normalised; 0 without
    answers (lmms-eval's VizWiz guard; TextVQA would raise on an empty list)."""
    if not answers:
        return 0.0
    pred = normalize(prediction)
    gold = [normalize(a) for a in answers]
    matches = sum(g == pred for g in gold)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gold) / len(gold)


def vqa(docs: list[dict], predictions: list[str]) -> dict:
    """TextVQA / VizWiz: mean VQA accuracy under lmms-eval's key `exact_match`."""
    scores = [vqa_accuracy(p, d.get("answers")) for d, p in zip(docs, predictions, strict=True)]
    return {"exact_match": sum(scores) / len(scores)}
