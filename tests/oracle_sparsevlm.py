"""Independent oracle of SparseVLM v1.5 and of its video branch, transcribed from the official code (not from
clse_exp).

Source: Gumpest/SparseVLMs, branch v1.5 @734d9003879689713a132b83297dfad060a5c9af, directory
llava/model/language_model/ (cited as file:lines), and branch video @f05b898452f81a43590a8bba67dd3cfae76a748d,
directory videollava/model/language_model/ (cited as SVvid file:lines). A hand-written batch-1 loop over the
stock decoder layers of a tiny seeded LLaVA-1.5- or Video-LLaVA-shaped model (MHA, so no repeat_kv), in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from official_oracles import Inputs, finish, rotary, run_layer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

PRUNING_LOC = (2, 6, 15)  # modelling_sparse_llama.py:69
LAYER_DICT = {2: 0, 6: 1, 15: 2}  # score.py:5
SPARSE_TOKEN_DICT = {192: [300, 200, 110], 128: [303, 110, 36], 64: [66, 30, 17]}  # score.py:7-15


@dataclass
class Trace:
    kept: list[list[int]] = field(default_factory=list)  # per stage: original visual index of each visual slot
    sequences: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input [1, L, C] after a cut
    logits: torch.Tensor | None = None


def full_attention(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> torch.Tensor:
    """modelling_sparse_llama.py:540-578: q, k of the layer's normed input, RoPE at the current positions,
    q kᵀ / sqrt(d) plus a causal -inf bias, softmax over all keys: [1, H, L, L]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    bsz, q_len, _ = x.shape
    q = attn.q_proj(x).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(bsz, q_len, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    bias = torch.zeros(q_len, q_len).masked_fill(~torch.ones(q_len, q_len, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(q @ k.transpose(2, 3) * (1 / math.sqrt(q.size(-1))) + bias, dim=-1)


def cluster_and_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """utils.py:247-311 (B = 1), returning the centres (index_down) as well as the merged tokens."""
    b, n, c = x.shape
    dist_matrix = (x[:, :, None, :] - x[:, None, :, :]).norm(dim=-1, p=2) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    density = density + noise[None]
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_to_centres = dist_matrix[0, index_down[0]][None]  # index_points(dist_matrix, index_down)
    idx_cluster = dist_to_centres.argmin(dim=1)
    idx_cluster[0, index_down[0]] = torch.arange(cluster_num)
    token_weight = x.new_ones(b, n, 1)
    idx = idx_cluster
    all_weight = token_weight.new_zeros(b * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(b * n), source=token_weight.reshape(b * n, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(b * cluster_num, c)
    x_merged.index_add_(dim=0, index=idx.reshape(b * n), source=(x * norm_weight).reshape(b * n, c))
    return x_merged.reshape(b, cluster_num, c), index_down[0]


def recycle(total_sparse_token: torch.Tensor, mask: torch.Tensor, relation_vis_text: torch.Tensor,
            noise: Callable[[int, int, int], torch.Tensor], stage: int, v_token_num: int
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """modelling_sparse_llama.py:283-296: the top 30% (+1) of the pruned tokens by score (their layer OUTPUT
    features) clustered into int(m2 / 10) + 1 means. Returns (means [1, clusters, C], the visual index of
    each cluster's centre, the cluster count); `noise(stage, v_token_num, m)` gives the density noise."""
    merge_token_idx_stage1 = torch.where(mask.float() == 0)[1]
    merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
    merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
    merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
    merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
    cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
    merge_sparse_token, centres = cluster_and_merge(merge_token_stage2, cluster_num,
                                                        noise(stage, v_token_num, merge_token_num_stage1))
    return merge_sparse_token, merge_token_idx_stage1[merge_token_stage2_idx][centres], cluster_num


def sparsevlm(loaded, x: Inputs, retained_tokens: int, noise: Callable[[int, int, int], torch.Tensor]) -> Trace:
    """modelling_sparse_llama.py:186-363 for one prefill. `noise(stage, v_token_num, m)` gives the m values the
    density adds (utils.py:259-260 draws them from the global RNG; the caller picks the draw)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    hidden, cos, sin, position_ids = x.embeds, x.cos, x.sin, x.position_ids
    image_shape = x.n_visual
    v_token_start = int(x.visual[0])  # pre_prompt_length_list[0] (llava_arch.py:424-425)
    text_token_start = v_token_start + image_shape
    v_token_num = image_shape
    # :199-204 text raters from the input embeddings
    v_t = hidden[:, v_token_start:text_token_start, :]
    t_t = hidden[:, text_token_start:, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    trace = Trace()
    original = torch.arange(image_shape)  # which original visual token (or merged token's centre) sits where
    for layer_idx, layer in enumerate(layers):
        if layer_idx in PRUNING_LOC:
            attn_logits = full_attention(layer, hidden, cos, sin)
            out = run_layer(layer, hidden, cos, sin, position_ids)
            # score.py:17-40 attn_postprocess_topk
            weights = attn_logits.mean(1)
            rows = t_token_idx[1] + text_token_start
            relation_vis_text = weights[:, rows, v_token_start : v_token_start + v_token_num].mean(1)
            sparse_token_list = SPARSE_TOKEN_DICT[retained_tokens]
            mask = torch.zeros_like(relation_vis_text, dtype=torch.bool)
            _, indices = torch.topk(relation_vis_text, min(sparse_token_list[LAYER_DICT[layer_idx]], v_token_num - 1),
                                    dim=1)
            mask[0][indices] = 1
            # modelling_sparse_llama.py:268-279 policy: prefix and text kept, visual by the mask
            policy = torch.ones(1, hidden.shape[1])
            policy[:, v_token_start:text_token_start] = mask.float()
            total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
            # :283-296 recycle the top 30% of the pruned tokens (layer OUTPUT features) into clusters
            total_sparse_token = out[:, total_sparse_token_idx[0], :]
            merge_sparse_token, centre_tokens, cluster_num = recycle(
                total_sparse_token, mask, relation_vis_text, noise, LAYER_DICT[layer_idx], v_token_num)
            # :298-311 [prefix, kept visual, merged, text]; positions cut to the first new_len
            select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
            select_token = out[:, select_token_idx[0], :]
            select_vis_token_num = int(mask.sum())
            hidden = torch.cat((select_token[:, : v_token_start + select_vis_token_num, :], merge_sparse_token,
                                select_token[:, v_token_start + select_vis_token_num :, :]), dim=1)
            position_ids = position_ids[:, : len(select_token_idx[0]) + cluster_num]
            cos, sin = rotary(loaded, hidden, position_ids)
            kept_now = torch.where(mask[0])[0]
            original = torch.cat([original[kept_now], original[centre_tokens]])
            trace.kept.append(original.tolist())
            trace.sequences[layer_idx + 1] = hidden
            v_token_num = select_vis_token_num + cluster_num
            text_token_start = v_token_start + v_token_num
        else:
            hidden = run_layer(layer, hidden, cos, sin, position_ids)
    trace.logits = finish(loaded, hidden)
    return trace


def sparsevlm_video(loaded, x: Inputs, noise: Callable[[int, int, int], torch.Tensor]) -> Trace:
    """SVvid modeling_sparse_llama.py:183-290 with score.py:5-22 (attn_postprocess_rank, called with its
    layer_idx, which the committed call omits) for one prefill on transformers' Video-LLaVA. The official code
    saw 2048 contiguous patch tokens; here each frame's CLS token sits before its patches, is never scored or
    cut, and is not a text rater. The kept and merged tokens fill the visual slots that the kept tokens and the
    cluster centres held, in the official order (kept ascending, then clusters), with contiguous positions."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    hidden, cos, sin, position_ids = x.embeds, x.cos, x.sin, x.position_ids
    visual = x.visual
    after = torch.arange(int(visual[-1]) + 1, hidden.shape[1])  # hidden_states[:, text_token_start:]
    # :189-194 text raters from the input embeddings
    v_t = hidden[:, visual, :]
    t_t = hidden[:, after, :]
    m_v_t = (v_t @ t_t.transpose(1, 2)).softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    trace = Trace()
    for layer_idx, layer in enumerate(layers):
        if layer_idx == 1:  # pruning_loc=[1] (:69)
            attn_logits = full_attention(layer, hidden, cos, sin)
            out = run_layer(layer, hidden, cos, sin, position_ids)
            # score.py:9-22
            weights = attn_logits.mean(1)
            relation_vis_text = weights[:, after[t_token_idx[1]]][:, :, visual]
            rank = torch.linalg.matrix_rank(relation_vis_text.float())
            relation_vis_text = relation_vis_text.mean(1)
            v_token_num = len(visual)
            if v_token_num - int(rank.item()) <= 0:
                trace.kept.append(list(range(v_token_num)))
                hidden = out
                continue
            mask = torch.zeros_like(relation_vis_text, dtype=torch.bool)
            _, indices = torch.topk(relation_vis_text, int(rank.item()), dim=1)
            mask[0][indices] = 1
            # :250-266 recycling, the same code as v1.5's
            merge_sparse_token, centre_tokens, _ = recycle(out[:, visual[~mask[0]], :], mask, relation_vis_text,
                                                           noise, 0, v_token_num)
            kept_now = torch.where(mask[0])[0]
            # :268-275 [prefix, kept visual, merged, text], contiguous positions
            rows = torch.cat([out[:, visual[kept_now], :], merge_sparse_token], dim=1)
            slots = visual[torch.cat([kept_now, centre_tokens])].sort().values
            others = torch.ones(hidden.shape[1], dtype=torch.bool)
            others[visual] = False
            keep = torch.cat([others.nonzero().flatten(), slots]).sort().values
            hidden = out[:, keep].clone()
            hidden[:, torch.isin(keep, slots)] = rows
            position_ids = torch.arange(hidden.shape[1])[None]
            cos, sin = rotary(loaded, hidden, position_ids)
            trace.kept.append(torch.cat([kept_now, centre_tokens]).tolist())
            trace.sequences[layer_idx + 1] = hidden
        else:
            hidden = run_layer(layer, hidden, cos, sin, position_ids)
    trace.logits = finish(loaded, hidden)
    return trace
