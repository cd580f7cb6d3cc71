"""Oracle: HoliTom's official LLaVA-OneVision path for one video, batch 1, transcribed step by step from the official
source (cokeshao/HoliTom@e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0; AR = holitom/llava_arch.py, MQ =
holitom/modeling_qwen2.py, SE = LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py), not from clse_exp. It
keeps the official shapes and loops (frames as a batch, masked_select, per-token merge loops).

Inputs are the stock model's first-decoder-layer input (official_oracles.stock_inputs): the video's F x P tokens are
the pooled, projected features AR:370 works on; the newline after them is the one_token newline (AR:454-462).
The attention is passed in (`attn` [F, P]); `siglip_attention` gives the official signal from transformers' SigLIP
with eager attentions.
The DPC jitter (AR:39-40) comes from `rand(shape)`, so both sides draw alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from official_oracles import Inputs, causal, finish, last_row_attention, rotary

from clse_exp.models import LoadedModel


@dataclass
class Pruned:
    windows: list[tuple[int, int]]  # AR:382 selected_frames
    outer: list[int]  # kept original video indices in sequence order (a static cluster: its centre, first frame)
    inner: list[int] | None  # original video indices kept at layer K (sorted)
    embeds: torch.Tensor  # [1, L', C] the first decoder layer's input
    logits: torch.Tensor  # [V] at the last position


def siglip_attention(loaded: LoadedModel, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """SE:618-622 then AR:371-373: the tower's last attention, mean over heads then queries, 2x2 bilinear pooled."""
    tower = loaded.model.model.vision_tower
    frames = pixel_values_videos.flatten(0, 1)
    saved = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = tower(frames, output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = saved
    weights = out.attentions[-1].mean(dim=1).mean(dim=1)  # (frames, patches)
    side = int(math.sqrt(weights.shape[1]))
    grid = weights.unsqueeze(-1).view(-1, side, side, 1).permute(0, 3, 1, 2)  # get_2dPool on (F, p, 1)
    pooled = torch.nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).flatten(1, 2).squeeze(-1)


def last_layer_input(loaded: LoadedModel, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The input of the tower's last layer for every frame (hidden_states[-2]): what clse_exp recomputes from."""
    with torch.no_grad():
        out = loaded.model.model.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True)
    return out.hidden_states[-2]


# ------------------------------------------------------------------------------------------- AR:29-51
def cluster_dpc_knn(x, cluster_num, k, rand):
    batch_size, seq_len, embed_dim = x.shape
    dist_matrix = torch.cdist(x.float(), x.float()) / (embed_dim**0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + rand(density.shape) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_center = score.topk(cluster_num, dim=-1)
    return index_center, dist_matrix


# ------------------------------------------------------------------------------------------- AR:53-98
def select_static_windows(feature_sim, batch_size, tau, max_window_size):
    similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]))
    for start in range(batch_size - 1):
        cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
        similarity_matrix[start, start + 1 : start + 1 + len(cum_similarity)] = cum_similarity.float()
    window_lengths = torch.arange(batch_size).unsqueeze(0) - torch.arange(batch_size).unsqueeze(1)
    window_lengths = window_lengths.clamp(min=0)
    pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
    dp = torch.zeros(batch_size)
    prev = torch.zeros(batch_size, dtype=torch.long)
    for i in range(batch_size):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected_frames = []
    i = batch_size - 1
    while i >= 0:
        selected_frames.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return selected_frames[::-1], dp[-1].item()


# ------------------------------------------------------------------------------------------- AR:100-150
def merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, beta):
    batch_size, seq_len, embed_dim = feat.shape
    all_indices = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long)
    for b in range(batch_size):
        non_target_indices[b] = all_indices[b][~torch.isin(all_indices[b], target_indices[b])]
    non_target_feat = torch.gather(feat, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, embed_dim))
    dist_matrix = torch.gather(dist_matrix, 1, non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(dist_matrix, 2, target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
    idx_cluster = torch.argmin(dist_matrix, dim=-1)
    cluster_tokens = []
    for b in range(batch_size):
        batch_tokens = []
        for i in range(cluster_num):
            mask = idx_cluster[b] == i
            if mask.any():  # NO_BETA unset: AR:137-140
                cluster_means = non_target_feat[b][mask].mean(dim=0)
                batch_tokens.append(beta * feat[b][target_indices[b][i]] + (1 - beta) * cluster_means)
            else:
                batch_tokens.append(feat[b][target_indices[b][i]])
        cluster_tokens.append(torch.stack(batch_tokens))
    return torch.stack(cluster_tokens)


# ------------------------------------------------------------------------------------------- AR:152-197
def merge_tokens_by_attention_density(feat, attn, pos, retain_ratio, D, beta, K, rand):
    batch_size, seq_len, embed_dim = feat.shape
    dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
    contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
    if dominant_num > 0:
        all_indices = attn.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num, embed_dim)
        dominant_pos = pos.masked_select(~mask).view(batch_size, dominant_num)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dominant_tokens = torch.empty((batch_size, 0, embed_dim))
        dominant_pos = torch.empty((batch_size, 0), dtype=torch.long)
    if contextual_num > 0:
        feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(batch_size, seq_len - dominant_num, embed_dim)
        # AR:174 masks with mask.unsqueeze(-1), which does not broadcast against pos and raises; the evident rule:
        contextual_pos = pos.masked_select(mask).view(batch_size, seq_len - dominant_num)
        target_indices, dist_matrix = cluster_dpc_knn(feat_filtered, contextual_num, min(K, contextual_num), rand)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        contextual_pos = torch.stack([contextual_pos[b][target_indices[b]] for b in range(batch_size)])
        contextual_tokens = merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix, contextual_num, beta)
    else:
        contextual_tokens = torch.empty((batch_size, 0, embed_dim))
        contextual_pos = torch.empty((batch_size, 0), dtype=torch.long)
    image_feat = torch.stack([torch.cat([dominant_tokens[b], contextual_tokens[b]]) for b in range(batch_size)])
    image_pos = torch.stack([torch.cat([dominant_pos[b], contextual_pos[b]]) for b in range(batch_size)])
    return image_feat, image_pos


# ------------------------------------------------------------------------------------------- AR:199-213
def merge_tokens_by_density(feat, pos, retain_ratio, beta, K, rand):
    batch_size, seq_len, embed_dim = feat.shape
    cluster_num = round(seq_len * retain_ratio)
    if cluster_num > 0:
        target_indices, dist_matrix = cluster_dpc_knn(feat, cluster_num, min(K, cluster_num), rand)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        image_pos = torch.stack([pos[b][target_indices[b]] for b in range(batch_size)])
        return merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, beta), image_pos
    return torch.empty((batch_size, 0, embed_dim)), torch.empty((batch_size, 0), dtype=torch.long)


# ------------------------------------------------------------------------------------------- AR:278-311
def get_static_dynamic_features(image_feat, attn_weights, selected_frames, feature_sim, tau):
    batch_size, seq_len, embed_dim = image_feat.shape
    static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos = [], [], [], [], []
    for start, end in selected_frames:
        all_indices = torch.arange(seq_len).unsqueeze(0)
        if start == end:
            static_feat.append(torch.empty((0, embed_dim)))
            dynamic_feat.append(image_feat[start : end + 1])
            dynamic_attn.append(attn_weights[start : end + 1])
            static_pos.append(torch.empty((0, seq_len), dtype=torch.long))
            dynamic_pos.append(all_indices)
        else:
            windows_size = end - start + 1
            mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
            static_feat.append(image_feat[start : end + 1, mask].mean(dim=0))
            dynamic_feat.append(image_feat[start : end + 1, ~mask])
            dynamic_attn.append(attn_weights[start : end + 1, ~mask])
            static_pos.append(all_indices[:, mask].expand(1, -1))
            dynamic_pos.append(all_indices[:, ~mask].expand(windows_size, -1))
    return static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos


def outer(video, attn, retain_ratio, tau=0.8, beta=0.6, D=0.0, K=7, max_window_size=1024,
          rand: Callable = torch.rand):
    """AR:370-407 for one video [F, P, C] (one_token newline, AR:234-275): (features in sequence order, their
    original indices, windows)."""
    batch_size, seq_len, _ = video.shape
    normed = torch.nn.functional.normalize(video, p=2, dim=-1)
    feature_sim = torch.nn.functional.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    selected_frames, total_reduced = select_static_windows(feature_sim, batch_size, tau, max_window_size)
    total_tokens = batch_size * seq_len
    retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos = get_static_dynamic_features(
        video, attn, selected_frames, feature_sim, tau)
    feats, index = [], []
    for idx, (start, end) in enumerate(selected_frames):
        dyn, dpos = merge_tokens_by_attention_density(dynamic_feat[idx], dynamic_attn[idx], dynamic_pos[idx],
                                                      retain_ratio, D, beta, K, rand)
        if end > start:  # AR:251-254
            sta, spos = merge_tokens_by_density(static_feat[idx].unsqueeze(0), static_pos[idx], retain_ratio, beta, K,
                                                rand)
            feats.append(sta.flatten(0, 1))
            index += (start * seq_len + spos[0]).tolist()
        feats.append(dyn.flatten(0, 1))
        for f in range(dyn.shape[0]):
            index += ((start + f) * seq_len + dpos[f]).tolist()
    return torch.cat(feats), index, selected_frames


def holitom(loaded: LoadedModel, x: Inputs, frames: int, attn: torch.Tensor, retain_ratio: float,
            k_layer: int | None = None, r: float = 0.5, rand: Callable = torch.rand, newline_candidate: bool = True,
            gaps: bool = True, **knobs) -> Pruned:
    """The official prefill: the outer merge, the sequence rebuilt with contiguous positions (AR:672-678), then the
    decoder with the inner merge before layer `k_layer` (MQ:144-208). `newline_candidate` and `gaps` select the
    literal code (True) or clse_exp's documented departures (the newline never cut; positions renumbered)."""
    start, length = int(x.visual[0]), x.n_visual - 1  # the last video placeholder is the newline
    assert torch.equal(x.visual, torch.arange(start, start + length + 1)), "one contiguous video"
    video = x.embeds[0, start : start + length].view(frames, length // frames, -1)
    feats, index, windows = outer(video, attn, retain_ratio, rand=rand, **knobs)
    embeds = torch.cat([x.embeds[:, :start], feats[None].to(x.embeds.dtype), x.embeds[:, start + length :]], dim=1)
    seq = embeds.shape[1]
    position_ids = torch.arange(seq)[None]
    cos, sin = rotary(loaded, embeds, position_ids)
    image_len = len(index) + (1 if newline_candidate else 0)  # MQ:124 image_tokens: the newline is among them
    inner, previous, h = None, None, embeds
    with torch.no_grad():
        for layer_idx, layer in enumerate(loaded.adapter.decoder_layers(loaded.model)):
            if layer_idx == k_layer:
                image = previous[start : start + image_len]  # MQ:148-156
                top = image.topk(round(image_len * (1 - r))).indices + start  # MQ:158-160
                all_indices = torch.arange(image_len)
                non_topk = all_indices[~torch.isin(all_indices, top - start)] + start  # MQ:166-168
                non_topk_states, topk_states = h[:, non_topk, :], h[:, top, :]
                sim = torch.bmm(non_topk_states, topk_states.transpose(1, 2)) / (
                    torch.norm(non_topk_states, dim=-1, keepdim=True)
                    * torch.norm(topk_states, dim=-1, keepdim=True).transpose(1, 2))
                _, sim_max_index = torch.max(sim, dim=-1)
                h = h.clone()
                for i in range(len(non_topk)):  # MQ:177-181
                    target = top[sim_max_index[0, i]]
                    h[0, target, :] = (h[0, target, :] + h[0, non_topk[i], :]) / 2
                keep = torch.cat([torch.arange(start), top, torch.arange(start + image_len, seq)]).sort().values
                h = h[:, keep, :]
                position_ids = keep[None] if gaps else torch.arange(len(keep))[None]  # MQ:204
                cos, sin = rotary(loaded, h, position_ids)
                inner = sorted(index[i - start] for i in top.tolist() if i - start < len(index))
            if k_layer is not None and layer_idx == k_layer - 1:
                previous = last_row_attention(layer, h, cos, sin)
            out = layer(h, attention_mask=causal(h.shape[1], h.dtype), position_embeddings=(cos, sin),
                        position_ids=position_ids)
            h = out[0] if isinstance(out, tuple) else out
        logits = finish(loaded, h)
    return Pruned(windows, index, inner, embeds, logits)
