"""Oracle: PruMerge+'s official LLaVA-1.5 path for one image, batch 1, written from the official source
(42Shawn/LLaVA-PruMerge@097c04116a58465e4bcb58cec44a94018a68ff1a,
llava/model/multimodal_encoder/clip_encoder.py, cited PM:<lines>), not from clse_exp: forward hooks on the
last CLIP layer's q_proj/k_proj during a stock tower forward (PM:27-32,182-196), then
token_prune_merge_advanced_plus step by step (PM:198-281), the projector (llava/model/llava_arch.py:94-106)
and the decoder on the shortened prompt with contiguous positions (llava_arch.py:211-232).

`outliers` / `stride` replace the adaptive count and its grid step (clse_exp's budgeted mode fixes them);
left as None they are the official adaptive values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from official_oracles import Inputs, finish, rotary, run_layer

from clse_exp.models import LoadedModel


@dataclass
class Merged:
    kept: list[int]  # patch indices in the order fed (outliers by score, then the grid); the extra token follows
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: torch.Tensor  # [V] at the last position


def complement_idx(idx, dim):  # PM:12-25
    a = torch.arange(dim, device=idx.device)
    ndim = idx.ndim
    dims = idx.shape
    n_idx = dims[-1]
    dims = dims[:-1] + (-1,)
    for _ in range(1, ndim):
        a = a.unsqueeze(0)
    a = a.expand(*dims)
    masked = torch.scatter(a, -1, idx, 0)
    compl, _ = torch.sort(masked, dim=-1, descending=False)
    compl = compl.permute(-1, *tuple(range(ndim - 1)))
    compl = compl[n_idx:].permute(*(tuple(range(1, ndim)) + (0,)))
    return compl


def outlier_dectection(attn):  # PM:34-47
    attn_np = attn.to(dtype=torch.float32).cpu().numpy().flatten()
    q1 = np.percentile(attn_np, 25)
    q3 = np.percentile(attn_np, 75)
    upper_bound = q3 + 1.5 * (q3 - q1)
    return len(np.where(attn_np > upper_bound)[0]) / len(attn_np)


def last_layer(loaded: LoadedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cls_attn [B, N], image_features [B, N, C], desired_layer_k [B, 1 + N, C]) as PM:182-201 compute them."""
    tower = loaded.model.model.vision_tower
    last = tower.encoder.layers[-1]  # layers[23] of the 24-layer CLIP-L
    outputs = {}
    hooks = [last.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: outputs.update(desired_k=out)),
             last.self_attn.q_proj.register_forward_hook(lambda _m, _i, out: outputs.update(desired_q=out))]
    with torch.no_grad():
        image_forward_outs = tower(pixel_values, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    image_features = image_forward_outs.hidden_states[-2][:, 1:]  # feature_select, 'patch' (PM:73-81)
    C = image_features.shape[-1]
    attn = (outputs["desired_q"] @ outputs["desired_k"].transpose(-2, -1)) * C**-0.5
    attn = F.softmax(attn, dim=-1)
    return attn[:, 0, 1:], image_features, outputs["desired_k"]


def prumerge_plus(loaded: LoadedModel, inputs: dict, x: Inputs, outliers: int | None = None,
                  stride: int | None = None) -> Merged:
    cls_attn, image_features, desired_layer_k = last_layer(loaded, inputs["pixel_values"])
    B, N, C = image_features.shape

    reduction_ratio = outlier_dectection(cls_attn) if outliers is None else outliers / N  # PM:203-205
    _, idx = torch.topk(cls_attn, int(N * reduction_ratio), dim=1, largest=True)
    step_length = int(1 / reduction_ratio)  # PM:208-214; 575 there is N - 1
    arithmetic_sequence = torch.arange(0, N - 1, int(step_length / 3) if stride is None else stride)
    original_tensor_1d = idx.flatten()
    filtered_sequence = torch.tensor([v for v in arithmetic_sequence if v not in original_tensor_1d],
                                     dtype=torch.long)
    idx = torch.cat((idx, filtered_sequence.unsqueeze(0)), dim=1)

    index = idx.unsqueeze(-1).expand(-1, -1, C)  # PM:229-242
    Key_wo_cls = desired_layer_k[:, 1:]
    x_others = torch.gather(image_features, dim=1, index=index)
    x_others_attn = torch.gather(cls_attn, dim=1, index=idx)
    Key_others = torch.gather(Key_wo_cls, dim=1, index=index)
    compl = complement_idx(idx, N)
    non_topk = torch.gather(image_features, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_Key = torch.gather(Key_wo_cls, dim=1, index=compl.unsqueeze(-1).expand(-1, -1, C))
    non_topk_attn = torch.gather(cls_attn, dim=1, index=compl)
    Key_others_norm = F.normalize(Key_others, p=2, dim=-1)
    non_topk_Key_norm = F.normalize(non_topk_Key, p=2, dim=-1)

    B, left_tokens, C = x_others.size()  # PM:248-276
    updated_x_others = torch.zeros_like(x_others)
    for b in range(B):
        for i in range(left_tokens):
            key_others_norm = Key_others_norm[b, i, :].unsqueeze(0).unsqueeze(0)
            before_i_Key = Key_others_norm[b, :i, :].unsqueeze(0)
            after_i_Key = Key_others_norm[b, i + 1:, :].unsqueeze(0)
            before_i_x_others = x_others[b, :i, :].unsqueeze(0)
            after_i_x_others = x_others[b, i + 1:, :].unsqueeze(0)
            rest_x_others = torch.cat([before_i_x_others, after_i_x_others, non_topk[b, :, :].unsqueeze(0)], dim=1)
            before_i_x_others_attn = x_others_attn[b, :i].unsqueeze(0)
            after_i_x_others_attn = x_others_attn[b, i + 1:].unsqueeze(0)
            rest_x_others_attn = torch.cat([before_i_x_others_attn, after_i_x_others_attn,
                                            non_topk_attn[b, :].unsqueeze(0)], dim=1)
            rest_Keys = torch.cat([before_i_Key, after_i_Key, non_topk_Key_norm[b, :, :].unsqueeze(0)], dim=1)
            cos_sim_matrix = torch.bmm(key_others_norm, rest_Keys.transpose(1, 2))
            _, cluster_indices = torch.topk(cos_sim_matrix, k=32, dim=2, largest=True)
            cluster_tokens = rest_x_others[:, cluster_indices.squeeze(), :]
            weights = rest_x_others_attn[:, cluster_indices.squeeze()].unsqueeze(-1)
            weighted_avg = torch.sum(cluster_tokens * weights, dim=1)
            updated_x_others[b, i, :] = x_others[b, i, :] + weighted_avg

    extra_one_token = torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True)  # PM:278-280
    merged = torch.cat([updated_x_others, extra_one_token], dim=1)

    with torch.no_grad():
        features = loaded.model.model.multi_modal_projector(merged)
        start, end = int(x.visual[0]), int(x.visual[-1]) + 1
        h = torch.cat([x.embeds[:, :start], features, x.embeds[:, end:]], dim=1)
        embeds = h
        pos = torch.arange(h.shape[1])[None]
        cos, sin = rotary(loaded, h, pos)
        for layer in loaded.adapter.decoder_layers(loaded.model):
            h = run_layer(layer, h, cos, sin, pos)
        logits = finish(loaded, h)
    return Merged(kept=idx[0].tolist(), embeds=embeds, logits=logits)
