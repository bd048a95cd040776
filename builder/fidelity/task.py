"""A procedural visual question task whose answers depend on a small part of the image.

Scenes are coloured shapes in the cells of a 4 x 4 grid; questions ask for the colour of a shape,
the shape of a colour, what a cell holds, or how many shapes of a colour there are. Answers are
one word. Everything is generated from a seed (no downloads), and `solve` answers a question from
the scene description alone, as an independent check of the generator.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

GRID = 4
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
BACKGROUND = (235, 232, 220)
SPLITS = {"train": 0, "val": 1, "test": 2}
# Optional openings, so that a question's length does not give its kind away: with one fixed
# phrasing per kind, a model learns the kind from the distance to the first token, and any drop
# that shortens the sequence then changes the question it thinks it was asked.
PREFIXES = ("", "Look at the image. ", "Please answer. ", "Here is a question about the image. ")


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class Example:
    items: tuple[Item, ...]
    question: str
    answer: str


def make_items(rng: random.Random) -> tuple[Item, ...]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(3, 5))
    return tuple(Item(rng.choice(SHAPES), rng.choice(list(COLOURS)), r, c) for r, c in sorted(cells))


def ask(items: tuple[Item, ...], rng: random.Random) -> tuple[str, str]:
    """One question about the scene and its answer, of a kind chosen at random among those that apply."""
    kinds = ["cell", "count"]
    unique_shapes = [s for s in SHAPES if sum(i.shape == s for i in items) == 1]
    unique_colours = [c for c in COLOURS if sum(i.colour == c for i in items) == 1]
    kinds += ["colour"] * bool(unique_shapes) + ["shape"] * bool(unique_colours)
    chosen, prefix = rng.choice(kinds), rng.choice(PREFIXES)
    if chosen == "colour":
        shape = rng.choice(unique_shapes)
        return f"{prefix}What colour is the {shape}?", next(i.colour for i in items if i.shape == shape)
    if chosen == "shape":
        colour = rng.choice(unique_colours)
        return f"{prefix}Which shape is {colour}?", next(i.shape for i in items if i.colour == colour)
    if chosen == "count":
        colour = rng.choice(list(COLOURS))
        return f"{prefix}How many {colour} shapes are there?", NUMBERS[sum(i.colour == colour for i in items)]
    row, col = rng.randrange(GRID), rng.randrange(GRID)
    held = next((i.shape for i in items if (i.row, i.col) == (row, col)), "nothing")
    return f"{prefix}What is in row {row + 1} column {col + 1}?", held


DESCRIBE = "Describe the image."


def describe(items: tuple[Item, ...], rng: random.Random) -> str:
    """The whole scene as text, every cell once in a random order: "row 3 column 1 nothing nothing
    row 1 column 2 red circle ...". Two words per cell, so every description has the same length;
    the random order makes the words of an address, not its place in the text, say which cell."""
    held = {(i.row, i.col): f"{i.colour} {i.shape}" for i in items}
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], GRID * GRID)
    return " ".join(f"row {r + 1} column {c + 1} {held.get((r, c), 'nothing nothing')}" for r, c in cells)


def descriptions(split: str, n: int, seed: int = 0) -> list[Example]:
    """The scenes of `dataset(split, n, seed)`, each asked to be described."""
    rng = random.Random(seed * 1000 + SPLITS[split] + 500)
    return [Example(ex.items, DESCRIBE, describe(ex.items, rng)) for ex in dataset(split, n, seed)]


def kind(question: str) -> str:
    """The question's kind: colour, shape, count or cell."""
    for marker, name in (("What colour", "colour"), ("Which shape", "shape"), ("How many", "count")):
        if marker in question:
            return name
    return "cell"


def dataset(split: str, n: int, seed: int = 0) -> list[Example]:
    """n examples of a split; the same (split, n, seed) always gives the same examples."""
    rng = random.Random(seed * 1000 + SPLITS[split])
    out = []
    for _ in range(n):
        items = make_items(rng)
        out.append(Example(items, *ask(items, rng)))
    return out


def render(items: tuple[Item, ...], size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    pad = cell * 0.15
    for it in items:
        x0, y0 = it.col * cell + pad, it.row * cell + pad
        x1, y1 = (it.col + 1) * cell - pad, (it.row + 1) * cell - pad
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif it.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def solve(items: tuple[Item, ...], question: str) -> str:
    """Answer a question from the scene description alone (independent of `ask`)."""
    question = re.sub(r"^(\w+ )*\w+\. ", "", question)  # an opening sentence asks nothing
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        [colour] = [i.colour for i in items if i.shape == m[1]]
        return colour
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        [shape] = [i.shape for i in items if i.colour == m[1]]
        return shape
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return NUMBERS[len([i for i in items if i.colour == m[1]])]
    if m := re.fullmatch(r"What is in row (\d) column (\d)\?", question):
        row, col = int(m[1]) - 1, int(m[2]) - 1
        return {(i.row, i.col): i.shape for i in items}.get((row, col), "nothing")
    raise ValueError(f"not a question of this task: {question!r}")
