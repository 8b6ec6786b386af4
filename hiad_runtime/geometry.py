"""Tiling of a high-resolution image into patches and their context windows.

This is HiAD's `MultiResolutionHRImageSpliter` semantics, owned here (torch-free) so that training,
export and the runtime cut images in exactly the same way (hiad_runtime/plan.py merges them back).
Sizes are (width, height).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Size = tuple[int, int]
MAX_TILES = 1 << 16  # a geometry cut into more tiles is refused before any is made (8192^2 at 512: 256)


def as_size(value: int | Sequence[int], name: str = "size") -> Size:
    """An int or a (width, height) pair, as a (width, height) tuple of positive ints."""
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a (width, height) pair, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


@dataclass(frozen=True)
class Box:
    """An axis-aligned window in image pixels."""

    x: int
    y: int
    width: int
    height: int

    def to_dict(self) -> dict:
        """The box as JSON: x, y, width, height."""
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, d: dict) -> "Box":
        """The box `to_dict` wrote."""
        return cls(int(d["x"]), int(d["y"]), int(d["width"]), int(d["height"]))

    def slices(self) -> tuple[slice, slice]:
        """(rows, columns) slices that cut the box out of an (H, W, ...) array."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


@dataclass(frozen=True)
class Tile:
    """One main patch of the image and, per extra downsampling factor, its context window."""

    index: int
    row: int
    col: int
    main: Box
    context: tuple[Box, ...] = ()

    def to_dict(self) -> dict:
        """The tile as JSON, in HiAD's key names (`main_index`, `low_resolution_indexes`)."""
        return {
            "index": self.index,
            "row": self.row,
            "col": self.col,
            "main_index": self.main.to_dict(),
            "low_resolution_indexes": [b.to_dict() for b in self.context],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Tile":
        """The tile `to_dict` wrote."""
        return cls(
            int(d["index"]),
            int(d["row"]),
            int(d["col"]),
            Box.from_dict(d["main_index"]),
            tuple(Box.from_dict(b) for b in d["low_resolution_indexes"]),
        )


def tiles_along(length: int, patch: int, stride: int) -> int:
    """How many windows `_starts` places along one axis (patch <= length), counted without placing them."""
    return -(-(length - patch) // stride) + 1


def _starts(length: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis; the last window is shifted back to end at the border."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def _context_start(start: int, patch: int, window: int, length: int) -> int:
    """Start of the window-sized context that contains [start, start + patch) on the window grid."""
    begin = (start // window) * window
    if begin + window < start + patch:
        begin = start + patch - window
    return min(max(begin, 0), length - window)


@dataclass(frozen=True)
class Tiling:
    """The tiles of one image geometry; serializes to JSON for checkpoints and bundles."""

    image_size: Size
    patch_size: Size
    stride: Size
    ds_factors: tuple[int, ...]
    tiles: tuple[Tile, ...]

    @classmethod
    def create(
        cls,
        image_size: int | Sequence[int],
        patch_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        ds_factors: Sequence[int] = (0,),
    ) -> "Tiling":
        """Cut an image_size image into patch_size tiles at `stride` (default: the patch size, no overlap),
        row by row, each with one context window per ds_factor after the first (which must be 0: the tile itself).
        Refuses a geometry of more than MAX_TILES tiles before making any."""
        image_size = as_size(image_size, "image_size")
        patch_size = as_size(patch_size, "patch_size")
        stride = patch_size if stride is None else as_size(stride, "stride")
        count = cls.count(image_size, patch_size, stride)
        if count > MAX_TILES:
            (w, h), (pw, ph), (sw, sh) = image_size, patch_size, stride
            raise ValueError(
                f"a {w}x{h} image cut into {pw}x{ph} patches at stride {sw}x{sh} makes {count} tiles, "
                f"more than the limit of {MAX_TILES}"
            )
        ds_factors = tuple(int(f) for f in ds_factors)
        if (
            not ds_factors
            or ds_factors[0] != 0
            or any(f < 0 for f in ds_factors)
            or len(set(ds_factors)) != len(ds_factors)
        ):
            raise ValueError(
                f"ds_factors must start with 0 and hold distinct non-negative ints, got {list(ds_factors)}"
            )
        xs = _starts(image_size[0], patch_size[0], stride[0])
        ys = _starts(image_size[1], patch_size[1], stride[1])
        tiles = []
        for row, y in enumerate(ys):
            for col, x in enumerate(xs):
                context = []
                for f in ds_factors[1:]:
                    cw = min(patch_size[0] * 2**f, image_size[0])
                    ch = min(patch_size[1] * 2**f, image_size[1])
                    context.append(
                        Box(
                            _context_start(x, patch_size[0], cw, image_size[0]),
                            _context_start(y, patch_size[1], ch, image_size[1]),
                            cw,
                            ch,
                        )
                    )
                tiles.append(Tile(len(tiles), row, col, Box(x, y, *patch_size), tuple(context)))
        return cls(image_size, patch_size, stride, ds_factors, tuple(tiles))

    @staticmethod
    def count(
        image_size: int | Sequence[int], patch_size: int | Sequence[int], stride: int | Sequence[int] | None = None
    ) -> int:
        """How many tiles `create` makes, from the sizes alone (nothing is made): the cheap checks a
        geometry read from a manifest or a config passes before its tiles are computed."""
        (w, h), (pw, ph) = as_size(image_size, "image_size"), as_size(patch_size, "patch_size")
        sw, sh = (pw, ph) if stride is None else as_size(stride, "stride")
        if sw > pw or sh > ph:
            raise ValueError(f"stride {(sw, sh)} must not exceed patch_size {(pw, ph)} (tiles would leave gaps)")
        for length, patch in ((w, pw), (h, ph)):
            if patch > length:
                raise ValueError(f"patch size {patch} is larger than the image ({length})")
        return tiles_along(w, pw, sw) * tiles_along(h, ph, sh)

    @property
    def rows(self) -> int:
        """The number of tile rows."""
        return max(t.row for t in self.tiles) + 1

    @property
    def cols(self) -> int:
        """The number of tile columns."""
        return max(t.col for t in self.tiles) + 1

    def context_windows(self, level: int, tiles: Sequence[Tile] | None = None) -> list[Box]:
        """Distinct context windows of one ds_factor level (1-based) that `tiles` (default: all) use, in
        first-use order: each is embedded once however many tiles read it."""
        return list(dict.fromkeys(t.context[level - 1] for t in (self.tiles if tiles is None else tiles)))

    def to_dict(self) -> dict:
        """The tiling as JSON: its sizes and every tile, what checkpoints and manifests store."""
        return {
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "stride": list(self.stride),
            "ds_factors": list(self.ds_factors),
            "tiles": [t.to_dict() for t in self.tiles],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Tiling":
        """The stored tiling, checked against its recomputation; the tile count is compared first, so an
        edited image_size is refused before a single tile is made."""
        count = cls.count(d["image_size"], d["patch_size"], d["stride"])
        if count != len(d["tiles"]):
            raise ValueError(f"{len(d['tiles'])} stored tiles, but image_size/patch_size/stride make {count}")
        tiling = cls.create(d["image_size"], d["patch_size"], d["stride"], d["ds_factors"])
        stored = tuple(Tile.from_dict(t) for t in d["tiles"])
        if stored != tiling.tiles:
            raise ValueError("stored tiles disagree with the tiling recomputed from image_size/patch_size/stride")
        return tiling


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of `box` in an (H, W, ...) image (a view, not a copy)."""
    return image[box.slices()]


def split(image: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
    """Stack the main patches of `tiles` (N, patch_h, patch_w, ...)."""
    return np.stack([crop(image, t.main) for t in tiles])


def context_crop(window: Box, tile: Box, grid: tuple[int, int]) -> tuple[int, int, int, int]:
    """How a tile's part of its context window's embedding is found, on a (w, h) feature grid:
    upsample the window's grid to (up_w, up_h), the tile's own scale, then cut the grid-sized block at
    (ox, oy) (offsets rounded to whole feature cells). Returns (up_w, up_h, ox, oy)."""
    gw, gh = grid
    up_w, up_h = round(gw * window.width / tile.width), round(gh * window.height / tile.height)
    ox, oy = round((tile.x - window.x) * gw / tile.width), round((tile.y - window.y) * gh / tile.height)
    return up_w, up_h, min(ox, up_w - gw), min(oy, up_h - gh)
