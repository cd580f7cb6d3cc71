"""Write the clse_synthetic lmms-eval task folder: this task's YAML and utils beside a test.parquet of our
synthetic split (images in the HF Image schema). `python tests/lmms_task/build.py DIR [SIZE]`, then
`python -m clse_exp.lmms --include_path DIR --tasks clse_synthetic ...`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import datasets

from clse_exp.data.synthetic import synthetic_dataset

HERE = Path(__file__).parent
QTYPES = ["colour", "shape"]  # conf/dataset/synthetic.yaml


def write_task(folder: Path, size: int, split: str = "test") -> Path:
    """The first `size` samples of `split`, as `python -m clse_exp dataset.size=<size>` generates them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("clse_synthetic.yaml", "clse_synthetic_mc.yaml", "utils.py"):
        shutil.copy(HERE / name, folder / name)
    samples = synthetic_dataset(size, split=split, qtypes=QTYPES)
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "image": datasets.Image()})
    rows = {"id": [s.id for s in samples], "question": [s.question for s in samples],
            "answer": [s.answer for s in samples], "image": [s.images[0] for s in samples]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(folder / "test.parquet")
    return folder


if __name__ == "__main__":
    print(write_task(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 48))
