"""Oracle: FastVID's official LLaVA-OneVision path for one video, batch 1, transcribed step by step from the official
source (LunarShen/FastVID@a40a109cb8df20e8c2c17c6850f8269717369990,
fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py, cited OV:<lines>), not from
clse_exp. It works as the official code does: all frames at once as [F, ...] batches, segments as host lists.

Inputs are the stock model's first-decoder-layer input (official_oracles.stock_inputs): the video's F x P tokens are
the LLM input embeddings the official code slices (OV:904-909); the newline after the video is text there.

Signals: the official global features and salience come from a SigLIP attention-pooling head that transformers'
LLaVA-OneVision does not carry; like clse_exp (its documented departure) the oracle uses the frame-mean embedding
as the global feature and softmax(<token, mean> / sqrt(C)) over the frame as the salience. The density jitter
(OV:979-980, torch.rand * 1e-6) is passed in (`noise`, F x (P - S) values, frame-major) so both sides draw alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from official_oracles import Inputs, causal, finish

from clse_exp.models import LoadedModel


@dataclass
class Pruned:
    kept: list[int]  # kept visual indices (0-based among the video tokens), ascending
    segments: list[int]  # DySeg segment sizes
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: torch.Tensor  # [V] at the last position


def signals(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame_global_features [F, C], frame_attn_weights [F, P]): the stand-ins described above."""
    mean = video.mean(dim=1)
    attn = torch.softmax((video @ mean[:, :, None])[:, :, 0] / video.shape[-1] ** 0.5, dim=-1)
    return mean, attn


def prune(hidden_states: torch.Tensor, video_start_idx: int, video_token_len: int, frame_num: int,
          frame_global_features: torch.Tensor, frame_attn_weights: torch.Tensor, noise: torch.Tensor,
          ratio: float, c: int, tau: float, d: float, p: int, beta: float
          ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """OV:901-1068 on hidden_states [1, L, C]: (kept tokens [1, L', C], keep_indexs sorted, segment sizes)."""
    seq_length = hidden_states.shape[1]
    dim = hidden_states.shape[-1]
    frame_token_len = video_token_len // frame_num
    batchframe = torch.arange(frame_num).unsqueeze(1)
    alltoken = torch.arange(video_token_len).view(frame_num, frame_token_len) + video_start_idx
    video = hidden_states[:, video_start_idx:video_start_idx + video_token_len, :].squeeze(0)
    video = video.reshape(frame_num, frame_token_len, -1)
    attn = frame_attn_weights.reshape(frame_num, frame_token_len)

    # DySeg, OV:913-922
    g = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cut_topk = torch.topk(sim, c - 1, largest=False).indices
    cut_cos = torch.nonzero(sim < tau, as_tuple=False).squeeze(1)
    cuts = torch.unique(torch.cat([cut_topk, cut_cos])).sort().values
    padded = F.pad(cuts, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()

    # STPrune counts, OV:925-952
    keep = [torch.arange(video_start_idx), torch.arange(video_start_idx + video_token_len, seq_length)]
    final = [hidden_states[0, :video_start_idx, :], hidden_states[0, video_start_idx + video_token_len:, :]]
    frame_retain_num = int(frame_token_len * ratio)
    frame_salient_num = frame_retain_num - int(frame_retain_num * d)
    context_list = torch.zeros(frame_num, dtype=torch.int)
    frame_context_num = frame_retain_num - frame_salient_num
    offset = 0
    for seg_len in segment_sizes:
        temp_num = (seg_len + p - 1) // p
        cur = frame_context_num * seg_len // temp_num
        end = offset + seg_len
        mask = torch.arange(seg_len - 1, -1, -1) % p == 0
        context_list[offset:end][mask] = cur
        offset = end

    # ATS, OV:955-962
    salient = torch.topk(attn, frame_salient_num, dim=1).indices
    rows = batchframe.expand(-1, frame_salient_num)
    final.append(video[rows, salient].view(-1, dim))
    keep.append(alltoken[rows, salient].view(-1))

    # density scores, OV:965-989
    n_rest = frame_token_len - frame_salient_num
    mask = torch.ones(frame_num, frame_token_len, dtype=torch.bool)
    mask.scatter_(1, salient, False)
    filtered = torch.arange(frame_token_len).unsqueeze(0).expand(frame_num, -1)[mask].view(frame_num, n_rest)
    rows = batchframe.expand(-1, n_rest)
    tokens = video[rows, filtered]
    token_index = alltoken[rows, filtered]
    dist = torch.cdist(tokens.float(), tokens.float()) / dim**0.5
    nearest, _ = torch.topk(dist, k=4, dim=-1, largest=False)
    density = (-(nearest**2).mean(dim=-1)).exp() + noise.view(frame_num, n_rest)
    denser = (density[:, None, :] > density[:, :, None]).type(tokens.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    parent, _ = (dist * denser + dist_max * (1 - denser)).min(dim=-1)
    score = parent * density

    # DTM, one-frame segments, OV:989-1017
    picks = torch.topk(score, k=frame_context_num, dim=-1).indices
    rows = batchframe.expand(-1, frame_context_num)
    targets = tokens[rows, picks]
    target_index = token_index[rows, picks]
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    sim = torch.bmm(unit, unit[rows, picks].transpose(1, 2))
    one_hot = torch.zeros(frame_num, n_rest, frame_context_num, dtype=tokens.dtype)
    one_hot.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    w = (1 / (one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    merged = w * targets + (1 - w) * torch.bmm(one_hot.transpose(1, 2), tokens) / counts
    single = context_list == frame_context_num
    final.append(merged[single].view(-1, dim))
    keep.append(target_index[single].view(-1))

    # DTM, multi-frame segments, OV:1019-1061
    start = 0
    for seg_len in segment_sizes:
        if seg_len > 1:
            seg_list = context_list[start:start + seg_len]
            cur = int(seg_list[-1])
            anchor = seg_list > frame_context_num
            n_anchor = int(anchor.sum())
            seg_score = score[start:start + seg_len][anchor]
            seg_tokens = tokens[start:start + seg_len]
            seg_targets = seg_tokens[anchor]
            pool = seg_tokens.view(1, -1, dim).expand(n_anchor, -1, -1)
            seg_index = token_index[start:start + seg_len][anchor]
            chosen = torch.topk(seg_score, k=cur, dim=-1).indices
            rows = batchframe[:n_anchor].expand(-1, cur)
            anchor_tokens = seg_targets[rows, chosen]
            anchor_index = seg_index[rows, chosen]
            sim = torch.bmm(pool / pool.norm(dim=-1, keepdim=True),
                            (anchor_tokens / anchor_tokens.norm(dim=-1, keepdim=True)).transpose(1, 2))
            one_hot = torch.zeros(n_anchor, pool.shape[1], cur, dtype=tokens.dtype)
            one_hot.scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
            w = (1 / (one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            anchor_tokens = w * anchor_tokens + (1 - w) * torch.bmm(one_hot.transpose(1, 2), pool) / counts
            final.append(anchor_tokens.view(-1, dim))
            keep.append(anchor_index.view(-1))
        start += seg_len

    # OV:1063-1068
    hidden = torch.cat(final, dim=0)
    keep_indexs = torch.cat(keep, dim=0)
    order = torch.argsort(keep_indexs)
    return hidden[order].unsqueeze(0), keep_indexs[order], segment_sizes


def fastvid(loaded: LoadedModel, x: Inputs, frame_num: int, noise: torch.Tensor, ratio: float, c: int = 8,
            tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6) -> Pruned:
    """The official prefill for one video sample: prune at the LLM input, then every decoder layer on the kept
    tokens at their original positions (OV:1070-1074: position_ids = keep_indexs, rotary gathered there)."""
    start, length = int(x.visual[0]), x.n_visual - 1  # the last video placeholder is the newline (text there)
    assert torch.equal(x.visual, torch.arange(start, start + length + 1)), "one contiguous video"
    video = x.embeds[0, start:start + length].view(frame_num, length // frame_num, -1)
    global_features, attn = signals(video)
    hidden, keep, sizes = prune(x.embeds, start, length, frame_num, global_features, attn, noise, ratio, c, tau,
                                d, p, beta)
    cos, sin, pos = x.cos[:, keep], x.sin[:, keep], x.position_ids[..., keep]
    h = hidden
    with torch.no_grad():
        for layer in loaded.adapter.decoder_layers(loaded.model):
            out = layer(h, attention_mask=causal(h.shape[1], h.dtype), position_embeddings=(cos, sin),
                        position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
        logits = finish(loaded, h)
    visual = keep[(keep >= start) & (keep < start + length)] - start
    return Pruned(visual.tolist(), sizes, hidden, logits)


# ------------------------------------------------------------------------------------------- Qwen2.5-VL
# fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py at the same commit, cited QW:<lines>.
def qwen_attention(loaded: LoadedModel, inputs: dict) -> torch.Tensor:
    """frame_attn_weights [T, P] (QW:193-203, 589-594): the last vision block's input captured in a stock run,
    its queries averaged over each frame's rows, its keys over each merged token's 4 consecutive rows (window
    order), softmax in float32 cast back, mean over heads, then un-permuted out of window order."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, get_vision_window_index

    visual = loaded.model.model.visual
    block = visual.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(h=args[0] if args else kwargs["hidden_states"],
                                             rope=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        loaded.model(**inputs)
    handle.remove()
    grid_thw = inputs["video_grid_thw"]
    with torch.no_grad():
        hidden = block.norm1(seen["h"])
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(hidden).reshape(hidden.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["rope"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        t, h, w = grid_thw[0].tolist()
        head_dim = q.shape[-1]
        q = q.reshape(heads, t, h * w, head_dim).mean(-2, keepdim=True)
        k = k.reshape(heads, t, h * w // 4, 4, head_dim).mean(-2)
        attn = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(head_dim)
        attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype).mean(2).mean(0)
    window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                              visual.patch_size)
    return attn.reshape(-1)[torch.argsort(window_index)].reshape(t, -1)


def qwen_prune(inputs_embeds: torch.Tensor, prompt_start_len: int, video_len: int, frame_num: int, frame_w: int,
               frame_h: int, frame_attn_weights: torch.Tensor, generator: torch.Generator, ratio: float, c: int,
               tau: float, ignore: float, d: float, p: int, beta: float) -> tuple[torch.Tensor, torch.Tensor, list]:
    """QW:1889-2095 on inputs_embeds [1, L, C]: (new inputs_embeds, keep_indexs sorted, segment sizes)."""
    seq_length = inputs_embeds.shape[1]
    start_tokens = inputs_embeds[:, :prompt_start_len, :]
    video = inputs_embeds[:, prompt_start_len:prompt_start_len + video_len, :].reshape(frame_num, frame_w * frame_h, -1)
    end_tokens = inputs_embeds[:, prompt_start_len + video_len:, :]
    keep = [torch.arange(prompt_start_len), torch.arange(prompt_start_len + video_len, seq_length)]
    g = video.mean(1)  # QW:1836, frame_global_features (video_embeds per frame, mean)
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = torch.topk(sim, c - 1, largest=False).indices
    cuts = torch.unique(torch.cat([cuts, torch.nonzero(sim < tau).squeeze(1)])).sort().values
    sizes = [cuts[0].item() + 1]
    for i in range(1, cuts.shape[0]):
        sizes.append(cuts[i].item() - cuts[i - 1].item())
    sizes.append(frame_num - cuts[-1].item() - 1)
    seg_hidden, seg_attn = torch.split(video, sizes), torch.split(frame_attn_weights, sizes)
    seg_g = torch.split(g, sizes)
    vision_tokens = []
    frame_retain_num = int(frame_w * frame_h * ratio)
    index_start = prompt_start_len
    for seg in range(len(sizes)):
        hidden, attn, gf = seg_hidden[seg], seg_attn[seg], seg_g[seg]
        seg_len, frm_len = attn.shape
        seg_retain = frame_retain_num * seg_len
        seg_context = max(int(seg_retain * d), 1)
        seg_salient = seg_retain - seg_context
        if seg_len == 1:
            salient_num, context_num = [seg_salient], [seg_context]
        else:
            sub_sim = (gf[:-1] * gf[1:]).sum(dim=1)
            sub_cuts = torch.nonzero(sub_sim < ignore).squeeze(1).sort().values
            if sub_cuts.shape[0] > 0:
                sub = [sub_cuts[0].item() + 1]
                for i in range(1, sub_cuts.shape[0]):
                    sub.append(sub_cuts[i].item() - sub_cuts[i - 1].item())
                sub.append(seg_len - sub_cuts[-1].item() - 1)
            else:
                sub = [seg_len]
            n_sub = len(sub)
            chunk, rem = seg_salient // n_sub, seg_salient % n_sub
            frm_salient = [chunk + (1 if i < rem else 0) for i in range(n_sub)]
            temp_num = (n_sub + p - 1) // p
            chunk, rem = seg_context // temp_num, seg_context % temp_num
            temp_context = [chunk + (1 if i < rem else 0) for i in range(temp_num)]
            idx, frm_context = 0, []
            for i in range(n_sub):
                if i % p == 0:
                    frm_context.append(min(temp_context[idx], frm_len // 2))
                    if temp_context[idx] + frm_context[-1] > frm_len:
                        temp_context[idx] = frm_len - frm_context[-1]
                    idx += 1
                else:
                    frm_context.append(0)
            frm_context.reverse()
            salient_num, context_num = [], []
            for i in range(n_sub):
                salient_num.extend([0] * (sub[i] - 1))
                context_num.extend([0] * (sub[i] - 1))
                if frm_context[i] == 0:
                    salient_num.append(min(frm_salient[i], frm_len))
                    context_num.append(0)
                else:
                    context_num.append(min(frm_context[i], frm_len // 2))
                    salient_num.append(min(frm_salient[i], frm_len - context_num[-1]))
        salient_idx, context_idx = [], []
        for f in range(seg_len):
            top = torch.topk(attn[f], salient_num[f]).indices if salient_num[f] > 0 else None
            if context_num[f] > 0:
                everything = torch.arange(frm_len)
                remaining = everything[~torch.isin(everything, top)] if top is not None else everything
                x = hidden[f][remaining].unsqueeze(0)
                dist = torch.cdist(x.float(), x.float()) / (x.shape[-1] ** 0.5)
                nearest, _ = torch.topk(dist, k=4, dim=-1, largest=False)
                density = (-(nearest**2).mean(dim=-1)).exp()
                density = density + torch.rand(density.shape[-1], generator=generator)[None] * 1e-6
                denser = (density[:, None, :] > density[:, :, None]).type(x.dtype)
                dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
                parent, _ = (dist * denser + dist_max * (1 - denser)).min(dim=-1)
                chosen = torch.topk(parent * density, k=context_num[f], dim=-1).indices[0].sort().values
                context = remaining[chosen]
            else:
                context = None
            if top is not None:
                salient_idx.append(top + f * frm_len)
            if context is not None:
                context_idx.append(context + f * frm_len)
        flat = hidden.reshape(seg_len * frm_len, -1)
        salient_idx = torch.cat(salient_idx)
        all_idx = torch.arange(seg_len * frm_len)
        unit = flat / flat.norm(dim=-1, keepdim=True)
        merged_rows = []
        for targets in context_idx:
            merge = all_idx[~torch.isin(all_idx, torch.cat([salient_idx, targets]))]
            similarity = torch.mm(unit[merge], unit[targets].T)
            one_hot = torch.zeros(merge.shape[0], targets.shape[0], dtype=hidden.dtype)
            one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
            w = (1 / (one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=beta)
            counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            merged_rows.append(w * flat[targets] + (1 - w) * torch.mm(one_hot.T, flat[merge]) / counts)
        index = torch.cat([salient_idx, *context_idx])
        rows = torch.cat([flat[salient_idx], *merged_rows], dim=0)
        order = torch.argsort(index)
        vision_tokens.append(rows[order])
        keep.append(index[order] + index_start)
        index_start += seg_len * frm_len
    embeds = torch.cat([start_tokens, torch.cat(vision_tokens, dim=0).unsqueeze(0), end_tokens], dim=1)
    return embeds, torch.cat(keep).sort().values, sizes


def qwen_fastvid(loaded: LoadedModel, inputs: dict, x: Inputs, generator: torch.Generator, ratio: float,
                 c: int = 8, tau: float = 0.84, ignore: float = 0.95, d: float = 0.4, p: int = 4,
                 beta: float = 0.6) -> Pruned:
    """The Qwen2.5-VL prefill: prune the input embeddings, then every decoder layer on the kept tokens at their
    original M-RoPE positions (QW:2097-2099: position_ids[:, :, keep], the mask sliced)."""
    start, length = int(x.visual[0]), x.n_visual
    t, h, w = inputs["video_grid_thw"][0].tolist()
    attn = qwen_attention(loaded, inputs)
    embeds, keep, sizes = qwen_prune(x.embeds, start, length, t, h // 2, w // 2, attn, generator, ratio, c, tau,
                                     ignore, d, p, beta)
    # M-RoPE: the layers' rotary tables are per position; gathering them at the kept tokens is position_ids[..., keep]
    cos, sin, pos = x.cos[..., keep, :], x.sin[..., keep, :], x.position_ids[..., keep]
    h_ = embeds
    with torch.no_grad():
        for layer in loaded.adapter.decoder_layers(loaded.model):
            out = layer(h_, attention_mask=causal(h_.shape[1], h_.dtype), position_embeddings=(cos, sin),
                        position_ids=pos)
            h_ = out[0] if isinstance(out, tuple) else out
        logits = finish(loaded, h_)
    visual = keep[(keep >= start) & (keep < start + length)] - start
    return Pruned(visual.tolist(), sizes, embeds, logits)
