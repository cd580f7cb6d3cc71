"""Train the toy Qwen2-VL on the synthetic task: `python -m clse_exp.toy.train` (config: conf/toy_train.yaml).

Deterministic by seed on CPU: the same command on the same machine gives byte-identical weights.
Writes model.safetensors, tokenizer.json and train_log.json to `out_dir`.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from clse_exp.data.sample import Sample
from clse_exp.data.synthetic import COLOURS, SHAPES, synthetic_dataset
from clse_exp.generation import batched, decode, generate
from clse_exp.metrics.synthetic import score
from clse_exp.models.base import LoadedModel
from clse_exp.models.qwen2_vl import Qwen2VLAdapter
from clse_exp.models.tiny import build_tiny_qwen
from clse_exp.toy.batches import answer_query_index, cell_labels, evidence_targets, training_batch
from clse_exp.toy.curriculum import training_sample


def build_untrained(model_cfg: dict) -> LoadedModel:
    spec = dict(model_cfg["tiny"], min_pixels=model_cfg["min_pixels"], max_pixels=model_cfg["max_pixels"],
                tokenizer_file=None)  # a fresh tokenizer (the shipped file is this one, saved)
    model, processor = build_tiny_qwen(spec, "qwen2_vl")
    return LoadedModel(model_cfg["name"], model, processor, Qwen2VLAdapter(), model_cfg)


def qtypes_at(step: int, data: dict) -> list[str]:
    """The question types of `step`: each warm-up phase [until_step, qtypes] in order, then `data.qtypes`."""
    return next((qtypes for until, qtypes in data["warmup"] if step < until), data["qtypes"])


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
    peak, warmup, total = cfg["lr"], cfg["warmup_steps"], cfg["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = cfg["min_lr_ratio"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def evaluate(loaded: LoadedModel, samples: list[Sample], batch_size: int = 32) -> dict[str, float]:
    """Greedy answers through the runner's own generate/decode, scored by the synthetic task's scorer."""
    loaded.model.eval()
    predictions = []
    for chunk in batched(samples, batch_size):
        inputs = loaded.prepare(chunk)
        out = generate(loaded, inputs, max_new_tokens=4)
        predictions += decode(loaded, out.sequences, inputs["input_ids"].shape[1])
    return score([{"answer": s.answer, "qtype": s.meta["qtype"]} for s in samples], predictions)


class CellProbe(torch.nn.Module):
    """Training-only linear read-out of colour and shape from each visual token the LLM receives: a dense
    signal that teaches the vision tower in tens of steps what the answer loss alone teaches in thousands."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPES) + 1)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(self.colour(tokens), labels[:, 0]) + cross_entropy(self.shape(tokens), labels[:, 1])


def grounding_loss(attentions: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                   head: int | None) -> torch.Tensor:
    """Cross-entropy of one head's (or the head-averaged) attention of the answer query against the evidence tokens.

    A training-only signal (the saved model is a plain Qwen2-VL): it pulls the answer position's attention
    onto the cells the question names, which from scratch otherwise takes far longer than our budget.
    """
    query = answer_query_index(labels)
    rows = torch.arange(labels.shape[0])
    per_head = attentions[rows, :, query, :]  # [B, H, L]
    attention = per_head.mean(1) if head is None else per_head[:, head]
    supervised = targets.sum(-1) > 0
    if not supervised.any():
        return attention.sum() * 0
    nll = -(targets * torch.log(attention + 1e-6)).sum(-1)
    return nll[supervised].mean()


def train(cfg: dict[str, Any], log: Any = print) -> tuple[LoadedModel, dict]:
    """Train from scratch; returns the model and a log with losses, timings and held-out accuracy."""
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"]) if cfg.get("threads") else None
    loaded = build_untrained(cfg["model"])
    model, opt_cfg, data = loaded.model, cfg["optim"], cfg["data"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"], betas=(0.9, 0.98),
                                  weight_decay=opt_cfg["weight_decay"])
    aux, image_token = cfg["grounding"], model.config.image_token_id
    probe = CellProbe(model.config.text_config.hidden_size) if cfg["probe"]["weight"] > 0 else None
    captured: list[torch.Tensor] = []
    if probe is not None:
        hook = model.model.visual.merger.register_forward_hook(lambda _m, _a, out: captured.append(out))
        optimizer.add_param_group({"params": list(probe.parameters())})
    model.set_attn_implementation("eager" if aux["weight"] > 0 else cfg["model"]["attn_implementation"])
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(opt_cfg["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opt_cfg)
        first = step * opt_cfg["batch_size"]
        qtypes = qtypes_at(step, data)
        samples = [training_sample(i, data["seed"], qtypes, data["image_size"], data["grid"])
                   for i in range(first, first + opt_cfg["batch_size"])]
        batch = training_batch(loaded.adapter, loaded.processor, samples)
        out = model(**batch, output_attentions=aux["weight"] > 0)
        loss, grounding = out.loss, torch.zeros(())
        if aux["weight"] > 0:
            targets = evidence_targets(batch, samples, image_token, data["grid"])
            grounding = grounding_loss(out.attentions[aux["layer"]], batch["labels"], targets, aux["head"])
        features = torch.zeros(())
        if probe is not None:
            side = int(batch["image_grid_thw"][0, 1]) // 2
            features = probe.loss(captured.pop(), cell_labels(samples, side, data["grid"]))
        optimizer.zero_grad(set_to_none=True)
        (loss + aux["weight"] * grounding + cfg["probe"]["weight"] * features).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg["grad_clip"])
        optimizer.step()
        losses.append((loss.item(), grounding.item(), features.item()))
        if (step + 1) % cfg["log_every"] == 0:
            recent = losses[-cfg["log_every"]:]
            log(f"step {step + 1}/{opt_cfg['steps']}  answer loss {sum(r[0] for r in recent) / len(recent):.4f}  "
                f"grounding loss {sum(r[1] for r in recent) / len(recent):.4f}  "
                f"probe loss {sum(r[2] for r in recent) / len(recent):.4f}  {time.perf_counter() - started:.0f}s")
    train_seconds = time.perf_counter() - started
    if probe is not None:
        hook.remove()
    model.set_attn_implementation(cfg["model"]["attn_implementation"])
    heldout = evaluate(loaded, synthetic_dataset(cfg["eval_size"], split=cfg["eval_split"], seed=data["seed"],
                                                 image_size=data["image_size"], grid=data["grid"],
                                                 qtypes=data["qtypes"]))
    log(f"held-out {cfg['eval_split']} accuracy {heldout['accuracy']:.4f} ({cfg['eval_size']} samples)")
    return loaded, {"train_seconds": train_seconds, "losses": losses, "heldout": heldout}


def save(loaded: LoadedModel, record: dict, cfg: dict, out_dir: Path) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    loaded.processor.tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    log = {"config": cfg, "train_seconds": record["train_seconds"], "heldout": record["heldout"],
           "losses_every_50_steps": record["losses"][::50], "torch": torch.__version__}
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="toy_train")
    def run(cfg: DictConfig) -> None:
        plain = OmegaConf.to_container(cfg, resolve=True)
        loaded, record = train(plain, log=functools.partial(print, flush=True))
        save(loaded, record, plain, Path(plain["out_dir"]))

    run()


if __name__ == "__main__":
    main()
