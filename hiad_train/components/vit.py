"""The plain ViT encoder shared by ViTAD, Dinomaly and INP-Former: a timm VisionTransformer (DINO,
DINOv2) or a timm Eva (DINOv3: RoPE, registers, layer scale), its weights read from a local file, and
the token grids of chosen blocks as (B, C, h, w) maps.

No registry that this project can reach ships DINO/DINOv2/DINOv3 weights, so the weights come from a file the
user downloads (docs/vit_weights.md) in one of the forms people have:
  - timm: a `.safetensors`/`.pth`/`.bin` state dict in timm's key names (optionally under `model`/`state_dict`);
  - Meta's DINOv2 `.pth` (`dinov2_vits14_reg4_pretrain.pth`, ...): recognized by its `mask_token`;
    `register_tokens` become timm's `reg_token`, and for register models the class token's position
    is folded into `cls_token` (timm keeps no position for prefix tokens there);
  - Meta's DINOv3 `.pth` (`dinov3_vits16_pretrain_lvd1689m-*.pth`, ...): recognized by its `storage_tokens`
    and mapped by timm's own `eva.checkpoint_filter_fn`.
Keys are mapped explicitly; anything missing or left over is named in the error. Without a file the
encoder refuses to build, unless `allow_random_backbone: true` (tests: a random ViT measures plumbing).

A ViT's position embedding is learned for one grid. Models are built with a fixed grid
(`dynamic_img_size=False`), and the embedder moves it (timm's `set_input_size`: a bicubic resample of
the position embedding, or DINOv3's RoPE table recomputed) to the grid of the tiles it is given, once
per tile size and before export, so the exported graph holds the positions of the tile's grid as
constants and computes none.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path
from typing import Sequence

import timm
import torch
from timm.models import eva
from torch import nn

from hiad_train.backbones import BackboneWeightsError, _state_dict_from_file
from hiad_train.embedders import PixelNormalize

IGNORED_PREFIXES = ("head.", "fc_norm.")  # classifier weights of timm checkpoints: the encoder has no head
ENCODERS = (timm.models.VisionTransformer, eva.Eva)  # DINO/DINOv2 ViTs; DINOv3 (timm builds it as Eva)


def build_timm_vit(name: str) -> nn.Module:
    """The timm encoder `name` without classifier, its position grid fixed (moved by `set_input_size`)."""
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=False)


@functools.cache
def vit_geometry(name: str) -> dict:
    """Patch size, width, depth and prefix tokens of a timm ViT, read from a weightless (meta) instance."""
    try:
        with torch.device("meta"):
            model = build_timm_vit(name)
    except RuntimeError as e:
        raise ValueError(f"backbone_name: {name!r} is not a timm model ({e})") from None
    if not isinstance(model, ENCODERS):
        raise ValueError(
            f"backbone_name: {name!r} is a {type(model).__name__}, not a timm VisionTransformer or Eva (DINOv3)"
        )
    return {
        "patch": model.patch_embed.patch_size[0],
        "width": model.embed_dim,
        "depth": len(model.blocks),
        "heads": model.blocks[0].attn.num_heads,
        "prefix_tokens": model.num_prefix_tokens,
    }


def timm_keys(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint in timm's names (or Meta's DINOv3 / DINOv2 names, recognized by `storage_tokens` /
    `mask_token`) -> timm's names."""
    source = {k.removeprefix("module."): v for k, v in source.items()}
    if "storage_tokens" in source:
        return dinov3_keys(source, model)
    if "mask_token" not in source:
        return {k: v for k, v in source.items() if not k.startswith(IGNORED_PREFIXES)}
    out = {k: v for k, v in source.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    cls_token, pos_embed = source.get("cls_token"), source.get("pos_embed")
    if "register_tokens" in source:
        out["reg_token"] = source["register_tokens"]
        if cls_token is not None and pos_embed is not None:  # timm's register ViTs give prefix tokens no position
            cls_token, pos_embed = cls_token + pos_embed[:, :1], pos_embed[:, 1:]
    for key, value in (("cls_token", cls_token), ("pos_embed", pos_embed)):
        if value is not None:
            out[key] = value
    return out


def dinov3_keys(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 names -> timm's, by timm's `eva.checkpoint_filter_fn` (`storage_tokens` -> `reg_token`,
    `ls1/ls2.gamma` -> `gamma_1/2`, `qkv.bias` -> `q_bias`/`v_bias`; `mask_token`, RoPE periods dropped).
    The filter also drops `qkv.bias` for a model built without q/v biases: refused here unless it is zero."""
    with contextlib.redirect_stdout(io.StringIO()):  # the filter prints each bias it drops; checked below instead
        out = eva.checkpoint_filter_fn(source, model)
    dropped = [
        k
        for k, v in source.items()
        if k.endswith("qkv.bias") and k.replace("qkv.bias", "q_bias") not in out and v.any()
    ]
    if dropped:
        raise BackboneWeightsError(
            f"the DINOv3 file has non-zero attention biases ({', '.join(dropped[:3])}, ...) that "
            f"{model.default_cfg.get('architecture', type(model).__name__)} has no place for: use its `_qkvb` variant"
        )
    return out


def load_vit_weights(model: nn.Module, path: str | Path) -> None:
    """Load a timm, Meta DINOv2 or Meta DINOv3 checkpoint into `model`, naming missing, unexpected or misshapen keys."""
    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"backbone_weights {path} does not exist (see docs/vit_weights.md for the files)")
    try:
        raw = _state_dict_from_file(path)
    except Exception as e:  # not a checkpoint: a truncated download, an HTML page, ...
        raise BackboneWeightsError(
            f"backbone_weights {path}: cannot read it as a state dict ({type(e).__name__}: {e})"
        ) from e
    try:
        state = timm_keys(raw, model)
    except BackboneWeightsError as e:
        raise BackboneWeightsError(f"backbone_weights {path.name}: {e}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or misshapen:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen))
            if keys
        ]
        raise BackboneWeightsError(
            f"backbone_weights {path.name} does not fit {type(model).__name__} "
            f"{getattr(model, 'default_cfg', {}).get('architecture', '')}: "
            + "; ".join(parts)
            + ". Check backbone_name matches the file (e.g. dinov2_vitb14_reg4_pretrain.pth -> "
            "vit_base_patch14_reg4_dinov2, dinov3_vits16_pretrain_*.pth -> vit_small_patch16_dinov3)."
        )
    model.load_state_dict({k: state[k] for k in own})


def create_vit(config, last_block: int, pretrained: bool = True) -> nn.Module:
    """The timm ViT of a ViT detector config, with weights from `backbone_weights` (pretrained) or random
    (checkpoint loads, `allow_random_backbone`); blocks past the last chosen one and the classifier are dropped."""
    model = build_timm_vit(config.backbone_name)
    if pretrained:
        if config.backbone_weights is not None:
            load_vit_weights(model, config.backbone_weights)
        elif not config.allow_random_backbone:
            raise BackboneWeightsError(
                f"{config.backbone_name} needs a local weights file: set `backbone_weights: /path/to/file` in the "
                f"detector config (docs/vit_weights.md lists the files and where they come from). "
                f"A random backbone is refused unless `allow_random_backbone: true` (tests only)."
            )
    model.prune_intermediate_layers([last_block], prune_norm=True)
    return model.eval().requires_grad_(False)


class ViTFeatures(nn.Module):
    """uint8 (B, H, W, 3) tiles -> per group of blocks, the mean of their patch tokens as a (B, C, H/p, W/p)
    map (prefix tokens dropped). A group of one block is that block's output as it is."""

    def __init__(self, vit: nn.Module, groups: Sequence[Sequence[int]]):
        super().__init__()
        self.normalize = PixelNormalize(vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"])
        self.vit = vit
        self.groups = [list(g) for g in groups]
        self.blocks = sorted({b for g in self.groups for b in g})
        self.patch = vit.patch_embed.patch_size[0]
        self.channels = [vit.embed_dim] * len(self.groups)
        self.reductions = [self.patch] * len(self.groups)
        self.register_buffer("grid", torch.tensor(vit.patch_embed.grid_size))  # (rows, cols) of the position embedding
        self._register_load_state_dict_pre_hook(self._fit_saved_grid)

    @classmethod
    def create(cls, config, groups: Sequence[Sequence[int]], pretrained: bool = True) -> "ViTFeatures":
        """For a ViT detector config: its backbone and weights, read at the blocks of `groups`."""
        return cls(create_vit(config, max(max(g) for g in groups), pretrained), groups).eval()

    def _regrid(self, grid: tuple[int, int]) -> None:
        if tuple(self.vit.patch_embed.grid_size) != grid:
            self.vit.set_input_size(img_size=(grid[0] * self.patch, grid[1] * self.patch))
            self.grid.copy_(torch.tensor(grid))

    def _fit_saved_grid(self, state, prefix, *args) -> None:
        """A checkpoint holds the position embedding at its tile grid: take that grid before loading."""
        saved = state.get(prefix + "grid")
        if saved is not None:
            self._regrid(tuple(int(v) for v in saved))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        height, width = image.shape[1:3]
        if height % self.patch or width % self.patch:
            raise ValueError(f"tile {width}x{height} is not a multiple of the ViT patch size {self.patch}")
        self._regrid((height // self.patch, width // self.patch))
        maps = dict(
            zip(
                self.blocks,
                self.vit.forward_intermediates(self.normalize(image), indices=self.blocks, intermediates_only=True),
            )
        )
        return tuple(sum(maps[b] for b in g) / len(g) if len(g) > 1 else maps[g[0]] for g in self.groups)
