"""Tiny offline models: small configs, seeded random weights, a tokenizer trained here, no download.

They share the real classes (Qwen2VLForConditionalGeneration, LlavaForConditionalGeneration, ...),
so every code path the pruning engine takes on a 7B model is exercised on a laptop CPU.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaProcessor,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from clse_exp.models.offline_video import (
    FrameClipVideoProcessor,
    FrameVideoProcessor,
    SquareFrameVideoProcessor,
    TimestampedFrameVideoProcessor,
)

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
LLAVA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>")
ONEVISION_SPECIALS = (*QWEN_SPECIALS, "<image>", "<video>")
INTERNVL_SPECIALS = (*QWEN_SPECIALS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
INTERNVL_TOKEN_ROLES = {"start_image_token": "<img>", "end_image_token": "</img>",
                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'video' %}<video>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# LLaVA-OneVision's layout: all images (then the video) right after the role line, with no separator between
# them, then a newline and the text.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] if c['type'] == 'image' %}<image>{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'video' %}<video>{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ '\\n' + c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# InternVL's: one `<IMG_CONTEXT>` (or `<video>`) line per visual input before the text; the processor expands it.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    from clse_exp.data.synthetic import vocabulary_corpus

    chat = ["system", "user", "assistant", "USER:", "ASSISTANT:", "You are a helpful assistant."]
    return chat + list(vocabulary_corpus())


@lru_cache(maxsize=4)
def build_tokenizer(specials: tuple[str, ...], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the synthetic-task vocabulary: encodes any text, answers are few tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sorted(set(_corpus())), trainer)
    qwen = specials[: len(QWEN_SPECIALS)] == QWEN_SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>" if qwen else "</s>",
        pad_token="<|endoftext|>" if qwen else "<pad>",
        bos_token=None if qwen else "<s>",
        unk_token=None if qwen else "<unk>",
        padding_side="left",
    )


class _AllowMissingVideoProcessor:
    """transformers' processors insist on a torchvision video processor; the offline ones may lack it."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and not hasattr(argument, "model_input_names"):
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


class OfflineQwen2VLProcessor(_AllowMissingVideoProcessor, Qwen2VLProcessor):
    pass


class OfflineQwen2_5_VLProcessor(_AllowMissingVideoProcessor, Qwen2_5_VLProcessor):  # noqa: N801
    pass


class OfflineVideoLlavaProcessor(_AllowMissingVideoProcessor, VideoLlavaProcessor):
    pass


class OfflineQwen3VLProcessor(_AllowMissingVideoProcessor, Qwen3VLProcessor):
    pass


class OfflineLlavaOnevisionProcessor(_AllowMissingVideoProcessor, LlavaOnevisionProcessor):
    pass


class OfflineInternVLProcessor(_AllowMissingVideoProcessor, InternVLProcessor):
    pass


def _qwen_text_config(spec: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    head_dim = spec["hidden_size"] // spec["num_heads"]
    half = head_dim // 2
    temporal = half // 4  # the real models split (t, h, w) as 1/4, 3/8, 3/8 of the rotary half
    height = (half - temporal) // 2
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": spec.get("rope_theta", 10000.0),
                         "mrope_section": [temporal, height, half - temporal - height]},
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def saved_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """A shipped tokenizer.json (the toy checkpoint's), with the Qwen specials' roles."""
    from clse_exp.models import PACKAGE_DIR

    file = path if Path(path).is_absolute() else PACKAGE_DIR / path
    return PreTrainedTokenizerFast(tokenizer_file=str(file), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")


def build_tiny_qwen(spec: dict, family: str) -> tuple[nn.Module, Any]:
    file = spec.get("tokenizer_file")
    tokenizer = saved_tokenizer(file) if file else build_tokenizer(QWEN_SPECIALS)
    vision = dict(depth=spec["vision_depth"], embed_dim=spec.get("vision_embed_dim", 32),
                  hidden_size=spec["hidden_size"], num_heads=spec.get("vision_heads", 2))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"])
    video_processor = FrameVideoProcessor(spec["min_pixels"], spec["max_pixels"])
    if family == "qwen2_vl":
        config = Qwen2VLConfig(text_config=_qwen_text_config(spec, tokenizer), vision_config=dict(vision, mlp_ratio=2),
                               **_qwen_ids(tokenizer))
        model_cls, processor_cls = Qwen2VLForConditionalGeneration, OfflineQwen2VLProcessor
    else:
        vision = dict(vision, intermediate_size=64, out_hidden_size=spec["hidden_size"], window_size=56,
                      fullatt_block_indexes=[spec["vision_depth"] - 1])
        vision.pop("embed_dim")
        vision["hidden_size"] = 32
        config = Qwen2_5_VLConfig(text_config=_qwen_text_config(spec, tokenizer), vision_config=vision,
                                  **_qwen_ids(tokenizer))
        model_cls, processor_cls = Qwen2_5_VLForConditionalGeneration, OfflineQwen2_5_VLProcessor
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    return _seeded(model_cls, config, spec), processor


def build_tiny_llava(spec: dict, family: str) -> tuple[nn.Module, Any]:
    tokenizer = build_tokenizer(LLAVA_SPECIALS)
    head = spec["hidden_size"] // spec["num_heads"]
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], head_dim=head, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=spec["vision_depth"] + 1,
                              num_attention_heads=2, image_size=spec["image_size"], patch_size=14)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": spec["image_size"]},
                                            crop_size={"height": spec["image_size"], "width": spec["image_size"]})
    ids = tokenizer.convert_tokens_to_ids
    common = dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                  image_seq_length=(spec["image_size"] // 14) ** 2)
    if family == "llava":
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"), **common)
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_CHAT_TEMPLATE)
        return _seeded(LlavaForConditionalGeneration, config, spec), processor
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                              video_token_id=ids("<video>"), **common)
    processor = OfflineVideoLlavaProcessor(image_processor=image_processor,
                                           video_processor=FrameClipVideoProcessor(image_processor),
                                           tokenizer=tokenizer, patch_size=14, chat_template=LLAVA_CHAT_TEMPLATE)
    return _seeded(VideoLlavaForConditionalGeneration, config, spec), processor


def build_tiny_qwen3_vl(spec: dict, family: str) -> tuple[nn.Module, Any]:
    """Qwen3-VL: 16-px patches merged 2x2, interleaved M-RoPE and three DeepStack levels (the real model taps
    vision blocks 8, 16, 24 of 27 and adds them after LLM layers 0, 1, 2; here they are spread over the tower)."""
    tokenizer = build_tokenizer(QWEN_SPECIALS)
    head_dim = spec["hidden_size"] // spec["num_heads"]
    half = head_dim // 2
    spatial = half * 5 // 16  # the real split of the rotary half: t, h, w = 24, 20, 20 of 64, interleaved
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"], head_dim=head_dim, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": spec.get("rope_theta", 10000.0),
                         "mrope_section": [half - 2 * spatial, spatial, spatial], "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id,
    )
    depth = spec["vision_depth"]
    vision = dict(depth=depth, hidden_size=spec.get("vision_embed_dim", 32), intermediate_size=64,
                  num_heads=spec.get("vision_heads", 2), patch_size=16, out_hidden_size=spec["hidden_size"],
                  num_position_embeddings=256, deepstack_visual_indexes=[round(i * (depth - 1) / 2) for i in range(3)])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
    mean_std = dict(image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"],
                                               patch_size=16, merge_size=2, temporal_patch_size=2, **mean_std)
    video_processor = TimestampedFrameVideoProcessor(spec["min_pixels"], spec["max_pixels"], patch_size=16,
                                                     mean=IMAGENET_STANDARD_MEAN, std=IMAGENET_STANDARD_STD)
    processor = OfflineQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    return _seeded(Qwen3VLForConditionalGeneration, config, spec), processor


def _qwen_backbone(spec: dict, tokenizer: PreTrainedTokenizerFast, model_type: str) -> dict:
    """A Qwen2 (LLaVA-OneVision) or Qwen3 (InternVL3.5) text config at the spec's depth and widths."""
    return dict(
        model_type=model_type, vocab_size=len(tokenizer), hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["hidden_size"] // spec["num_heads"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": spec.get("rope_theta", 10000.0)},
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )


def build_tiny_llava_onevision(spec: dict, family: str) -> tuple[nn.Module, Any]:
    """LLaVA-OneVision: a SigLIP tower on `image_size` crops (384 in the real model), any-resolution grids of
    1..6 x 1..6 crops capped at 9 crops' worth of tokens, and 2x2-pooled video frames."""
    tokenizer = build_tokenizer(ONEVISION_SPECIALS)
    crop = spec["image_size"]
    side = crop // 14
    pinpoints = [[crop * rows, crop * cols] for rows in range(1, 7) for cols in range(1, 7)]
    vision = dict(model_type="siglip_vision_model", hidden_size=spec.get("vision_embed_dim", 32), intermediate_size=64,
                  num_hidden_layers=spec["vision_depth"], num_attention_heads=spec.get("vision_heads", 2),
                  image_size=crop, patch_size=14, vision_use_head=False)
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_qwen_backbone(spec, tokenizer, "qwen2"), image_token_index=ids("<image>"),
        video_token_index=ids("<video>"), vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
    )
    mean_std = dict(image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop},
                                                      image_grid_pinpoints=pinpoints, **mean_std)
    processor = OfflineLlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        video_processor=SquareFrameVideoProcessor(crop, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
        num_image_tokens=side * side, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )
    return _seeded(LlavaOnevisionForConditionalGeneration, config, spec), processor


def build_tiny_internvl(spec: dict, family: str) -> tuple[nn.Module, Any]:
    """InternVL3.5 (-hf): an InternViT tower on `image_size` tiles (448 in the real model), up to 12 tiles plus a
    thumbnail, each tile pixel-shuffled 2x2 into (image_size / 28)^2 tokens (256 in the real model)."""
    base = build_tokenizer(INTERNVL_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                        pad_token=base.pad_token, padding_side="left",
                                        extra_special_tokens=INTERNVL_TOKEN_ROLES)
    tile = spec["image_size"]
    tokens_per_tile = (tile // 28) ** 2
    vision = dict(hidden_size=spec.get("vision_embed_dim", 32), intermediate_size=64,
                  num_hidden_layers=spec["vision_depth"], num_attention_heads=spec.get("vision_heads", 2),
                  image_size=tile, patch_size=14)
    config = InternVLConfig(vision_config=vision, text_config=_qwen_backbone(spec, tokenizer, "qwen3"),
                            image_token_id=tokenizer.context_image_token_id, image_seq_length=tokens_per_tile,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=12)
    processor = OfflineInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                         video_processor=SquareFrameVideoProcessor(tile),
                                         image_seq_length=tokens_per_tile, chat_template=INTERNVL_CHAT_TEMPLATE)
    return _seeded(InternVLForConditionalGeneration, config, spec), processor


def _seeded(model_cls: type, config: Any, spec: dict) -> nn.Module:
    """Same seed, same weights, on any machine: weights are drawn on CPU in float32."""
    config.text_config.initializer_range = spec.get("initializer_range", 0.02)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.get("seed", 0))
        model = model_cls(config)
    return model.eval()


TINY_BUILDERS = {
    "qwen2_vl": build_tiny_qwen,
    "qwen2_5_vl": build_tiny_qwen,
    "llava": build_tiny_llava,
    "video_llava": build_tiny_llava,
    "qwen3_vl": build_tiny_qwen3_vl,
    "llava_onevision": build_tiny_llava_onevision,
    "internvl": build_tiny_internvl,
}
