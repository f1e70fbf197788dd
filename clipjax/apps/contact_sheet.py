"""A PNG grid of search hits: thumbnail, rank, score and file name per cell."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from clipjax import paths
from clipjax.apps.image_files import UnreadableImage, open_image
from clipjax.errors import ClipjaxError

BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
INK = (20, 20, 20)


def thumbnail(path: str, size: int) -> Image.Image:
    """The image scaled to fit a size×size box, centred on white (grey if unreadable)."""
    cell = Image.new("RGB", (size, size), BACKGROUND)
    try:
        image = open_image(path).convert("RGB")
    except UnreadableImage:
        return Image.new("RGB", (size, size), MISSING)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return cell


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Truncates `text` with an ellipsis so it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(hits: Sequence, out: str, *, title: str = "", thumb: int = 192,
                  columns: int = 5, pad: int = 8) -> str:
    """Writes the grid for `hits` (objects with .path and .score) to `out` (PNG; a local
    path or a URI)."""
    if not hits:
        raise ClipjaxError("no hits to draw in the contact sheet")
    if thumb < 16 or columns < 1:
        raise ClipjaxError(f"contact sheet needs thumb >= 16 and columns >= 1, got "
                           f"{thumb}, {columns}")
    font = _font(max(10, thumb // 14))
    line = font.getbbox("Ag")[3] + 4
    columns = min(columns, len(hits))
    rows = -(-len(hits) // columns)
    head = line + pad if title else 0
    cell_w, cell_h = thumb + pad, thumb + 2 * line + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad + head), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), _fit(draw, title, font, sheet.width - 2 * pad), fill=INK, font=font)
    for i, hit in enumerate(hits):
        x = pad + (i % columns) * cell_w
        y = pad + head + (i // columns) * cell_h
        sheet.paste(thumbnail(hit.path, thumb), (x, y))
        draw.text((x, y + thumb + 2), f"#{i + 1}  {hit.score:.3f}", fill=INK, font=font)
        name = _fit(draw, os.path.basename(hit.path), font, thumb)
        draw.text((x, y + thumb + 2 + line), name, fill=INK, font=font)
    out = os.fspath(out)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    try:
        paths.write_bytes(out, buf.getvalue())
    except OSError as e:
        raise ClipjaxError(f"cannot write contact sheet {out}: {e}") from None
    return out
