"""An independent oracle of CDPruner's official LLaVA-1.5 path, written from Theia-4869/CDPruner@9541616c40fc
(cited CDP:<file>:<lines>), not from clse_exp.pruning.

It runs the stock modules of a tiny seeded LLaVA in a hand-written batch-1 loop, as the official fork does:
the CLIP tower's penultimate PATCH tokens, the projector, the CLIP text tower of the same CLIP checkpoint
loaded as the official loader loads it, the official relevance and kernel, and the greedy MAP written in its
Schur-complement (log-det) form instead of the official incremental Cholesky; the kept tokens then form a
shorter sequence with contiguous positions, run through the 32 decoder layers.
"""

from __future__ import annotations

import official_oracles as oracle
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from clse_exp.models import LoadedModel

ANSWER_LINES = ("\nAnswer the question using a single word or phrase.",  # CDP:llava/eval/model_vqa_loader.py:110
                "\nAnswer with the option's letter from the given choices directly.")  # model_vqa_science.py:81


def question_text(question: str) -> str:
    """The official loaders pass the question without its answer-format line to the text tower."""
    for line in ANSWER_LINES:
        question = question.replace(line, "")
    return question


def text_embeds(clip_dir: str, question: str) -> torch.Tensor:
    """CDP:llava/model/multimodal_encoder/clip_encoder.py:43-48, 79-89: CLIPTextModelWithProjection of the CLIP
    checkpoint; the untruncated ids (and mask) right-padded with 0 to a multiple of max_position_embeddings
    and encoded as separate rows; `.text_embeds`, one per segment."""
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    tower = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()
    width = tower.config.max_position_embeddings
    encoded = tokenizer(text=question, return_tensors="pt")
    length = encoded["input_ids"].shape[1]
    segments = -(-length // width)
    rows = {key: F.pad(value, (0, segments * width - length)).view(segments, width)
            for key, value in encoded.items()}
    return tower(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).text_embeds


def greedy_log_det(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP by its definition: each step adds the token with the largest Schur complement
    L_jj - L_jS L_SS^-1 L_Sj (the log-det gain), first index on ties; float64. Equals the incremental form of
    CDP:llava/model/llava_arch.py:169-181 while the kernel has rank to spare."""
    kernel = kernel.double()
    picked: list[int] = []
    for _ in range(count):
        gain = kernel.diagonal().clone()
        if picked:
            cross = kernel[picked]  # [s, N]
            gain -= (cross * torch.linalg.solve(kernel[picked][:, picked], cross)).sum(0)
        gain[picked] = float("-inf")
        picked.append(int(torch.argmax(gain)))
    return picked


def cdpruner(loaded: LoadedModel, inputs: dict, clip_dir: str, question: str, count: int) -> oracle.Result:
    """Kept visual indices (sorted) and the last position's logits of the official LLaVA-1.5 CDPruner path."""
    llava = loaded.model.model
    ids = inputs["input_ids"][0]
    visual = (ids == loaded.model.config.image_token_id).nonzero().flatten()
    with torch.no_grad():
        # CDP:clip_encoder.py:50-58, 75-77: hidden_states[-2] (mm_vision_select_layer), CLS dropped
        patches = llava.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        features = llava.multi_modal_projector(patches)[0]  # CDP:llava_arch.py:148
        embeds = llava.language_model.embed_tokens(ids)[None]
        embeds[0, visual] = features  # the image's features in place of its placeholder tokens
        # CDP:clip_encoder.py:38-42, 93-95: the tower's own post_layernorm, then visual_projection of the
        # CLIP checkpoint (CLIPVisionModelWithProjection), on float32 inputs
        projection = CLIPVisionModelWithProjection.from_pretrained(clip_dir).visual_projection
        image = projection(llava.vision_tower.post_layernorm(patches[0]).float())
        text = text_embeds(clip_dir, question_text(question))
        # CDP:llava_arch.py:151-160: cosine similarity of the projector outputs; negated relevance averaged over
        # text segments; min-max over the whole tensor, 1e-6 in the numerator only
        unit = (features / features.norm(dim=-1, keepdim=True)).float()
        similarity = unit @ unit.T
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        rel = (-(image @ text.T)).mean(dim=-1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        kernel = rel[:, None] * similarity * rel[None, :]  # CDP:llava_arch.py:167
        kept = sorted(greedy_log_det(kernel, count))  # CDP:llava_arch.py:183-185: sorted, as a mask
        # CDP:llava_arch.py:274-275, 292-293: only the kept features are spliced in; positions 0..L'-1
        hidden = embeds[:, oracle.cut(visual, torch.tensor(kept), len(ids))]
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = oracle.rotary(loaded, hidden, positions)
        for layer in loaded.adapter.decoder_layers(loaded.model):
            hidden = oracle.run_layer(layer, hidden, cos, sin, positions)
        return oracle.Result([kept], oracle.finish(loaded, hidden))
