"""Weights & Biases mirror of a run. Results on disk stay the source of truth: every W&B call is guarded,
and a W&B failure is reported and ignored, never losing local results."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def resolve_mode(mode: str) -> str:
    """auto: online only when an API key is configured (env or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


def has_api_key() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (what `wandb login` writes)."""
    return bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()


def _netrc() -> str:
    path = Path.home() / ".netrc"
    return path.read_text() if path.exists() else ""


class WandbSink:
    def __init__(self, cfg: Any, run_dir: Path, run_id: str) -> None:
        self.run = None
        try:
            import wandb

            logger = cfg.logger
            self.run = wandb.init(
                project=logger.project, entity=logger.get("entity"), group=logger.get("group"),
                name=f"{cfg.model.name}-{cfg.dataset.name}-{cfg.prune.name}-keep{cfg.keep}", id=run_id,
                resume="allow", dir=str(run_dir), mode=resolve_mode(logger.mode),
                config=OmegaConf.to_container(cfg, resolve=True),
                tags=[cfg.model.name, cfg.dataset.name, cfg.prune.name, f"keep={cfg.keep}", f"budget={cfg.budget}",
                      f"protocol={cfg.protocol}"],
            )
        except Exception as err:  # noqa: BLE001 - W&B must never end a run
            warnings.warn(f"W&B disabled for this run: {err}", stacklevel=2)

    def log(self, summary: dict, records: list[dict], overlays: list[tuple[str, Any]]) -> None:
        if self.run is None:
            return
        try:
            import wandb

            flat = {f"metrics/{k}": v for k, v in summary["metrics"].items() if isinstance(v, int | float)}
            flat |= {f"efficiency/{k}": v for k, v in summary.get("efficiency", {}).items()}
            flat |= {f"retention/{k}": v for k, v in summary.get("retention", {}).items() if not isinstance(v, list)}
            columns = ["id", "question", "answer", "prediction", "sample_score"]
            table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
            images = {f"kept_tokens/{name}": wandb.Image(image) for name, image in overlays}
            self.run.log({**flat, "predictions": table, **images})
            self.run.summary.update(flat)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B logging failed (local results are complete): {err}", stacklevel=2)

    def finish(self, exit_code: int) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"W&B finish failed: {err}", stacklevel=2)
