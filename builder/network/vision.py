"""Vision side of LLaVA-NeXT: CLIP tower, projector and the anyres packing of tile features.

The tower is transformers' CLIP vision model; packing follows `LlavaNextModel.pack_image_features`:
base tile first, then the unpadded grid map row by row with `image_newline` after every row.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.activations import ACT2FN
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)


def max_tiles(spec: dict) -> int:
    """Most tiles one image is cut into: the base tile plus the largest anyres grid."""
    tile = spec["vision_config"]["image_size"]
    return 1 + max((h // tile) * (w // tile) for h, w in spec["image_grid_pinpoints"])


def _grid_tokens(spec: dict, pinpoint: tuple[int, int]) -> int:
    """Image tokens of the anyres grid of an image exactly the size of `pinpoint`, newlines included."""
    tile = spec["vision_config"]["image_size"]
    side = tile // spec["vision_config"]["patch_size"]
    return (pinpoint[0] // tile * side) * (pinpoint[1] // tile * side + 1)


def largest_pinpoint(spec: dict) -> tuple[int, int]:
    """The grid pinpoint (height, width) of the largest anyres image: the one with the most image tokens."""
    return tuple(max(spec["image_grid_pinpoints"], key=lambda p: _grid_tokens(spec, p)))


def largest_image_tokens(spec: dict) -> int:
    """Image tokens of the largest anyres image: the base tile's, then its grid's."""
    side = spec["vision_config"]["image_size"] // spec["vision_config"]["patch_size"]
    return side * side + _grid_tokens(spec, largest_pinpoint(spec))


def merge(embeds: torch.Tensor, start: int, feats: torch.Tensor) -> torch.Tensor:
    """Text embeddings (B, L, dim) whose image-token span [start, start + N) is replaced by the
    packed image features (B, N, dim): LLaVA's one step from two modalities to one sequence."""
    return torch.cat((embeds[:, :start], feats, embeds[:, start + feats.shape[1]:]), dim=1)


class Projector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionEncoder(nn.Module):
    """pixel_values of one image (patches, 3, H, W) + its (height, width) -> (n_image_tokens, text_dim)."""

    def __init__(self, spec: dict, text_dim: int, attention: str = "sdpa"):
        super().__init__()
        self.spec = spec
        fields = dict(spec["vision_config"])
        vision_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        vision_config._attn_implementation = attention  # "eager" for ONNX export, as TensorRT-LLM does
        self.tower = AutoModel.from_config(vision_config)
        self.projector = Projector(vision_config.hidden_size, text_dim, spec["projector_hidden_act"],
                                   spec["multimodal_projector_bias"])
        self.image_newline = nn.Parameter(torch.zeros(text_dim))
        self.tile = vision_config.image_size
        self.side = vision_config.image_size // vision_config.patch_size  # feature map side of one tile

    def num_patches(self, image_size: tuple[int, int]) -> int:
        return image_size_to_num_patches(list(image_size), self.spec["image_grid_pinpoints"], self.tile)

    def forward(self, pixel_values: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Returns the packed features and their layout: a base x base block, then rows x (cols + 1)."""
        return self.pack(self.features(pixel_values[:self.num_patches(image_size)]), image_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles (any number, of any images) (n, 3, H, W) -> projected features (n, side*side, dim)."""
        return self.projector(self.tower_features(pixel_values))

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP layer the projector reads, CLS dropped under the "default" strategy."""
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.spec["vision_feature_layer"]]
        if self.spec["vision_feature_select_strategy"] == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return hidden

    def pack(self, feats: torch.Tensor, image_size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        base, tiles = feats[0], feats[1:]
        if tiles.shape[0] == 0:
            layout = {"base": self.side, "rows": 0, "cols": 0}
            return torch.cat((base, self.image_newline[None].to(base)), dim=0), layout
        rows, cols = get_anyres_image_grid_shape(list(image_size), self.spec["image_grid_pinpoints"], self.tile)
        s, dim = self.side, feats.shape[-1]
        grid = tiles.view(rows, cols, s, s, dim).permute(4, 0, 2, 1, 3)  # (dim, rows, s, cols, s)
        grid = unpad_image(grid.reshape(dim, rows * s, cols * s), list(image_size))  # (dim, R, C)
        newline = self.image_newline[:, None, None].expand(dim, grid.shape[1], 1).to(grid)
        layout = {"base": self.side, "rows": grid.shape[1], "cols": grid.shape[2]}
        grid = torch.cat((grid, newline), dim=-1)  # (dim, R, C + 1)
        return torch.cat((base, grid.flatten(1).T), dim=0), layout

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Engine names (`tower.*` without CLIP's `vision_model.` level) into this module."""
        own = self.state_dict().keys()
        fixed = {}
        for name, t in state.items():
            if name.startswith("tower.") and name not in own:
                name = "tower.vision_model." + name[len("tower."):]
            fixed[name] = t
        self.load_state_dict(fixed, strict=True)
