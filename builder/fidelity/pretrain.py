"""Stage 1: dense supervised pretraining of the vision tower, standing in for CLIP's pretraining.

LLaVA starts from a pretrained CLIP and keeps it frozen while the projector and the LLM learn. A
random tower trained from scratch together with the LLM on one-word answers leaves the answer
prior too slowly for a CPU budget, so the tower first learns, for every patch, what its grid cell
holds (colour, shape), from the scene description, and where the patch sits: its place in its tile
and whether the tile is the whole image or a crop (a crop does not know where it lies in the
image; as in LLaVA, the LLM gets that from the order of the image tokens).
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from .task import COLOURS, GRID, SHAPES, Example, render


def heads(side: int) -> dict[str, int]:
    """Classes per head for tiles of side x side patches: colour and shape of the patch's cell
    (class 0 = empty), its row and column in the tile, and the tile's kind (0 = base, 1 = crop)."""
    return {"colour": 1 + len(COLOURS), "shape": 1 + len(SHAPES), "row": side, "col": side, "tile": 2}


def patch_cells(tile: int, image: int, patch: int) -> torch.Tensor:
    """(tiles, side * side, 2) grid cell (row, col) under every patch of the anyres tiles of a square
    `image`: the base tile (the whole image resized) first, then the crops row by row."""
    side, per = tile // patch, image // tile
    centre = (torch.arange(side) + 0.5) * patch
    base = (centre * GRID // tile).long()
    cells = [torch.stack(torch.meshgrid(base, base, indexing="ij"), -1)]
    for tr in range(per):
        for tc in range(per):
            r = ((tr * tile + centre) * GRID // image).long()
            c = ((tc * tile + centre) * GRID // image).long()
            cells.append(torch.stack(torch.meshgrid(r, c, indexing="ij"), -1))
    return torch.stack(cells).flatten(1, 2)


def patch_labels(ex: Example, cells: torch.Tensor) -> torch.Tensor:
    """(tiles, patches, 5) labels per patch, in the order of `heads`."""
    colour = torch.zeros(GRID, GRID, dtype=torch.long)
    shape = torch.zeros(GRID, GRID, dtype=torch.long)
    for it in ex.items:
        colour[it.row, it.col] = 1 + list(COLOURS).index(it.colour)
        shape[it.row, it.col] = 1 + SHAPES.index(it.shape)
    r, c = cells[..., 0], cells[..., 1]
    tiles, patches = r.shape
    side = math.isqrt(patches)
    where = torch.arange(patches).expand(tiles, patches)
    tile_kind = (torch.arange(tiles) > 0).long()[:, None].expand(tiles, patches)
    return torch.stack((colour[r, c], shape[r, c], where // side, where % side, tile_kind), -1)


def pretrain_tower(vision, image_processor, examples: list[Example], image: int, steps: int, batch_size: int,
                   lr: float, seed: int, log=print) -> float:
    """Train `vision.tower` on per-patch labels; returns the final accuracy over all heads."""
    tower = vision.tower
    cells = patch_cells(vision.tile, image, tower.config.patch_size)
    classes = list(heads(vision.side).values())
    head = torch.nn.Linear(tower.config.hidden_size, sum(classes))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=lr)
    rng = random.Random(seed)
    acc = 0.0
    for step in range(steps):
        chunk = rng.sample(examples, batch_size)
        pixels = image_processor([render(ex.items, image) for ex in chunk], return_tensors="pt").pixel_values
        labels = torch.stack([patch_labels(ex, cells) for ex in chunk]).flatten(0, 1)  # (B * tiles, patches, 5)
        logits = head(vision.tower_features(pixels.flatten(0, 1))).split(classes, dim=-1)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., i].flatten()) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = sum((lg.argmax(-1) == labels[..., i]).float().mean().item() for i, lg in enumerate(logits)) / len(classes)
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"tower step {step:4d}  loss {loss.item():.4f}  patch accuracy {100 * acc:.1f}%")
    return acc
