"""Keep maps: panel geometry, darkening of dropped cells read back from the PNG, and bad input."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from builder.format.errors import InputError
from builder.network.keep_map import CAPTION_H, DROPPED, GAP, MARGIN, PANEL_W, draw_keep_map

W, H = 300, 200
VW, VH = PANEL_W, round(H * PANEL_W / W)  # the view size for a wide image
S, R, C = 4, 3, 5
LAYOUT = {"base": S, "rows": R, "cols": C}
N = S * S + R * (C + 1)  # 34


def source() -> Image.Image:
    """A smooth gradient, bright enough everywhere that a 25 % darkening is unmistakable."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb = np.stack([60 + 150 * x / W, 80 + 150 * y / H, np.full_like(x, 200)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def grid_token(r: int, c: int) -> int:
    return S * S + r * (C + 1) + c


def newline_token(r: int) -> int:
    return S * S + r * (C + 1) + C


def base_token(i: int, j: int) -> int:
    return i * S + j


def stage(layer: int, dropped: set[int]) -> SimpleNamespace:
    kept = [i for i in range(N) if i not in dropped]
    return SimpleNamespace(layer=layer, tokens_in=N, tokens_kept=len(kept), kept=kept)


def expected_colour(vx: float, vy: float) -> np.ndarray:
    """The source gradient at view pixel (vx, vy), mapped back to source coordinates."""
    x, y = (vx + 0.5) * W / VW - 0.5, (vy + 0.5) * H / VH - 0.5
    return np.array([60 + 150 * x / W, 80 + 150 * y / H, 200])


def cell_centre(png: np.ndarray, panel: int, top: int, n: int, m: int, i: int, j: int):
    """PNG pixel at the centre of cell (i, j) of an n x m view whose top edge is at `top`."""
    vx, vy = int((j + 0.5) * VW / m), int((i + 0.5) * VH / n)
    x0 = MARGIN + panel * (PANEL_W + MARGIN)
    return png[top + vy, x0 + vx].astype(np.float32), expected_colour(vx, vy)


GRID_TOP = MARGIN + CAPTION_H
BASE_TOP = GRID_TOP + VH + GAP


def assert_kept(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(got - want).max() <= 3, (got, want)


def assert_dropped(got: np.ndarray, want: np.ndarray) -> None:
    assert np.all(got < want - 20), (got, want)
    assert np.abs(got - DROPPED * want).max() <= 3, (got, want)


def test_stage_panels_darken_exactly_the_dropped_cells(tmp_path):
    first = {grid_token(0, 0), grid_token(1, 2), base_token(3, 3), newline_token(1)}
    second = first | {grid_token(2, 4), base_token(0, 0)}
    stages = [stage(2, first), stage(8, second).__dict__]  # objects and dicts are both accepted
    out = draw_keep_map(source(), LAYOUT, N, stages, tmp_path / "maps" / "keep.png")

    assert out == tmp_path / "maps" / "keep.png" and out.is_file()
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] == MARGIN + 2 * (PANEL_W + MARGIN)
    assert png.shape[0] == 2 * MARGIN + CAPTION_H + 2 * VH + GAP

    for k, dropped in enumerate([first, second]):
        for i in range(R):
            for j in range(C):
                got, want = cell_centre(png, k, GRID_TOP, R, C, i, j)
                (assert_dropped if grid_token(i, j) in dropped else assert_kept)(got, want)
        for i in range(S):
            for j in range(S):
                got, want = cell_centre(png, k, BASE_TOP, S, S, i, j)
                (assert_dropped if base_token(i, j) in dropped else assert_kept)(got, want)
        caption = png[MARGIN:GRID_TOP, MARGIN + k * (PANEL_W + MARGIN):][:, :PANEL_W]
        assert (caption < 128).any(), "caption text missing"


def test_no_stages_gives_one_undarkened_panel(tmp_path):
    out = draw_keep_map(source(), LAYOUT, N, [], tmp_path / "keep.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape[1] == MARGIN + PANEL_W + MARGIN
    for i in range(R):
        for j in range(C):
            assert_kept(*cell_centre(png, 0, GRID_TOP, R, C, i, j))


def test_without_grid_only_the_base_view_is_drawn(tmp_path):
    n = S * S + 1
    layout = {"base": S, "rows": 0, "cols": 0}
    stages = [SimpleNamespace(layer=3, tokens_in=n, tokens_kept=n - 2, kept=list(range(1, n - 1)))]
    out = draw_keep_map(source(), layout, n, stages, tmp_path / "keep.png")
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (2 * MARGIN + CAPTION_H + VH, MARGIN + PANEL_W + MARGIN, 3)
    assert_dropped(*cell_centre(png, 0, GRID_TOP, S, S, 0, 0))
    assert_kept(*cell_centre(png, 0, GRID_TOP, S, S, 0, 1))
    assert_kept(*cell_centre(png, 0, GRID_TOP, S, S, 3, 3))


@pytest.mark.parametrize("bad", [-1, N])
def test_out_of_range_index_is_an_input_error(tmp_path, bad):
    st = SimpleNamespace(layer=2, tokens_in=N, tokens_kept=2, kept=[0, bad])
    with pytest.raises(InputError, match=f"kept index {bad}"):
        draw_keep_map(source(), LAYOUT, N, [st], tmp_path / "keep.png")
    assert not (tmp_path / "keep.png").exists()


def test_layout_not_matching_n_image_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="35"):
        draw_keep_map(source(), LAYOUT, N + 1, [], tmp_path / "keep.png")
    with pytest.raises(InputError, match="layout"):
        draw_keep_map(source(), {"base": 4}, N, [], tmp_path / "keep.png")
