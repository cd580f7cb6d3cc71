"""lmms-eval integration: any lmms-eval task, answered by our loader with any of our pruning methods.

`python -m clse_exp.lmms --model clse_exp --model_args model=qwen2vl,prune=clse,keep=0.1 --tasks pope ...`
runs lmms-eval's own CLI with the model class in `clse_exp.lmms.model` registered as `clse_exp`; the
`lmms_eval.models` entry point below registers it for a plain `lmms-eval --model clse_exp` too. Nothing
here imports lmms_eval at import time: lmms-eval loads entry points while `lmms_eval.models` is still
initialising, and an import of it from here would be circular.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "clse_exp"
CLASS_PATH = "clse_exp.lmms.model.PrunedLMM"


def manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval's manifest naming our model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
