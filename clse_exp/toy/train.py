"""`python -m clse_exp.toy.train`: train the toy Qwen2-VL from scratch on the synthetic task.

The architecture, tokenizer and processor are the inference ones (clse_exp.models.tiny), so the shipped
weights load through `model=toy_qwen2vl` unchanged. Loss only on the answer word and the end token.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from clse_exp.config import CONF_DIR
from clse_exp.data.synthetic import make_sample
from clse_exp.metrics.synthetic import normalize_answer
from clse_exp.models.qwen2_vl import Qwen2VLAdapter
from clse_exp.models.tiny import build_tiny_qwen


def load_settings(cfg: DictConfig) -> tuple[dict, DictConfig]:
    model = OmegaConf.load(CONF_DIR / "model" / f"{cfg.model}.yaml")
    data = OmegaConf.load(CONF_DIR / "dataset" / f"{cfg.dataset}.yaml")
    spec = dict(OmegaConf.to_container(model.tiny), min_pixels=model.min_pixels, max_pixels=model.max_pixels)
    return spec, data


def batch_inputs(processor, samples, with_answers: bool) -> tuple[dict, torch.Tensor | None]:
    adapter = Qwen2VLAdapter()
    prompts = [processor.apply_chat_template(adapter.build_messages(s), tokenize=False, add_generation_prompt=True)
               for s in samples]
    if with_answers:
        prompts = [p + s.answer + "<|im_end|>" for p, s in zip(prompts, samples, strict=True)]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=prompts, images=[s.images[0] for s in samples], padding=True, return_tensors="pt")
    if not with_answers:
        return inputs, None
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, sample in enumerate(samples):  # left padding: the answer and end token close every row
        n = len(processor.tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False).input_ids)
        labels[i, -n:] = inputs["input_ids"][i, -n:]
    return inputs, labels


def sample_args(data: DictConfig) -> dict:
    return {"image_size": data.image_size, "grid": data.grid, "qtypes": list(data.qtypes), "variant": data.variant}


@torch.no_grad()
def accuracy(model, processor, data: DictConfig, split: str, n: int, seed: int) -> float:
    model.eval()
    hits = 0
    for start in range(0, n, 50):
        samples = [make_sample(i, split, seed=seed, **sample_args(data)) for i in range(start, min(n, start + 50))]
        inputs, _ = batch_inputs(processor, samples, with_answers=False)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(normalize_answer(t) == s.answer for t, s in zip(texts, samples, strict=True))
    model.train()
    return hits / n


def train(cfg: DictConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    spec, data = load_settings(cfg)
    model, processor = build_tiny_qwen(spec, "qwen2_vl")
    model.set_attn_implementation("sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    started, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        first = step * cfg.batch_size
        samples = [make_sample(first + i, "train", seed=cfg.seed, **sample_args(data)) for i in range(cfg.batch_size)]
        inputs, labels = batch_inputs(processor, samples, with_answers=True)
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            print(f"step {step:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    train_s = time.perf_counter() - started
    result = {"train_seconds": train_s, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "validation_accuracy": accuracy(model, processor, data, "validation", cfg.eval_samples, cfg.seed)}
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(output))
    result["weights_mb"] = output.stat().st_size / 2**20
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="toy_train")
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "train.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
