"""Kept visual tokens drawn over the input image: pruned token cells are dimmed."""

from __future__ import annotations

from PIL import Image, ImageDraw


def kept_overlay(image: Image.Image, grid: tuple[int, int, int], kept: list[int], offset: int = 0) -> Image.Image:
    """`grid` (T, H, W) of the image's tokens, `kept` ORIGINAL indices of the sample (`offset` = the image's
    first token among the sample's visual tokens); only frame 0 is drawn."""
    _, rows, cols = grid
    canvas = image.convert("RGB").copy()
    shade = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept_here = {k - offset for k in kept if offset <= k < offset + rows * cols}
    cell_w, cell_h = canvas.width / cols, canvas.height / rows
    for index in range(rows * cols):
        if index not in kept_here:
            r, c = divmod(index, cols)
            draw.rectangle((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h), fill=(0, 0, 0, 160))
    return Image.alpha_composite(canvas.convert("RGBA"), shade).convert("RGB")
