"""Oracle: DyCoke's official LLaVA-OneVision path for one video prompt, batch 1, transcribed step by step from the
official source (KD-TAO/DyCoke@dd7463498203479d0ff6f2d29c4e72928c0af244, cited DC:<file>:<lines>), not from
clse_exp.

- TTM (`dycole_ttm`, DC:llava/model/llava_arch.py:35-89) on the video's [F * T, C] projector outputs, the one
  newline token left after them (DC:llava_arch.py:386-396); the shorter sequence gets arange positions.
- Prefill and greedy decode with a hand-written Qwen2 decoder layer and a per-layer key/value list (the stock
  modules' weights, eager float32 attention), so the decode-time rule can gather keys as PrunableDynamicCache does
  (DC:llava/model/language_model/modeling_qwen2.py:47-115): at a one-token step, before layer l, layer l - 1's
  attention of the new token (softmax over every key, head mean, :98 and :700-703) over the image span
  [start, start + img_len), img_len = TTM tokens - 1 (DC:llava_arch.py:390), is compared (cosine) with the previous
  step's; below 0.9, or on the first step, layers >= l see only the prefix, the top int(img_len * (1 - p)) span keys
  and the rest up to the current token (:76-95); otherwise (the selection was reset for layers < l, :1138-1139)
  they see every key. Decode positions continue from the cache length.

`literal=True` reproduces the official crash on F <= 4 (torch.stack of an empty list, DC:llava_arch.py:75);
`literal=False` skips that empty second stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from official_oracles import finish, rotary
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from clse_exp.models import LoadedModel


def dycole_ttm(image_feature: torch.Tensor, num_tokens_per_frame: int, merging_ratio: float,
               literal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DC:llava_arch.py:35-89 with the row indices carried along: (combined tokens, their indices)."""
    index = torch.arange(image_feature.shape[0])
    num_frames = image_feature.shape[0] // num_tokens_per_frame  # :37
    merging_ratio = 1 - merging_ratio  # :38
    similarities = []
    for i in range(0, num_frames - 1, 2):  # :41-50
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 1) * num_tokens_per_frame: (i + 2) * num_tokens_per_frame]
        frame1_norm = F.normalize(frame1_tokens, p=2, dim=1)
        frame2_norm = F.normalize(frame2_tokens, p=2, dim=1)
        similarities.append(F.cosine_similarity(frame1_norm, frame2_norm, dim=1))
    similarities = torch.stack(similarities)  # :52

    modified_image_feature, modified_index = [], []
    for i in range(0, num_frames - 1, 2):  # :56-66
        frame1 = slice(i * num_tokens_per_frame, (i + 1) * num_tokens_per_frame)
        frame2 = slice((i + 1) * num_tokens_per_frame, (i + 2) * num_tokens_per_frame)
        avg_similarity = similarities[i // 2]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature += [image_feature[frame1], image_feature[frame2][tokens_to_keep]]
        modified_index += [index[frame1], index[frame2][tokens_to_keep]]

    odd_similarities = []
    for i in range(0, num_frames - 4, 4):  # :69-75
        frame1_tokens = image_feature[i * num_tokens_per_frame: (i + 1) * num_tokens_per_frame]
        frame2_tokens = image_feature[(i + 2) * num_tokens_per_frame: (i + 3) * num_tokens_per_frame]
        odd_similarities.append(F.cosine_similarity(frame1_tokens, frame2_tokens, dim=1))
    if odd_similarities or literal:
        odd_similarities = torch.stack(odd_similarities)  # raises on an empty list, as the official code does

    for i in range(0, num_frames - 4, 4):  # :77-85
        frame1 = slice(i * num_tokens_per_frame, (i + 1) * num_tokens_per_frame)
        frame2 = slice((i + 2) * num_tokens_per_frame, (i + 3) * num_tokens_per_frame)
        avg_similarity = odd_similarities[i // 4]
        num_tokens_to_keep = int(merging_ratio * num_tokens_per_frame)
        tokens_to_keep = avg_similarity.topk(num_tokens_to_keep, largest=False).indices
        modified_image_feature[i], modified_index[i] = image_feature[frame1], index[frame1]
        modified_image_feature[i + 2] = image_feature[frame2][tokens_to_keep]
        modified_index[i + 2] = index[frame2][tokens_to_keep]
    return torch.cat(modified_image_feature, dim=0), torch.cat(modified_index)  # :88


@dataclass
class Run:
    kept: list[int]  # visual indices TTM feeds, in its order
    embeds: torch.Tensor  # [1, L', C] the decoder's input
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per generated token (prefill's first)
    tokens: list[int] = field(default_factory=list)
    selections: list[list[int] | None] = field(default_factory=list)  # per decode step: kv_cache indices or None


def layer_forward(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list,
                  kv_cache: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Qwen2 decoder layer on new tokens h [1, q, C]: their keys/values appended to `cache` ([k, v]), keys and
    values gathered at `kv_cache` when set (DC:modeling_qwen2.py:61-75), eager attention (causal within the new
    tokens). Returns (output, attention weights [1, H, q, keys])."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q_len = x.shape[1]
    shape = (1, q_len, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    cache[0] = k if cache[0] is None else torch.cat([cache[0], k], dim=2)
    cache[1] = v if cache[1] is None else torch.cat([cache[1], v], dim=2)
    keys, values = cache
    if kv_cache is not None:
        index = torch.tensor(kv_cache)
        keys, values = keys[:, :, index], values[:, :, index]
    keys, values = repeat_kv(keys, attn.num_key_value_groups), repeat_kv(values, attn.num_key_value_groups)
    scores = q @ keys.transpose(2, 3) * attn.scaling
    n_keys = keys.shape[2]
    blocked = torch.ones(q_len, n_keys, dtype=torch.bool).triu(n_keys - q_len + 1)
    weights = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
    out = attn.o_proj((weights @ values).transpose(1, 2).reshape(1, q_len, -1))
    h = h + out
    return h + layer.mlp(layer.post_attention_layernorm(h)), weights


def dycoke(loaded: LoadedModel, inputs: dict, x, frames: int, per_frame: int, merging_ratio: float,
           steps: int = 4, dycoke_l: int = 3, dycoke_p: float = 0.8, threshold: float = 0.9,
           decode: bool = True, literal: bool = False) -> Run:
    """x: official_oracles.stock_inputs (its `visual` holds the video's F * T tokens and the newline)."""
    model = loaded.model
    layers = loaded.adapter.decoder_layers(model)
    start = int(x.visual[0])
    n = frames * per_frame
    assert len(x.visual) == n + 1  # the newline token last
    with torch.no_grad():
        features, kept = dycole_ttm(x.embeds[0, start : start + n], per_frame, merging_ratio, literal)
        image_token_length = features.shape[0] - 1  # DC:llava_arch.py:390
        h = torch.cat([x.embeds[:, :start], features[None], x.embeds[:, start + n :]], dim=1)
        run = Run(kept.tolist(), h)
        caches = [[None, None] for _ in layers]
        attention_score = None  # DC:llava_qwen.py:38, per prompt here
        length = h.shape[1]
        position = torch.arange(length)[None]
        embed = loaded.adapter.text_model(model).embed_tokens
        for _ in range(steps):
            cos, sin = rotary(loaded, h, position)
            kv_cache, out, weights = None, h, None  # weights: the previous layer's attention (layer_outputs[1])
            for layer_idx, layer in enumerate(layers):
                if decode and layer_idx < dycoke_l:  # :1138-1139
                    kv_cache = None
                elif decode and layer_idx == dycoke_l and kv_cache is None and position.shape[1] == 1:  # :1140-1141
                    attention_avg = weights.mean(1)[0, -1]  # :98
                    image_attention = attention_avg[start : start + image_token_length]  # :101
                    if attention_score is not None:  # :103-110
                        similarity = F.cosine_similarity(image_attention, attention_score, dim=0)
                    else:
                        similarity = 0
                    attention_score = image_attention  # :111
                    if similarity < threshold:  # :113-114, update_cache :76-95
                        num_keep = int(image_token_length * (1 - dycoke_p))
                        top_indices = torch.topk(image_attention, num_keep, sorted=False)[1] + start
                        full_range = torch.arange(length)
                        kv_cache = torch.cat([full_range[:start], top_indices,
                                              full_range[start + image_token_length :]]).tolist()
                    run.selections.append(kv_cache)
                out, weights = layer_forward(layer, out, cos, sin, caches[layer_idx], kv_cache)
            logits = finish(loaded, out)
            token = int(logits.argmax())
            run.logits.append(logits)
            run.tokens.append(token)
            h = embed(torch.tensor([[token]]))
            position = torch.tensor([[length]])  # the cache length: contiguous after the shorter prompt
            length += 1
    return run
