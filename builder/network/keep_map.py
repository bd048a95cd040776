"""Keep maps: which image tokens of one LLaVA-NeXT image survived each PyramidDrop stage.

One panel per stage, left to right: the R x C grid view above the S x S base view, dropped cells
darkened. Newline tokens cover no pixels, so they are only counted in the caption.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..format.errors import InputError

PANEL_W = 256  # width of one panel; the image is fitted inside PANEL_W x MAX_VIEW_H
MAX_VIEW_H = 384  # so that very tall images do not make a huge picture
MARGIN = 4  # around and between panels
CAPTION_H = 28  # two caption lines
GAP = 4  # between the grid view and the base view
DROPPED = 0.25  # brightness factor of dropped cells: dim enough to see, bright enough to recognise
BACKGROUND = (255, 255, 255)


def _field(stage: Any, name: str) -> Any:
    """Stages come as StageStats objects or as their to_dict() form (e.g. read back from JSON)."""
    return stage[name] if isinstance(stage, dict) else getattr(stage, name)


def _split(layout: dict, n_image: int) -> tuple[int, int, int]:
    """Check the layout against n_image and return (S, R, C)."""
    try:
        s, r, c = int(layout["base"]), int(layout["rows"]), int(layout["cols"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"keep map: layout needs integer 'base', 'rows', 'cols', got {layout!r}") from e
    if s <= 0 or r < 0 or c < 0 or (r > 0 and c == 0):
        raise InputError(f"keep map: impossible layout {layout!r}")
    expected = s * s + (r * (c + 1) if r else 1)
    if n_image != expected:
        raise InputError(f"keep map: layout {layout!r} has {expected} image tokens, not {n_image}")
    return s, r, c


def _alive(kept: Sequence[int], n_image: int) -> np.ndarray:
    """Boolean mask over the original image-token order."""
    idx = np.asarray(list(kept), dtype=np.int64)
    bad = idx[(idx < 0) | (idx >= n_image)]
    if bad.size:
        raise InputError(f"keep map: kept index {int(bad[0])} outside [0, {n_image})")
    alive = np.zeros(n_image, dtype=bool)
    alive[idx] = True
    return alive


def _shade(view: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Darken the pixels of dropped cells; cell (i, j) covers [i*h/n, (i+1)*h/n) x [j*w/m, ...)."""
    h, w = view.shape[:2]
    n, m = cells.shape
    ys = np.arange(h) * n // h
    xs = np.arange(w) * m // w
    keep = cells[ys][:, xs]
    out = view.astype(np.float32) * np.where(keep, 1.0, DROPPED)[..., None]
    return out.round().astype(np.uint8)


def _fit(image: Image.Image) -> Image.Image:
    """The image at panel size, aspect preserved."""
    rgb = image.convert("RGB")
    scale = min(PANEL_W / rgb.width, MAX_VIEW_H / rgb.height)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return rgb.resize(size, Image.Resampling.BILINEAR)


def _panel(view: np.ndarray, alive: np.ndarray, s: int, r: int, c: int, title: str) -> Image.Image:
    """One stage: caption, then the grid view (if any) above the base view."""
    vh, vw = view.shape[:2]
    x = (PANEL_W - vw) // 2
    panel = Image.new("RGB", (PANEL_W, CAPTION_H + (vh + GAP) * bool(r) + vh), BACKGROUND)
    base = alive[:s * s].reshape(s, s)
    rest = alive[s * s:]
    if r:
        rows = rest.reshape(r, c + 1)  # each grid row ends with its newline token
        panel.paste(Image.fromarray(_shade(view, rows[:, :c])), (x, CAPTION_H))
        newlines = f"newlines {int(rows[:, c].sum())}/{r}"
    else:
        newlines = f"newlines {int(rest.sum())}/1"
    panel.paste(Image.fromarray(_shade(view, base)), (x, panel.height - vh))
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default()
    draw.multiline_text((2, 1), f"{title}\n{newlines}", fill=(0, 0, 0), font=font, spacing=4)
    return panel


def draw_keep_map(image: Image.Image, layout: dict, n_image: int, stages: list,
                  out_path: str | os.PathLike) -> Path:
    """Write a PNG with one keep-map panel per drop stage (one "no drop" panel if there are none).

    layout is {"base": S, "rows": R, "cols": C}: the image tokens are S*S base tokens (row-major)
    then R rows of C grid tokens each followed by a newline token (just one newline when R == 0).
    Each stage gives layer, tokens_in, tokens_kept and kept, the sorted indices of the surviving
    tokens in the original image-token order [0, n_image). Raises InputError on a layout that does
    not match n_image or an index out of range. Returns the path written.
    """
    s, r, c = _split(layout, n_image)
    view = np.asarray(_fit(image))
    if stages:
        specs = [(f"layer {_field(st, 'layer')}: {_field(st, 'tokens_kept')}/{_field(st, 'tokens_in')} kept",
                  _alive(_field(st, "kept"), n_image)) for st in stages]
    else:
        specs = [(f"no drop: {n_image}/{n_image} kept", np.ones(n_image, dtype=bool))]
    panels = [_panel(view, alive, s, r, c, title) for title, alive in specs]
    size = (MARGIN + len(panels) * (PANEL_W + MARGIN), panels[0].height + 2 * MARGIN)
    sheet = Image.new("RGB", size, BACKGROUND)
    for k, panel in enumerate(panels):
        sheet.paste(panel, (MARGIN + k * (PANEL_W + MARGIN), MARGIN))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target and rename, so a reader never sees a half-written PNG
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
