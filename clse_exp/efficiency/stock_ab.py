"""Stock Qwen2-VL prefill under whichever transformers is importable: 5.x against 4.57.6 (the official CLSE
fork's) in fp32.

The same seeded random model (text tower hidden 1024, 24 layers, 8/2 heads, intermediate 2816; a tiny vision
tower) and the same prompt (1024 visual + 66 text tokens), timed as wall and process CPU seconds, with an
optional torch.profiler op table. Imports nothing else from this project, so it runs unchanged on
transformers 4.57.6, e.g. installed beside the project without touching its venv:

    pip install --target /tmp/t457 --no-deps transformers==4.57.6 'huggingface_hub<1.0' 'tokenizers<0.23'
    OMP_NUM_THREADS=1 python -m clse_exp.efficiency.stock_ab                        # transformers 5.x
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/t457 python -m clse_exp.efficiency.stock_ab   # transformers 4.57.6

CPU seconds are robust to other processes on the machine; wall seconds with 2 threads on a loaded 2-core
machine are not (OpenMP threads wait at every op's barrier for a descheduled sibling).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

IMAGE, VIDEO, START, END = 1000, 1001, 1002, 1003  # placeholder token ids of the random vocabulary


def build(layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded random model; rope written the way each major version spells it."""
    v5 = int(transformers.__version__.split(".")[0]) >= 5
    section = [16, 24, 24]  # head_dim 128: the published Qwen2-VL split
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}} if v5
            else {"rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": section}})
    text = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=2, pad_token_id=0, **rope)
    vision = dict(depth=1, embed_dim=32, hidden_size=1024, num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=START, vision_end_token_id=END, **({} if v5 else text))
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).eval().to(dtype)


def prompt(dtype: torch.dtype) -> dict:
    """66 text tokens around one 64 x 64-patch image (1024 merged visual tokens)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 900, (64,), generator=generator)
    ids = torch.cat([text[:20], torch.tensor([START]), torch.full((1024,), IMAGE), torch.tensor([END]), text[20:]])
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
              "pixel_values": torch.randn(64 * 64, 3 * 2 * 14 * 14, generator=generator).to(dtype),
              "image_grid_thw": torch.tensor([[1, 64, 64]])}
    if int(transformers.__version__.split(".")[0]) >= 5:
        inputs["mm_token_type_ids"] = (ids[None] == IMAGE).long()
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="forward", choices=["forward", "generate"],
                        help="forward: one call with last-position logits; generate: the prefill of generate()")
    parser.add_argument("--profile", type=int, default=0, help="print this many rows of the op table")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model, inputs = build(args.layers, dtype), prompt(dtype)

    def run() -> None:
        with torch.inference_mode():
            if args.mode == "forward":
                model(**inputs, logits_to_keep=1, use_cache=True)
            else:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)

    run()
    wall, cpu = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    print(f"transformers {transformers.__version__} torch {torch.__version__} {args.dtype} {args.mode} "
          f"threads={torch.get_num_threads()} layers={args.layers}: cpu_s median {statistics.median(cpu):.3f} "
          f"wall_s median {statistics.median(wall):.3f} (cpu {[round(x, 2) for x in cpu]})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


if __name__ == "__main__":
    main()
