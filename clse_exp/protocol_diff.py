"""`python -m clse_exp.protocol_diff`: what `protocol=uniform` changes against `official` for a method.

Runs one prefill of a small batch under both protocols and prints, per stage, the kept counts and the
overlap of the kept sets, the largest difference of the last-position logits and the achieved retention.
The README's protocol table was measured with it on `tiny_llava15`.
"""

from __future__ import annotations

import argparse
import sys

import torch
from omegaconf import OmegaConf

from clse_exp import load_model, make_pruner
from clse_exp.config import CONF_DIR, TinySpec, group_options
from clse_exp.data.synthetic import synthetic_dataset
from clse_exp.errors import ConfigError, choose_one
from clse_exp.generation import prepare


def check_args(model: str, method: str, samples: int) -> None:
    """Refuse, before any model is built, what would otherwise fail deep in a forward with a traceback."""
    choose_one("--model", model, group_options("model"))
    # prune=none has no kept set to compare: it is the unpruned model under both protocols
    choose_one("method", method, [name for name in group_options("prune") if name != "none"])
    if samples < 1:
        raise ConfigError(f"--samples={samples} must be >= 1 (synthetic questions in the batch)")


def check_width(width: int, heads: int) -> None:
    """A hidden size the tiny builders can split into `heads` rotary heads (an even head dim of 8 or more)."""
    if width < 8 * heads or width % (2 * heads):
        raise ConfigError(f"--width={width} must be a multiple of {2 * heads} and at least {8 * heads} (the tiny model "
                          f"has {heads} heads; each needs an even head dim >= 8), e.g. --width {max(64, 8 * heads)}")


def compare(model: str, method: str, keep: float, budget: str, samples: int = 4, width: int | None = None,
            variant: str = "image", frames: int = 4) -> dict:
    """Kept counts and overlaps per stage, max logit difference and retention, official vs uniform. `width`
    widens a tiny model (hidden `width`, intermediate 2 x `width`): CDPruner's DPP kernel has rank <= hidden,
    so a 64-wide model runs out of rank long before 192 picks, which a real LLaVA (4096 wide) never does.
    `variant` (image, multi_image, video; `frames` per video) picks the synthetic inputs."""
    check_args(model, method, samples)
    choose_one("--variant", variant, ["image", "multi_image", "video"])
    if frames < 1:
        raise ConfigError(f"--frames={frames} must be >= 1 (frames per synthetic video)")
    cfg = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
    if width is not None:
        if not cfg.get("tiny"):
            raise ConfigError(f"--width applies to tiny models; {model} is a real checkpoint")
        check_width(width, int(cfg.tiny.get("num_heads") or TinySpec.num_heads))
        cfg.tiny.hidden_size, cfg.tiny.intermediate_size = width, 2 * width
    loaded = load_model(cfg, "cpu")
    batch = synthetic_dataset(samples, image_size=loaded.cfg.get("tiny", {}).get("image_size") or 224,
                              variant=variant, num_frames=frames)
    runs = {}
    for protocol in ("official", "uniform"):
        pruner = make_pruner(method, keep=keep, budget=budget, protocol=protocol)
        inputs = prepare(loaded, batch, pruner)  # as the method feeds them (its question, resized images)
        with torch.no_grad(), pruner.attach(loaded.model):
            logits = loaded.model(**inputs).logits[:, -1]
        runs[protocol] = (pruner.trace, logits, [r.retention["average"] for r in pruner.records])
    (official, logits_o, retention_o), (uniform, logits_u, retention_u) = runs["official"], runs["uniform"]
    overlap = [sum(len(set(a) & set(b)) / max(len(a), len(b), 1) for a, b in zip(so["kept"], su["kept"],
                                                                                strict=True)) / len(so["kept"])
               for so, su in zip(official, uniform, strict=True)]
    return {
        "counts": {"official": [len(s["kept"][0]) for s in official], "uniform": [len(s["kept"][0]) for s in uniform]},
        "overlap_per_stage": overlap,
        "max_logit_difference": float((logits_o - logits_u).abs().max()),
        "retention_average": {"official": sum(retention_o) / len(retention_o),
                              "uniform": sum(retention_u) / len(retention_u)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m clse_exp.protocol_diff", description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--model", default="tiny_llava15")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--budget", default="final")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--width", type=int, default=None, help="hidden size of the tiny model (default: its own)")
    parser.add_argument("--variant", default="image", help="synthetic inputs: image, multi_image or video")
    parser.add_argument("--frames", type=int, default=4, help="frames per synthetic video")
    args = parser.parse_args()
    try:
        result = compare(args.model, args.method, args.keep, args.budget, args.samples, args.width, args.variant,
                         args.frames)
    except ConfigError as err:  # one line and exit 2, as every refused config here
        print(f"clse_exp.protocol_diff: error: {err}", file=sys.stderr)
        sys.exit(2)
    width = f" (hidden {args.width})" if args.width else ""
    inputs = f"{args.variant} samples{f' of {args.frames} frames' if args.variant == 'video' else ''}"
    print(f"{args.method} on {args.model}{width}, keep={args.keep} ({args.budget}), {args.samples} {inputs}")
    print(f"  kept per stage: official {result['counts']['official']}, uniform {result['counts']['uniform']}")
    print(f"  kept-set overlap per stage: {[round(o, 3) for o in result['overlap_per_stage']]}")
    print(f"  max |logit difference| at the last position: {result['max_logit_difference']:.3g}")
    retention = result["retention_average"]
    print(f"  layer-averaged retention: official {retention['official']:.4f}, uniform {retention['uniform']:.4f}")


if __name__ == "__main__":
    main()
