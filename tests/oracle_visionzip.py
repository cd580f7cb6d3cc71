"""Oracle: VisionZip's official LLaVA-1.5 path for one image, batch 1, written from the official source
(dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02, cited VZ:<file>:<lines>), not from
clse_exp. It runs the stock CLIP tower with eager attentions (the probabilities the patched CLIPAttention
returns, VZ:visionzip/utils.py:19-61) and a forward hook for the keys the patched layer stores as `metric`
(utils.py:23-24,89,122-124), applies clip_encoder.py:43-83 step by step, projects, splices the result into the
prompt in place of the image tokens and runs the decoder with contiguous positions (llava_arch.py:153-154,
229-241), as the official LLaVA does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from official_oracles import Inputs, finish, rotary, run_layer

from clse_exp.models import LoadedModel


@dataclass
class Zipped:
    dominant: list[int]  # dominant patch indices (0-based, [CLS] excluded), ascending: the order fed
    targets: list[int]  # patch index of each contextual token's target, in the order fed
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: torch.Tensor  # [V] at the last position


def tower_outputs(loaded: LoadedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attentions[-2] [B, H, T, T], hidden_states[-2] [B, T, C], metric of layers[-2] [B, T, head_dim])."""
    tower = loaded.model.model.vision_tower
    layer = tower.encoder.layers[-2]
    seen = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: seen.update(k=out))
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = implementation
        handle.remove()
    batch, tokens, _ = out.hidden_states[-2].shape
    heads = layer.self_attn.num_heads
    keys = seen["k"].view(batch, tokens, heads, -1).transpose(1, 2)  # CLIPAttention._shape
    return out.attentions[-2], out.hidden_states[-2], keys.mean(1)  # raw_key_states.mean(1)


def visionzip(loaded: LoadedModel, inputs: dict, x: Inputs, dominant: int, contextual: int) -> Zipped:
    attn_weights, hidden_states, metric = tower_outputs(loaded, inputs["pixel_values"])
    dominant_num = dominant - 1  # VZ:visionzip/main.py:7
    contextual_num = contextual
    batch, tokens, channels = hidden_states.shape

    # VZ:visionzip/clip_encoder.py:50-57
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((batch, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(batch, dominant_num + 1, channels)

    # clip_encoder.py:60-64
    metric_filtered = metric[mask].view(batch, tokens - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        batch, tokens - (dominant_num + 1), channels)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)

    # clip_encoder.py:67-80
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(batch, tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, not_target, :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden

    # clip_encoder.py:83; llava_arch.py:31-35 (projector over the whole tensor)
    with torch.no_grad():
        features = loaded.model.model.multi_modal_projector(torch.cat([dominant_tokens, contextual_tokens], dim=1))
        start, end = int(x.visual[0]), int(x.visual[-1]) + 1
        h = torch.cat([x.embeds[:, :start], features, x.embeds[:, end:]], dim=1)
        pos = torch.arange(h.shape[1])[None]
        cos, sin = rotary(loaded, h, pos)
        embeds = h
        for layer in loaded.adapter.decoder_layers(loaded.model):
            h = run_layer(layer, h, cos, sin, pos)
        logits = finish(loaded, h)
    remaining = mask[0].nonzero().flatten()  # token indices ([CLS] = 0) of the filtered list
    return Zipped(dominant=(all_indices[0, 1:].sort().values - 1).tolist(),
                  targets=(remaining[target_indices] - 1).tolist(), embeds=embeds, logits=logits)
