"""The procedural task: deterministic, its answers checked by the independent solver, and drawn
where the scene says."""
from __future__ import annotations

from collections import Counter

from builder.fidelity.task import COLOURS, GRID, PREFIXES, dataset, descriptions, kind, render, solve


def test_same_seed_same_examples_and_splits_differ():
    assert dataset("train", 200, seed=3) == dataset("train", 200, seed=3)
    assert dataset("train", 50, seed=3) != dataset("test", 50, seed=3)
    assert dataset("train", 50, seed=3) != dataset("train", 50, seed=4)


def test_solver_agrees_with_every_answer():
    examples = dataset("train", 3000) + dataset("test", 1000)
    for ex in examples:
        assert solve(ex.items, ex.question) == ex.answer
    kinds = Counter(kind(ex.question) for ex in examples)
    assert len(kinds) == 4 and min(kinds.values()) > 300  # every kind of question is well represented
    lengths = {k: {len(ex.question.split()) for ex in examples if kind(ex.question) == k} for k in kinds}
    assert all(len(n) == len(PREFIXES) for n in lengths.values())  # a question's length does not give its kind
    assert len({ex.answer for ex in examples}) >= 10


def test_items_are_drawn_in_their_cells():
    for ex in dataset("val", 20):
        image = render(ex.items, size=112)
        cell = 112 // GRID
        for it in ex.items:
            # the centre of a cell holding a shape has the shape's colour
            centre = image.getpixel((it.col * cell + cell // 2, it.row * cell + cell * 2 // 3))
            assert centre == COLOURS[it.colour]
        empty = {(r, c) for r in range(GRID) for c in range(GRID)} - {(i.row, i.col) for i in ex.items}
        for r, c in empty:
            assert image.getpixel((c * cell + cell // 2, r * cell + cell // 2)) == (235, 232, 220)



def test_descriptions_say_what_every_cell_holds():
    """Read back: every cell is named once, the shape named for it is the solver's answer for that
    cell, the colour is the item's, and every description has the same number of words (so batches
    need no padding); the order of the cells differs between scenes."""
    orders = set()
    for scene, ex in zip(dataset("val", 200), descriptions("val", 200)):
        assert ex.items == scene.items
        words = ex.answer.split()
        assert len(words) == GRID * GRID * 6
        colours = {(i.row, i.col): i.colour for i in ex.items}
        cells = []
        for at in range(0, len(words), 6):
            row_word, row, column_word, col, colour, shape = words[at:at + 6]
            assert (row_word, column_word) == ("row", "column")
            cells.append((int(row) - 1, int(col) - 1))
            assert solve(ex.items, f"What is in row {row} column {col}?") == shape
            assert colour == colours.get(cells[-1], "nothing")
        assert sorted(cells) == [(r, c) for r in range(GRID) for c in range(GRID)]
        orders.add(tuple(cells))
    assert len(orders) == 200
