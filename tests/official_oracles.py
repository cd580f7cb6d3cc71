"""Independent oracles of the official pruning codes, written from their sources (not from clse_exp).

Each oracle runs the stock decoder layers of a tiny seeded model in a hand-written batch-1 loop, as the
official forks do: it computes the attention rows with transformers' own rotary and repeat_kv (eager, float32
softmax over all keys, head mean, the last prompt token's row), applies the official selection rule, count
and position rule between layers, and returns the kept visual indices per stage and the last position's
logits. Citations give repo@commit:file:lines of the rule each step transcribes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from clse_exp.models import LoadedModel


@dataclass
class Inputs:
    """What the stock model feeds its first decoder layer, for one sample without padding."""

    embeds: torch.Tensor  # [1, L, C]
    cos: torch.Tensor  # [1, L, D] rotary at the original positions
    sin: torch.Tensor
    position_ids: torch.Tensor  # [1, L] (text positions for M-RoPE models)
    visual: torch.Tensor  # sequence positions of the visual tokens, in grid order

    @property
    def n_visual(self) -> int:
        return len(self.visual)


@dataclass
class Result:
    kept: list[list[int]] = field(default_factory=list)  # per stage: kept visual indices (0-based, sorted)
    logits: torch.Tensor | None = None  # [V] at the last position


def stock_inputs(loaded: LoadedModel, inputs: dict, frame_tokens: int = 0) -> Inputs:
    """Capture the first decoder layer's input of a stock forward. Video-LLaVA videos: `frame_tokens` per frame,
    the first of them the frame's CLS token, which the official code never had (it is left unpruned)."""
    seen = {}
    layer0 = loaded.adapter.decoder_layers(loaded.model)[0]

    def hook(_module, args, kwargs):
        seen.update(hidden=args[0], position_ids=kwargs.get("position_ids"), rope=kwargs["position_embeddings"])

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        loaded.model(**inputs)
    handle.remove()
    config = loaded.model.config
    ids = inputs["input_ids"][0]
    placeholders = [config.image_token_id, getattr(config, "video_token_id", None)]
    visual = torch.isin(ids, torch.tensor([t for t in placeholders if t is not None])).nonzero().flatten()
    if config.model_type == "video_llava" and frame_tokens:  # transformers keeps each frame's CLS token first
        visual = visual[torch.arange(len(visual)) % frame_tokens != 0]
    cos, sin = seen["rope"]
    position_ids = seen["position_ids"]
    if position_ids is None:
        position_ids = torch.arange(ids.shape[0])[None]
    return Inputs(seen["hidden"], cos, sin, position_ids, visual)


def causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, L, L] causal mask (the layers run eager with it, as the official forks' eager path)."""
    blocked = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
    return torch.zeros(length, length, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
    out = layer(hidden, attention_mask=causal(hidden.shape[1], hidden.dtype), position_embeddings=(cos, sin),
                position_ids=position_ids)
    return out[0] if isinstance(out, tuple) else out


def last_row_attention(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       repeat: bool = True) -> torch.Tensor:
    """Eager attention probabilities of the LAST query over all keys, float32 softmax, head mean: [L]."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    q = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if repeat:
        k = repeat_kv(k, attn.num_key_value_groups)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + causal(length, q.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs.mean(dim=1)[0, -1]


def post_rope_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Layer's keys after RoPE and repeat_kv, heads concatenated: [L, H * d] (DART's pivot features)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    q = attn.q_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    return k[0].permute(1, 0, 2).reshape(length, -1)


def cut(x_visual: torch.Tensor, top: torch.Tensor, length: int) -> torch.Tensor:
    """Sequence positions kept: every non-visual token and the visual tokens at `top` (indices into x_visual)."""
    others = torch.ones(length, dtype=torch.bool)
    others[x_visual] = False
    return torch.cat([others.nonzero().flatten(), x_visual[top]]).sort().values


def finish(loaded: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    text = loaded.adapter.text_model(loaded.model)
    return loaded.model.lm_head(text.norm(hidden))[0, -1]


def rotary(loaded: LoadedModel, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return loaded.adapter.text_model(loaded.model).rotary_emb(hidden, positions)


# ------------------------------------------------------------------------------------------- FastV
def fastv(loaded: LoadedModel, x: Inputs, k_layer: int, kept: int) -> Result:
    """pkunlp-icler/FastV@d1659729: src/transformers/src/transformers/models/llama/modeling_llama.py:736-756.
    At layer K, layer K-1's attention, head mean, row -1, image columns; keep sort(prefix + topk + suffix);
    position_ids = keep (original, with gaps)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    h, cos, sin, pos = x.embeds, x.cos, x.sin, x.position_ids
    result, previous = Result(), None
    for index, layer in enumerate(layers):
        if index == k_layer:
            top = previous[x.visual].topk(kept).indices.sort().values
            keep = cut(x.visual, top, h.shape[1])
            result.kept.append(top.tolist())
            h, cos, sin, pos = h[:, keep], cos[:, keep], sin[:, keep], pos[:, keep]
        if index == k_layer - 1:
            previous = last_row_attention(layer, h, cos, sin)
        h = run_layer(layer, h, cos, sin, pos)
    result.logits = finish(loaded, h)
    return result


# ------------------------------------------------------------------------------------------- PDrop
def pdrop(loaded: LoadedModel, x: Inputs, layer_list: list[int], ratios: list[float]) -> Result:
    """Cooperx521/PyramidDrop@6444f304: llava/model/modeling_llama_pdrop.py:1220-1238 (stage before layer l),
    1306-1307 (int(N * ratio) of the ORIGINAL N), 1322-1342 (layer l's own norm, q/k and RoPE at the current
    positions), 1389-1401 (last row, float32 softmax, head mean, image columns), 1405-1412 (sorted keep),
    1445-1446 (positions renumbered arange)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    h, pos = x.embeds, x.position_ids
    cos, sin = x.cos, x.sin
    result, visual = Result(), x.visual
    original = torch.arange(x.n_visual)
    for index, layer in enumerate(layers):
        if index in layer_list:
            keep_length = int(x.n_visual * ratios[layer_list.index(index)])
            scores = last_row_attention(layer, h, cos, sin)[visual]
            top = scores.topk(keep_length).indices.sort().values
            original = original[top]
            result.kept.append(original.tolist())
            keep = cut(visual, top, h.shape[1])
            visual = torch.searchsorted(keep, visual[top])  # where the kept visual tokens now sit
            h = h[:, keep]
            pos = torch.arange(h.shape[1])[None]
            cos, sin = rotary(loaded, h, pos)
        h = run_layer(layer, h, cos, sin, pos)
    result.logits = finish(loaded, h)
    return result


# -------------------------------------------------------------------------------------------- DART
def dart(loaded: LoadedModel, x: Inputs, k_layer: int, budget: int, pivots: tuple[int, int] = (4, 4)) -> Result:
    """ZichenWen1/DART as read at xqy1111111/DART@5a19452: llava/model/language_model/modeling_llama_self.py
    337-359 (stage before layer K from layer K-1's output and keys), 397-449 (pivots by L1 norm of the post-RoPE,
    repeated keys; features = final norm of layer K-1's output; pivots visited in Python set order; each takes
    the M // 8 candidates of lowest cosine via topk(-cos)); positions original (keep indices)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    text = loaded.adapter.text_model(loaded.model)
    h, cos, sin, pos = x.embeds, x.cos, x.sin, x.position_ids
    result, keys = Result(), None
    for index, layer in enumerate(layers):
        if index == k_layer:
            visual = x.visual.tolist()
            after = list(range(visual[-1] + 1, h.shape[1]))
            features = text.norm(h)[0]
            norms = torch.norm(keys, p=1, dim=-1)
            image_indices = [visual[i] for i in norms[visual].topk(pivots[0]).indices.tolist()]
            query_indices = [after[i] for i in norms[after].topk(pivots[1]).indices.tolist()]
            per_pivot = math.ceil(budget // (pivots[0] + pivots[1]))
            chosen = set(image_indices + query_indices)
            valid = set(visual) - set(image_indices)
            for item in list(chosen):
                pool = list(valid)
                cos_sim = -F.cosine_similarity(features[item][None], features[pool], dim=-1)
                picks = [pool[i] for i in cos_sim.topk(per_pivot).indices.tolist()]
                chosen.update(picks)
                valid.difference_update(picks)
            chosen.difference_update(query_indices)
            top = torch.tensor(sorted(visual.index(i) for i in chosen))
            result.kept.append(top.tolist())
            keep = cut(x.visual, top, h.shape[1])
            h, cos, sin, pos = h[:, keep], cos[:, keep], sin[:, keep], pos[:, keep]
        if index == k_layer - 1:
            keys = post_rope_keys(layer, h, cos, sin)
        h = run_layer(layer, h, cos, sin, pos)
    result.logits = finish(loaded, h)
    return result


# ----------------------------------------------------------------------------------------- DivPrune
def divprune(loaded: LoadedModel, x: Inputs, ratio: float) -> Result:
    """vbdi/divprune@799e2d95: LLaVA/llava/model/llava_arch.py:147-171 (D = 1 - cosine without eps; first pick
    argmax of each column's second-smallest distance; then argmax of the min over picked rows), 153
    (n = int(round(ratio * N))), 377-386 (sorted keep, fewer tokens fed: contiguous positions)."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    features = x.embeds[0, x.visual]
    unit = features / features.norm(dim=1, keepdim=True)
    distance = 1 - unit @ unit.T
    count = int(round(ratio * x.n_visual))
    picks = [int(torch.topk(distance, 2, dim=0, largest=False).values[1, :].argmax())]
    for _ in range(count - 1):
        picks.append(int(distance[picks].min(dim=0).values.argmax()))
    top = torch.tensor(sorted(picks))
    keep = cut(x.visual, top, x.embeds.shape[1])
    h = x.embeds[:, keep]
    pos = torch.arange(h.shape[1])[None]
    cos, sin = rotary(loaded, h, pos)
    for layer in layers:
        h = run_layer(layer, h, cos, sin, pos)
    return Result([top.tolist()], finish(loaded, h))


# --------------------------------------------------------------------------------------------- CLSE
def clse_spectral(z: torch.Tensor, t: int, hh: int, ww: int, cutoff: float = 0.1, eps: float = 0.0) -> torch.Tensor:
    """zjubinchen/CLSE@cfc9710: LLaVA1.5/llava/model/language_model/tools.py:4-38 (video@09a2984 tools.py:4-46
    adds `eps` to 2 sigma^2): per frame fft2 in float32, fftshift, Gaussian high-pass, ifftshift, ifft2, abs,
    mean over channels. z [N, C] -> [N]."""
    c = z.shape[-1]
    maps = z.float().reshape(t, hh, ww, c).permute(0, 3, 1, 2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(maps), dim=(-2, -1))
    sigma = min(hh // 2, ww // 2) * cutoff
    y, xx = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
    d2 = ((y - hh // 2) ** 2 + (xx - ww // 2) ** 2).float()
    mask = 1 - torch.exp(-d2 / (2 * sigma**2 + eps))
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)))
    return filtered.abs().mean(dim=1).reshape(-1)


def clse_evolution(s_ref: torch.Tensor, s_cur: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """tools.py:41-47: relative change clamped to 1, standardised (unbiased std), sigmoid(x / temperature)."""
    e = ((s_cur - s_ref).abs() / (s_ref.mean() + s_ref + 1e-6)).clamp(max=1)
    return torch.sigmoid((e - e.mean()) / (e.std() + 1e-6) / temperature)


def clse(loaded: LoadedModel, x: Inputs, reference: int, k_layers: list[int], counts: list[int],
         grid: tuple[int, int, int], eps: float = 0.0) -> Result:
    """zjubinchen/CLSE@cfc9710: LLaVA1.5/.../clse_model.py:119-204 and Qwen2VL/clse_qwen2vl_model.py:133-226.
    z_L = input of the reference layer; at K in K_list the score uses layer K-1's last-row attention (its own
    norm, q/k, rotary at the current positions): stage 1 evolution x attention on the grid, later stages
    attention only; topk(count) sorted; positions original; a count not below the current one is skipped
    (Qwen2-VL's rule; LLaVA's min(count, current) keeps the same tokens). Video (video@09a2984
    clse_model.py:28-176): one stage, L = 2, K = 3, per-frame grids."""
    layers = loaded.adapter.decoder_layers(loaded.model)
    h, cos, sin, pos = x.embeds, x.cos, x.sin, x.position_ids
    visual = x.visual
    original = torch.arange(x.n_visual)
    result, z_ref, attention = Result(), None, None
    for index, layer in enumerate(layers):
        if index == reference:
            z_ref = h[0, visual].clone()
        if index in k_layers:
            stage = k_layers.index(index)
            target = counts[stage]
            if len(visual) > target:
                a = attention[visual]
                if stage == 0:
                    spectral_ref = clse_spectral(z_ref, *grid, eps=eps)
                    spectral_cur = clse_spectral(h[0, visual], *grid, eps=eps)
                    a = clse_evolution(spectral_ref, spectral_cur) * a
                top = a.float().topk(target).indices.sort().values
                original = original[top]
                keep = cut(visual, top, h.shape[1])
                visual = torch.searchsorted(keep, visual[top])
                h, cos, sin, pos = h[:, keep], cos[:, keep], sin[:, keep], pos[:, keep]
            result.kept.append(original.tolist())
        if index + 1 in k_layers:
            attention = last_row_attention(layer, h, cos, sin)
        h = run_layer(layer, h, cos, sin, pos)
    result.logits = finish(loaded, h)
    return result
