"""The default dataset: coloured shapes on a grid, with questions whose answers are exact.

Every answer depends on specific cells of the image (a colour or shape at a position, a count, a
relation), so dropping the wrong visual tokens costs accuracy. Each sample is a pure function of
(seed, split, index): byte-identical images and the same question on any machine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from PIL import Image, ImageDraw

from clse_exp.data.sample import Sample

SPLITS = ("train", "validation", "test")
VARIANTS = ("image", "multi_image", "video")
QTYPES = ("exist", "colour", "shape", "count", "relation")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
NUMBERS = tuple(str(i) for i in range(10))
ANSWER_VOCAB: tuple[str, ...] = ("yes", "no", *COLOURS, *SHAPES, *NUMBERS)
INSTRUCTION = " Answer with one word."
CELL_NAMES_3 = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "centre", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}


def cell_name(row: int, col: int, grid: int) -> str:
    return CELL_NAMES_3[(row, col)] if grid == 3 else f"row {row + 1} column {col + 1}"


def _rng(seed: int, split: str, index: int, variant: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{split}|{index}|{variant}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def _check(split: str, variant: str, image_size: int, grid: int, num_frames: int, qtypes: Sequence[str]) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not valid; choose one of: {', '.join(VARIANTS)}")
    bad = [q for q in qtypes if q not in QTYPES]
    if bad:
        raise ValueError(f"qtype={bad[0]!r} is not valid; choose one of: {', '.join(QTYPES)}")
    if grid < 2:
        raise ValueError(f"grid={grid} must be >= 2")
    if image_size % 28 or image_size <= 0:
        raise ValueError(f"image_size={image_size} must be a positive multiple of 28 (the merged patch size)")
    if variant == "video" and (num_frames < 2 or num_frames % 2):
        raise ValueError(f"num_frames={num_frames} must be even and >= 2 (video frames pair into temporal patches)")


def random_scene(rng: random.Random, grid: int) -> list[dict]:
    """Between 1 and grid*grid-1 shapes, at most one per cell."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    chosen = rng.sample(cells, rng.randint(1, grid * grid - 1))
    return [{"row": r, "col": c, "colour": rng.choice(list(COLOURS)), "shape": rng.choice(SHAPES)}
            for r, c in sorted(chosen)]


def draw_scene(scene: list[dict], image_size: int, grid: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / grid
    margin = cell * 0.12
    for item in scene:
        x0, y0 = item["col"] * cell + margin, item["row"] * cell + margin
        x1, y1 = (item["col"] + 1) * cell - margin, (item["row"] + 1) * cell - margin
        colour = COLOURS[item["colour"]]
        if item["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif item["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=colour)
    return image


def _unique(scene: list[dict]) -> list[dict]:
    """Shapes whose (colour, shape) appears once, so a phrase like 'the red circle' names one object."""
    keys = [(s["colour"], s["shape"]) for s in scene]
    return [s for s in scene if keys.count((s["colour"], s["shape"])) == 1]


def ask(qtype: str, scene: list[dict], grid: int, rng: random.Random, where: str = "in the image") -> tuple:
    """(question without instruction, answer, extra meta) for one scene."""
    if qtype == "exist":
        if rng.random() < 0.5:
            item = rng.choice(scene)
            colour, shape = item["colour"], item["shape"]
        else:
            present = {(s["colour"], s["shape"]) for s in scene}
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        answer = "yes" if any(s["colour"] == colour and s["shape"] == shape for s in scene) else "no"
        return f"Is there a {colour} {shape} {where}?", answer, {}
    if qtype in ("colour", "shape"):
        item = rng.choice(scene)
        place = cell_name(item["row"], item["col"], grid)
        question = f"What {qtype} is the object in the {place} cell?"  # one template: same token offsets
        return question, item[qtype], {"cell": [item["row"], item["col"]]}
    if qtype == "count":
        if rng.random() < 0.5:
            colour = rng.choice(list(COLOURS))
            return f"How many {colour} shapes are there?", str(sum(s["colour"] == colour for s in scene)), {}
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(sum(s["shape"] == shape for s in scene)), {}
    return _relation(scene, rng)


def _relation(scene: list[dict], rng: random.Random) -> tuple:
    unique = _unique(scene)
    pairs = [(a, b) for a in unique for b in unique if a is not b and (a["col"] != b["col"] or a["row"] != b["row"])]
    if not pairs:  # no nameable pair: fall back to an existence question about this scene
        return ask("exist", scene, 3, rng)
    a, b = rng.choice(pairs)
    axis = "left of" if a["col"] != b["col"] and (a["row"] == b["row"] or rng.random() < 0.5) else "above"
    if axis == "above" and a["row"] == b["row"]:
        axis = "left of"
    truth = a["col"] < b["col"] if axis == "left of" else a["row"] < b["row"]
    question = f"Is the {a['colour']} {a['shape']} {axis} the {b['colour']} {b['shape']}?"
    return question, "yes" if truth else "no", {"pair": [[a["row"], a["col"]], [b["row"], b["col"]]]}


def _qtype_for(index: int, qtypes: Sequence[str]) -> str:
    return qtypes[index % len(qtypes)]


def make_sample(index: int, split: str = "test", seed: int = 0, variant: str = "image", image_size: int = 224,
                grid: int = 3, num_frames: int = 4, qtypes: Sequence[str] | None = None) -> Sample:
    """Sample `index` of a split: a pure function of its arguments."""
    qtypes = tuple(qtypes) if qtypes is not None else (QTYPES if variant == "image" else ("exist", "count",
                                                                                          "colour", "shape"))
    _check(split, variant, image_size, grid, num_frames, qtypes)
    rng = _rng(seed, split, index, variant)
    qtype = _qtype_for(index, qtypes)
    sample_id = f"synthetic-{split}-{index:05d}" if variant == "image" else f"synthetic-{variant}-{split}-{index:05d}"
    if variant == "image":
        scene = random_scene(rng, grid)
        question, answer, extra = ask(qtype, scene, grid, rng)
        meta = {"qtype": qtype, "scene": scene, "grid": grid, **extra}
        return Sample(sample_id, question + INSTRUCTION, answer, [draw_scene(scene, image_size, grid)], meta=meta)
    if variant == "multi_image":
        scenes = [random_scene(rng, grid), random_scene(rng, grid)]
        if qtype == "count":
            colour = rng.choice(list(COLOURS))
            answer = str(sum(s["colour"] == colour for scene in scenes for s in scene))
            question, extra, which = f"How many {colour} shapes are there in the two images together?", {}, None
        else:
            which = rng.randrange(2)
            question, answer, extra = ask(qtype, scenes[which], grid, rng, where=("in the first image",
                                                                                 "in the second image")[which])
            if qtype in ("colour", "shape"):
                question = question.replace(" cell?", f" cell of the {('first', 'second')[which]} image?")
        meta = {"qtype": qtype, "scenes": scenes, "image": which, "grid": grid, **extra}
        images = [draw_scene(s, image_size, grid) for s in scenes]
        return Sample(sample_id, question + INSTRUCTION, answer, images, meta=meta)
    frames = [random_scene(rng, grid)]
    for _ in range(num_frames - 1):
        frames.append(_next_frame(frames[-1], grid, rng))
    which = rng.choice((0, num_frames - 1))
    question, answer, extra = ask(qtype, frames[which], grid, rng, where="in the frame")
    question = f"In the {'first' if which == 0 else 'last'} frame: {question}"
    meta = {"qtype": qtype, "frames": frames, "frame": which, "grid": grid, **extra}
    video = [draw_scene(f, image_size, grid) for f in frames]
    return Sample(sample_id, question + INSTRUCTION, answer, [], video=video, meta=meta)


def _next_frame(scene: list[dict], grid: int, rng: random.Random) -> list[dict]:
    """One shape moves to a free neighbouring cell or changes colour."""
    scene = [dict(s) for s in scene]
    item = rng.choice(scene)
    occupied = {(s["row"], s["col"]) for s in scene}
    moves = [(item["row"] + dr, item["col"] + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    moves = [(r, c) for r, c in moves if 0 <= r < grid and 0 <= c < grid and (r, c) not in occupied]
    if moves and rng.random() < 0.5:
        item["row"], item["col"] = rng.choice(moves)
    else:
        item["colour"] = rng.choice([c for c in COLOURS if c != item["colour"]])
    return sorted(scene, key=lambda s: (s["row"], s["col"]))


def synthetic_dataset(size: int, split: str = "test", seed: int = 0, variant: str = "image", **kwargs) -> list[Sample]:
    return [make_sample(i, split=split, seed=seed, variant=variant, **kwargs) for i in range(size)]


def vocabulary_corpus() -> list[str]:
    """Every word and phrase the templates produce, for training a small tokenizer."""
    words = ["Is there a", "in the image?", "in the first image?", "in the second image?", "in the frame?",
             "What colour is the object in the", "What shape is the object in the", "cell?", "cell of the first image?",
             "cell of the second image?", "How many", "shapes are there?", "shapes are there in the two images "
             "together?", "Is the", "left of the", "above the", "In the first frame:", "In the last frame:",
             INSTRUCTION.strip(), "row", "column", *CELL_NAMES_3.values(), *ANSWER_VOCAB,
             *(f"{s}s" for s in SHAPES)]
    words += [f"Is there a {c} {s} in the image?" for c in COLOURS for s in SHAPES]
    return words
