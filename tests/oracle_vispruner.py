"""Oracle: VisPruner's official LLaVA-1.5 path for one image, batch 1, transcribed step by step from the official
source (Theia-4869/VisPruner@aefa01adc7c7ce6334e880c88225e90cede760d1, cited VP:<file>:<lines>), not from clse_exp.

It runs the stock CLIP tower with eager attention and `output_attentions` (what VP:llava/model/multimodal_encoder/
clip_encoder.py:64-68 asks for), takes `hidden_states[-2]` and `attentions[-2]` as feature_select does
(clip_encoder.py:36-52), applies encode_images (VP:llava/model/llava_arch.py:141-186) on the [1, N, ...] tensors,
projects every patch and keeps the masked ones in their original order (llava_arch.py:185,272), splices them into
the prompt in place of the image tokens and runs the decoder with contiguous positions (llava_arch.py:370-377).

One departure, `literal=False` (the default): the batch index of llava_arch.py:174 is broadcast instead of being
expanded to R // 2 - r columns; for even R that is the same tensor, for odd R the literal code raises an
IndexError (`literal=True` reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from official_oracles import Inputs, finish, rotary, run_layer

from clse_exp.models import LoadedModel


@dataclass
class Pruned:
    important: list[int]  # patch indices ([CLS] excluded) of the important tokens, by descending attention
    diverse: list[int]  # patch indices of the diverse tokens, in the final residual order
    kept: list[int]  # the mask's patches, ascending: the order fed to the LLM
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: torch.Tensor  # [V] at the last position


def tower_outputs(loaded: LoadedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features [B, N, C], image_attentions [B, H, N]) as feature_select returns them for
    select_layer = -2, select_feature = 'patch' (VP:clip_encoder.py:37-43)."""
    tower = loaded.model.model.vision_tower
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # attentions need the eager path, as in transformers 4.37.2
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = implementation
    return out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:]


def encode_images(image_features: torch.Tensor, image_attentions: torch.Tensor, visual_token_num: int,
                  important_ratio: float, literal: bool = False) -> tuple[torch.Tensor, list[int], list[int]]:
    """VP:llava_arch.py:144-183 on batch tensors: (index_masks [B, N], important, final residual of sample 0)."""
    B, N, C = image_features.shape

    important_token_num = int(visual_token_num * important_ratio)  # :150
    diverse_token_num = visual_token_num - important_token_num  # :151

    image_attentions = image_attentions.mean(dim=1)  # :154, (B, N)
    token_indices = image_attentions.argsort(dim=-1, descending=True)  # :155
    important_indices = token_indices[:, :important_token_num]  # :156
    residual_indices = token_indices[:, important_token_num:]  # :157

    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)  # :160
    while diverse_token_num > 0:  # :161-176
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        rows = torch.arange(B).unsqueeze(-1)
        if literal:
            rows = rows.expand(-1, R // 2 - r)
        residual_indices = torch.cat([residual_indices[..., ::2][rows, distinct_indices], residual_indices[..., 1::2]],
                                     dim=-1)

    if diverse_token_num > 0:  # :178-181
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool)  # :182-183
    index_masks.scatter_(1, selected_indices, True)
    diverse = residual_indices[0].tolist() if diverse_token_num > 0 else []
    return index_masks, important_indices[0].tolist(), diverse


def vispruner(loaded: LoadedModel, inputs: dict, x: Inputs, visual_token_num: int, important_ratio: float = 0.5,
              literal: bool = False) -> Pruned:
    image_features, image_attentions = tower_outputs(loaded, inputs["pixel_values"])
    index_masks, important, diverse = encode_images(image_features, image_attentions, visual_token_num,
                                                    important_ratio, literal)
    with torch.no_grad():
        projected = loaded.model.model.multi_modal_projector(image_features)  # :185, every patch
        features = projected[index_masks].unsqueeze(0)  # :272, mask order = original order
        start, end = int(x.visual[0]), int(x.visual[-1]) + 1
        h = torch.cat([x.embeds[:, :start], features, x.embeds[:, end:]], dim=1)
        pos = torch.arange(h.shape[1])[None]
        cos, sin = rotary(loaded, h, pos)
        embeds = h
        for layer in loaded.adapter.decoder_layers(loaded.model):
            h = run_layer(layer, h, cos, sin, pos)
        logits = finish(loaded, h)
    return Pruned(important, diverse, index_masks[0].nonzero().flatten().tolist(), embeds, logits)
