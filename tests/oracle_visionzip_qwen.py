"""Oracle: VisionZip's official Qwen2.5-VL path for one image, batch 1, written from the official source, not
from clse_exp. The file is Qwen2_5_VL/qwen2_5vl_visionzip.py of dvlab-research/VisionZip at commit
68993a31d4f704498a0cc1f0f026754467be65e2 (the commit its README links; read in the fork jsilvcast/VisionZip,
which carries the upstream history), cited VZQ:<lines>.

It runs the stock vision tower, takes the last block's input as the patched tower does (VZQ:594-598), recomputes
that block's eager attention and post-RoPE keys (VZQ:263-306), reduces them as the patched tower does
(VZQ:601-613), applies the selection and merge of the patched forward (VZQ:1916-1968) to the stock
inputs_embeds and position ids, and runs the stock decoder on the shortened sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from clse_exp.models import LoadedModel


@dataclass
class Zipped:
    kept: list[int]  # visual token indices kept (dominant and contextual targets), ascending
    targets: list[int]  # visual token index of each contextual token's slot
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: torch.Tensor  # [V] at the last position


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_block_attention(loaded: LoadedModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_mean [N], attn_key [1, N, D]) as the patched tower returns them (VZQ:263-306, 601-613)."""
    visual = loaded.model.model.visual
    block = visual.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs),
        with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        handle.remove()
    hidden_states, cu_seqlens = block.norm1(seen["hidden"]), seen["cu_seqlens"]
    cos, sin = seen["position_embeddings"]
    num_heads = block.attn.num_heads
    with torch.no_grad():
        # VZQ:263-306 (Qwen2_5_VLVisionAttention.forward with return_logits=True)
        seq_length = hidden_states.shape[0]
        q, k, _ = block.attn.qkv(hidden_states).reshape(seq_length, 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos_, sin_ = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()  # VZQ:241-252
        q = ((q.float() * cos_) + (rotate_half(q.float()) * sin_)).to(hidden_states.dtype)
        k = ((k.float() * cos_) + (rotate_half(k.float()) * sin_)).to(hidden_states.dtype)
        attention_mask = torch.full([1, seq_length, seq_length], torch.finfo(q.dtype).min, dtype=q.dtype)
        for i in range(1, len(cu_seqlens)):
            attention_mask[..., cu_seqlens[i - 1] : cu_seqlens[i], cu_seqlens[i - 1] : cu_seqlens[i]] = 0
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        head_dim = q.shape[-1]
        attn_weights = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(head_dim)
        attn_weights = attn_weights + attention_mask
        logits = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_key = k

        # VZQ:549,601-613; Qwen2-VL's tower has no windows (the same rule with the identity order)
        if hasattr(visual, "window_size"):
            window_index, _ = get_vision_window_index(inputs["image_grid_thw"], visual.spatial_merge_size,
                                                      visual.window_size, visual.patch_size)
        else:
            window_index = torch.arange(seq_length // 4)
        reverse_indices = torch.argsort(window_index)
        attn_mean = logits.mean(dim=0)
        attn_mean = attn_mean.sum(dim=0)
        attn_mean = attn_mean.view(attn_mean.shape[0] // 4, -1).mean(dim=-1)
        attn_mean = attn_mean[reverse_indices]
        attn_key = attn_key.view(attn_key.shape[0], attn_key.shape[1] // 4, 4, attn_key.shape[-1]).mean(dim=2)
        attn_key = attn_key[:, reverse_indices, :].mean(dim=0).unsqueeze(0)
    return attn_mean, attn_key


def stock_decoder_inputs(loaded: LoadedModel, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [1, L, C], position_ids) as the stock model hands them to its decoder."""
    seen = {}
    text = loaded.model.model.language_model
    handle = text.register_forward_pre_hook(lambda _m, _a, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(**inputs)
    finally:
        handle.remove()
    return seen["inputs_embeds"], seen["position_ids"]


def visionzip(loaded: LoadedModel, inputs: dict, dominant_fraction: float, contextual_fraction: float) -> Zipped:
    attn_logits, attn_key = last_block_attention(loaded, inputs)
    inputs_embeds, position_ids = stock_decoder_inputs(loaded, inputs)
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    with torch.no_grad():
        # VZQ:1916-1968, the fractions as the README says to edit them
        dominant_num = int(dominant_fraction * attn_logits.size(0))
        contextual_num = max(int(contextual_fraction * attn_logits.size(0)), 1)
        _, topk_indices = torch.topk(attn_logits, dominant_num)
        mask = torch.zeros_like(attn_logits, dtype=torch.bool)
        mask[topk_indices] = True
        contextual_mask = ~mask
        metric_filtered = attn_key[:, contextual_mask]
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

        step = max(1, metric_normalized.shape[1] // contextual_num)
        target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
        target_tokens = metric_normalized[:, target_indices, :]
        others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
        tokens_to_merge = metric_normalized[:, others, :]
        similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
        assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num,
                                     dtype=attn_logits.dtype)
        assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)

        select_mask = torch.zeros_like(attn_logits, dtype=torch.bool)
        select_mask[topk_indices] = True
        false_pos = (~select_mask).nonzero(as_tuple=True)[0]
        select_mask[false_pos[target_indices]] = True

        img_mask = (input_ids == loaded.model.config.image_token_id)[0]
        st_idx = torch.nonzero(img_mask, as_tuple=True)[0]
        first, last = st_idx[0].item(), st_idx[-1].item()
        img_mask[first : last + 1] = ~select_mask
        img_mask = ~img_mask
        contexual_input_idx = false_pos[target_indices] + first

        hidden_states_filtered = inputs_embeds[:, first : last + 1][:, contextual_mask]
        keep_rows = ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices)
        hidden_to_merge = hidden_states_filtered[:, keep_rows, :]
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
        target_hidden = hidden_states_filtered[:, target_indices, :]
        contextual_tokens = target_hidden + aggregated_hidden

        position_ids = position_ids[..., img_mask]
        attention_mask = attention_mask[:, img_mask]
        inputs_embeds = inputs_embeds.clone()
        inputs_embeds[:, contexual_input_idx] = contextual_tokens
        inputs_embeds = inputs_embeds[:, img_mask]

        out = loaded.model.model.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                                attention_mask=attention_mask)
        logits = loaded.model.lm_head(out.last_hidden_state)[0, -1]
    kept = torch.nonzero(select_mask).flatten().tolist()
    return Zipped(kept, false_pos[target_indices].tolist(), inputs_embeds, logits)
