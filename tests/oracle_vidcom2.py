"""Oracle: VidCom2's official path for one video prompt, batch 1, transcribed step by step from the official source
(xuyang-liu16/VidCom2@944a17d14f4848ad080a65eab2b0711a760fa154, cited VC:<file>:<lines>, `vidcom2.py` =
token_compressor/vidcom2/vidcom2.py, `models/` = token_compressor/vidcom2/models/), not from clse_exp.

- `vidcom2_compression` (VC:vidcom2.py:15-36) on the video's [F * P, C] LLM input embeddings, returning the kept
  row indices (the linear mapper, VC:vidcom2.py:83-91, 99-103).
- LLaVA-OneVision (VC:models/llava.py:152-168, 340-353): the kept rows, then the one newline token, spliced in
  place of the video; the shorter sequence runs the stock language model with arange positions.
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (VC:models/qwen2_5_vl.py:89-183, models/qwen3_vl.py:134-232): per video (its
  video_grid_thw row: t frames of h * w / merge^2 tokens) the kept rows; every non-video token plus the kept video
  tokens, sorted, slice the embeddings and the position ids get_rope_index gave the UNPRUNED prompt; Qwen3-VL's
  DeepStack video features are cut at the same rows and passed with the pruned video mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clse_exp.models import LoadedModel


# ------------------------------------------------------------------------------------ VC:vidcom2.py
def select_low_var_channels(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:  # VC:vidcom2.py:38-43
    variances = x.var(dim=0, unbiased=False)
    k = int(x.shape[-1] * ratio)
    _, topk_idx = torch.topk(variances, k=k, largest=False)
    return x[:, topk_idx]


def multi_scale_gaussian(x: torch.Tensor, center: torch.Tensor, alphas: list[float]) -> torch.Tensor:  # :59-62
    dist_sq = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in alphas)


def compute_gaussian_scores(x: torch.Tensor, tpf: int) -> tuple[torch.Tensor, torch.Tensor]:  # :45-57
    frames = x.view(-1, tpf, x.shape[-1])
    frames = F.normalize(frames, dim=-1)
    vid_center = frames.mean(dim=(0, 1), keepdim=True)
    frame_center = frames.mean(dim=1, keepdim=True)
    alphas = [2**k for k in range(-3, 2)]
    return multi_scale_gaussian(frames, vid_center, alphas), multi_scale_gaussian(frames, frame_center, alphas)


def compute_scales(scores: torch.Tensor, base: float, temp: float = 0.01) -> torch.Tensor:  # :64-68
    probs = F.softmax((scores - scores.max()) / temp, dim=0)
    scales = base * (1 + probs - probs.mean())
    return scales.clamp(max=1.0)


def select_outlier_indices(scores: torch.Tensor, scales: torch.Tensor, tpf: int) -> list[torch.Tensor]:  # :70-78
    ks = (scales * tpf).round().long().clamp(min=1).tolist()
    out = []
    for i, k in enumerate(ks):
        _, idx = torch.topk(scores[i], k=k, largest=False, sorted=False)
        out.append(idx.sort().values)
    return out


def vidcom2_compression(flat: torch.Tensor, tpf: int, base_scale: float, ratio: float = 0.5,
                        temp: float = 0.01) -> torch.Tensor:
    """VC:vidcom2.py:26-36 with the linear mapper (:89-91, :99-103): the kept row indices of `flat`, ascending."""
    sel_feat = select_low_var_channels(flat, ratio)
    vid_score, frame_score = compute_gaussian_scores(sel_feat, tpf)
    scales = compute_scales(-vid_score.mean(dim=-1), base_scale, temp)
    indices = select_outlier_indices(vid_score + frame_score, scales, tpf)
    stride = flat.shape[0] // len(indices)
    offsets = torch.arange(len(indices)) * stride
    return torch.cat([idx + off for idx, off in zip(indices, offsets, strict=True)])


# ------------------------------------------------------------------------------------ the models
@dataclass
class Pruned:
    kept: list[int]  # kept indices among the prompt's video tokens (newline excluded), ascending
    logits: torch.Tensor  # [V] at the last position


def lm_logits(loaded: LoadedModel, **kwargs) -> torch.Tensor:
    out = loaded.model.model.language_model(**kwargs)
    return loaded.model.lm_head(out.last_hidden_state)[0, -1]


def llava_onevision(loaded: LoadedModel, inputs: dict, base_scale: float, ratio: float = 0.5,
                    temp: float = 0.01) -> Pruned:
    """VC:models/llava.py:152-168: one video, F x P pooled tokens then the newline; arange positions (:340-353)."""
    model = loaded.model
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output[0]
        newline = model.model.image_newline[None]
        assert torch.equal(video[-1:], newline)  # transformers appends the video's one newline last
        flat = video[:-1]  # the pooled frames, flattened: the official flattened_image_feature (VC:llava.py:154)
        frames = inputs["pixel_values_videos"].shape[1]
        tpf = flat.shape[0] // frames
        kept = vidcom2_compression(flat, tpf, base_scale, ratio, temp)
        positions = (ids == model.config.video_token_id).nonzero().flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        assert end - start == frames * tpf + 1
        h = torch.cat([embeds[0, :start], flat[kept], newline, embeds[0, end:]])[None]
        logits = lm_logits(loaded, inputs_embeds=h)
    return Pruned(kept.tolist(), logits)


def qwen(loaded: LoadedModel, inputs: dict, base_scale: float, ratio: float = 0.5, temp: float = 0.01) -> Pruned:
    """VC:models/qwen2_5_vl.py:132-183 (qwen2_vl.py and qwen3_vl.py alike; Qwen3-VL also cuts DeepStack)."""
    model = loaded.model.model
    ids = inputs["input_ids"]
    grid = inputs["video_grid_thw"]
    merge = model.visual.spatial_merge_size
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        out = model.get_video_features(inputs["pixel_values_videos"], grid, return_dict=True)
        video_embeds = torch.cat(list(out.pooler_output), dim=0)
        deepstack = getattr(out, "deepstack_features", None)
        video_mask = ids == model.config.video_token_id
        embeds = embeds.masked_scatter(video_mask[..., None].expand_as(embeds), video_embeds)
        rope_kwargs = dict(attention_mask=inputs["attention_mask"])
        if "second_per_grid_ts" in inputs:
            rope_kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        position_ids, _ = model.get_rope_index(ids, inputs["mm_token_type_ids"], None, grid, **rope_kwargs)
        split_sizes = (grid.prod(-1) // merge**2).tolist()
        kept, offset = [], 0
        for (_, h, w), feat in zip(grid.tolist(), torch.split(video_embeds, split_sizes), strict=True):
            frame_tokens = (h * w) // merge**2  # VC:models/qwen2_5_vl.py:24-25
            kept.append(vidcom2_compression(feat, frame_tokens, base_scale, ratio, temp) + offset)
            offset += feat.shape[0]
        kept = torch.cat(kept).sort().values  # :153
        video_positions = video_mask[0].nonzero().flatten()
        others = (~video_mask[0]).nonzero().flatten()
        keep = torch.cat([others, video_positions[kept]]).sort().values  # :156-160
        kwargs = dict(inputs_embeds=embeds[:, keep], position_ids=position_ids[:, :, keep])
        if deepstack is not None:  # VC:models/qwen3_vl.py:156-165, 217-220
            kwargs["visual_pos_masks"] = video_mask[:, keep]
            # transformers gives per DeepStack level a tuple of per-video rows: concatenated, as the video embeds
            kwargs["deepstack_visual_embeds"] = [torch.cat(list(level))[kept] for level in deepstack]
        logits = lm_logits(loaded, **kwargs)
    return Pruned(kept.tolist(), logits)


def vidcom2(loaded: LoadedModel, inputs: dict, base_scale: float, **knobs) -> Pruned:
    if loaded.model.config.model_type == "llava_onevision":
        return llava_onevision(loaded, inputs, base_scale, **knobs)
    return qwen(loaded, inputs, base_scale, **knobs)
