"""Tiny copies of the benchmark repos in their real HF layout: README configs + parquet with embedded images.

`load_dataset(<dir>, <config>, split=...)` reads them exactly as it reads the hub repos, so the loaders run
the production code path offline.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage


def png_bytes(seed: int, size: int = 56) -> dict:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


BROKEN = {"bytes": b"not an image", "path": None}


def write_mp4(path: Path, frames: int = 8, size: int = 56) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            array = np.full((size, size, 3), (i * 30) % 256, dtype=np.uint8)
            for packet in stream.encode(av_frame(array)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def av_frame(array: np.ndarray):
    import av

    return av.VideoFrame.from_ndarray(array, format="rgb24")


def _write(root: Path, config: str, split: str, rows: dict, features: Features, folder: str | None = None) -> None:
    folder = folder or config
    target = root / folder / f"{split}-00000-of-00001.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(target))
    entry = f"- config_name: {config}\n  data_files:\n  - split: {split}\n    path: {folder}/{split}-*\n"
    readme = root / "README.md"
    existing = readme.read_text().split("---\n")[1].removeprefix("configs:\n") if readme.exists() else ""
    readme.write_text(f"---\nconfigs:\n{existing}{entry}---\n")


def _images(n: int, broken_last: bool = True) -> list[dict]:
    return [BROKEN if broken_last and i == n - 1 else png_bytes(i) for i in range(n)]


def write_benchmark(name: str, root: Path) -> dict:
    """Write the fixture for dataset config `name`; returns extra overrides the run needs (video_root)."""
    s, img = Value("string"), Image()
    if name == "pope":
        rows = {"id": ["0", "1", "2", "3"], "question_id": ["1", "2", "3", "4"],
                "question": ["Is there a dog in the image?"] * 4, "answer": ["yes", "no", "yes", "no"],
                "image_source": ["a"] * 4, "image": _images(4),
                "category": ["adversarial", "popular", "random", "random"]}
        _write(root, "default", "test", rows, Features({**{k: s for k in rows if k != "image"}, "image": img}))
    elif name == "mme":
        rows = {"question_id": ["p1.png", "p1.png", "p2.png", "p2.png", "p3.png"],
                "question": ["Is there a cat? Please answer yes or no."] * 5, "answer": ["Yes", "No"] * 2 + ["Yes"],
                "category": ["existence"] * 4 + ["code_reasoning"], "image": _images(5)}
        _write(root, "default", "test", rows, Features({**{k: s for k in rows if k != "image"}, "image": img}))
    elif name == "gqa":
        rows = {"id": ["q1", "q2", "q3"], "imageId": ["n1", "n2", "missing"],
                "question": ["What colour is the car?"] * 3, "answer": ["red", "blue", "green"]}
        _write(root, "testdev_balanced_instructions", "testdev", rows, Features({k: s for k in rows}))
        images = {"id": ["n1", "n2"], "image": [png_bytes(1), png_bytes(2)]}
        _write(root, "testdev_balanced_images", "testdev", images, Features({"id": s, "image": img}))
    elif name in ("textvqa_val", "textvqa_val_ocr", "vizwiz_vqa_val"):
        split = "val" if name.startswith("vizwiz") else "validation"
        rows = {"question_id": [1, 2, 3], "question": ["What does LG stand for?"] * 3,
                "answers": [["lg"] * 10, ["two"] * 10, ["unanswerable"] * 10], "image": _images(3),
                "ocr_tokens": [["LG", "life"], [], ["x"]]}
        features = Features({"question_id": Value("int64"), "question": s, "answers": Sequence(s), "image": img,
                             "ocr_tokens": Sequence(s)})
        _write(root, "default", split, rows, features, folder="data")
    elif name == "scienceqa_img":
        rows = {"image": _images(3), "question": ["Which is a mammal?"] * 3,
                "choices": [["cat", "fish"], ["frog", "dog", "ant"], ["a", "b"]], "answer": [0, 1, 0],
                "hint": ["", "Animals.", ""]}
        features = Features({"image": img, "question": s, "choices": Sequence(s), "answer": Value("int64"),
                             "hint": s})
        _write(root, "ScienceQA-IMG", "test", rows, features)
    elif name in ("mmbench_en_dev", "mmbench_cn_dev"):
        rows = {"index": [0, 1000000, 1, 2], "question": ["Which colour?"] * 4, "hint": ["nan", "nan", "A hint", "nan"],
                "A": ["red", "blue", "x", "y"], "B": ["blue", "red", "z", "w"], "C": ["nan"] * 4, "D": ["nan"] * 4,
                "answer": ["A", "B", "A", "B"], "category": ["c"] * 4, "image": _images(4), "source": ["s"] * 4,
                "L2-category": ["l2"] * 4, "comment": ["nan"] * 4, "split": ["dev"] * 4}
        features = Features({**{k: s for k in rows if k not in ("index", "image")}, "index": Value("int64"),
                             "image": img})
        _write(root, "en" if "_en_" in name else "cn", "dev", rows, features)
    elif name == "ocrbench":
        rows = {"dataset": ["IIIT5K", "HME100k", "x"], "question": ["What is written?"] * 3,
                "question_type": ["Regular Text Recognition", "Handwritten Mathematical Expression Recognition",
                                  "Doc-oriented VQA"], "answer": [["hello"], ["x ^ 2"], ["y"]], "image": _images(3)}
        features = Features({"dataset": s, "question": s, "question_type": s, "answer": Sequence(s), "image": img})
        _write(root, "default", "test", rows, features, folder="data")
    elif name == "mmstar":
        rows = {"index": [0, 1, 2], "question": ["Which? Options: A: x, B: y"] * 3, "image": _images(3),
                "answer": ["A", "B", "A"], "category": ["coarse perception"] * 3,
                "l2_category": ["image style", "image scene", "image style"]}
        features = Features({"index": Value("int64"), "question": s, "image": img, "answer": s, "category": s,
                             "l2_category": s})
        _write(root, "mmstar", "val", rows, features)
    elif name == "seedbench":
        rows = {"question": ["What is shown?"] * 3, "choice_a": ["a"] * 3, "choice_b": ["b"] * 3,
                "choice_c": ["c"] * 3, "choice_d": ["d"] * 3, "answer": ["A", "B", "C"],
                "data_type": ["image", "image", "video"], "question_id": ["1", "2", "3"],
                "image": [[png_bytes(1)], [png_bytes(2)], [BROKEN]]}
        features = Features({**{k: s for k in rows if k != "image"}, "image": Sequence(img)})
        _write(root, "default", "test", rows, features, folder="data")
    elif name == "videomme":
        rows = {"videoID": ["v1", "v2", "gone"], "question_id": ["1", "2", "3"], "duration": ["short"] * 3,
                "domain": ["d"] * 3, "sub_category": ["s"] * 3, "task_type": ["t"] * 3,
                "question": ["What happens?"] * 3, "options": [["A. x", "B. y", "C. z", "D. w"]] * 3,
                "answer": ["A", "B", "C"]}
        features = Features({**{k: s for k in rows if k != "options"}, "options": Sequence(s)})
        _write(root, "videomme", "test", rows, features)
        for vid in ("v1", "v2"):
            write_mp4(root / "videos" / f"{vid}.mp4")
        return {"video_root": str(root / "videos")}
    elif name == "mvbench":
        rows = {"video": ["a.mp4", "b.mp4", "gone.mp4"], "question": ["What is the action?"] * 3,
                "candidates": [["run", "walk"], ["sit", "stand", "jump"], ["x", "y"]], "answer": ["run", "jump", "x"]}
        features = Features({"video": s, "question": s, "candidates": Sequence(s), "answer": s})
        _write(root, "action_sequence", "train", rows, features)
        for vid in ("a.mp4", "b.mp4"):
            write_mp4(root / "videos" / vid)
        return {"video_root": str(root / "videos")}
    elif name == "egoschema_subset":  # answers are the option index 0-4; options carry their letters
        rows = {"question_idx": ["q1", "q2", "q3"], "question": ["What is c doing overall?"] * 3,
                "video_idx": ["e1", "e2", "gone"],
                "option": [["A. cooks", "B. cleans", "C. reads", "D. paints", "E. sleeps"]] * 3,
                "answer": ["0", "3", "4"]}
        features = Features({**{k: s for k in rows if k != "option"}, "option": Sequence(s)})
        _write(root, "Subset", "test", rows, features)
        write_mp4(root / "videos" / "e1.mp4")
        write_mp4(root / "videos" / "e2.MP4")  # lmms-eval's upper-case fallback
        return {"video_root": str(root / "videos")}
    elif name == "longvideobench_val_v":
        rows = {"video_id": ["l1", "l2", "gone"], "id": ["l1_0", "l2_0", "gone_0"],
                "video_path": ["l1.mp4", "l2.mp4", "gone.mp4"], "subtitle_path": ["l1_en.json"] * 3,
                "correct_choice": [0, 2, 1], "question": ["What appears first?"] * 3,
                "option0": ["a cat", "red", "x"], "option1": ["a dog", "green", "y"],
                "option2": ["a bird", "blue", "z"], "option3": ["a fish", "N/A", "w"], "option4": ["N/A"] * 3,
                "duration": [12.5, 50.0, 400.0],
                "duration_group": [15, 60, 600], "question_category": ["S2E", "T3O", "E2O"],
                "topic_category": ["NP-News-Programs"] * 3, "starting_timestamp_for_subtitles": [0.0] * 3}
        ints, floats = ("correct_choice", "duration_group"), ("duration", "starting_timestamp_for_subtitles")
        features = Features({k: Value("int64") if k in ints else Value("float64") if k in floats else s for k in rows})
        _write(root, "default", "validation", rows, features, folder="data")
        for vid in ("l1.mp4", "l2.mp4"):
            write_mp4(root / "videos" / vid)
        return {"video_root": str(root / "videos")}
    else:
        raise KeyError(name)
    return {}
