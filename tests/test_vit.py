"""The shared ViT backbone: weights in the forms users have (timm, Meta's DINOv2) load key for key,
a file that does not fit is refused by name, no silent random backbone, tile sizes checked on load,
and the ViT detectors' graphs hold only ops TensorRT's parser takes."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from hiad_export.graphs import export_embedder, export_head
from hiad_export.tensorrt_ops import rejected_ops
from hiad_train.backbones import BackboneWeightsError
from hiad_train.components.vit import ViTFeatures, load_vit_weights
from hiad_train.config import ConfigError
from hiad_train.detectors import get_detector

from conftest import tiny_config

REG_VIT = dict(model_name="vit_small_patch14_reg4_dinov2", depth=2, img_size=56, num_classes=0)  # small DINOv2-reg ViT


def _fresh(seed, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(pretrained=False, **kwargs).eval()


def _features(model):
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 56, 56, 3), dtype=np.uint8))
    return ViTFeatures(model, [[0], [1]])(image)


def test_timm_safetensors_loads_key_for_key(tmp_path):
    source = _fresh(0, model_name="vit_tiny_patch16_224", depth=2, img_size=64)  # with its classifier head
    save_file(source.state_dict(), tmp_path / "vit.safetensors")
    target = _fresh(1, model_name="vit_tiny_patch16_224", depth=2, img_size=64, num_classes=0)
    load_vit_weights(target, tmp_path / "vit.safetensors")
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


def test_meta_dinov2_register_checkpoint_maps_to_timm(tmp_path):
    """Meta's layout: pos_embed covers the class token, registers are `register_tokens`, plus `mask_token`."""
    reference = _fresh(0, **REG_VIT)
    state = reference.state_dict()
    cls_position = torch.randn(1, 1, state["pos_embed"].shape[-1])
    meta = {k: v for k, v in state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta.update(register_tokens=state["reg_token"], cls_token=state["cls_token"] - cls_position,
                pos_embed=torch.cat([cls_position, state["pos_embed"]], 1), mask_token=torch.zeros(1, state["cls_token"].shape[-1]))
    torch.save({"model": meta}, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    loaded = _fresh(1, **REG_VIT)
    load_vit_weights(loaded, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    for ours, theirs in zip(_features(loaded), _features(reference)):
        torch.testing.assert_close(ours, theirs)


def test_a_file_that_does_not_fit_is_refused_by_name(tmp_path):
    state = _fresh(0, **REG_VIT).state_dict()
    state.pop("blocks.1.mlp.fc2.weight")
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    state["pos_embed"] = torch.zeros(1, 5, 384)
    save_file(state, tmp_path / "wrong.safetensors")
    with pytest.raises(BackboneWeightsError) as error:
        load_vit_weights(_fresh(1, **REG_VIT), tmp_path / "wrong.safetensors")
    message = str(error.value)
    assert "missing (1): blocks.1.mlp.fc2.weight" in message
    assert "unexpected (1): blocks.7.attn.qkv.weight" in message
    assert "shape mismatch (1): pos_embed (1, 5, 384)" in message


def test_no_weights_file_is_refused_before_training():
    config = tiny_config(detector="vitad", patch={"backbone_name": "vit_tiny_patch16_224", "layers_to_extract_from": [0, 1], "neck_layers": [2]})
    with pytest.raises(BackboneWeightsError, match="needs a local weights file.*allow_random_backbone"):
        get_detector("vitad").build_embedder(config.patch)


@pytest.mark.parametrize("tile, proposal", [(128, "126 or 140"), (512, "504 or 518")])
def test_tile_size_must_be_whole_patches(tile, proposal):
    with pytest.raises(ConfigError, match=f"patch_size: tile side {tile} px is not a multiple of .* 14: use {proposal}"):
        tiny_config(detector="dinomaly", image_size=1024, patch_size=tile, patch={"backbone_name": "vit_small_patch14_reg4_dinov2"})


def test_checkpointed_embedder_keeps_its_tile_grid():
    """The position embedding is resampled to the tiles' grid; a reload (random init) takes that grid back."""
    config = get_detector("dinomaly").Config(backbone_name="vit_small_patch14_reg4_dinov2", layers_to_extract_from=[0, 1],
                                              fuse_layer_encoder=[[0], [1]], fuse_layer_decoder=[[0], [1]], allow_random_backbone=True)
    embedder = get_detector("dinomaly").build_embedder(config)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 70, 42, 3), dtype=np.uint8))
    expected = embedder(tiles)
    assert expected[0].shape == (1, 384, 5, 3)
    reloaded = get_detector("dinomaly").build_embedder(config, pretrained=False)
    reloaded.load_state_dict(embedder.state_dict())
    for ours, theirs in zip(reloaded(tiles), expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("name, patch", [
    ("vitad", {"layers_to_extract_from": [0, 1], "neck_layers": [2]}),
    ("dinomaly", {"layers_to_extract_from": [0, 1], "fuse_layer_encoder": [[0], [1]], "decoder_depth": 2, "fuse_layer_decoder": [[0], [1]]}),
    ("inpformer", {"layers_to_extract_from": [0, 1], "fuse_layer_encoder": [[0], [1]], "decoder_depth": 2, "fuse_layer_decoder": [[0], [1]]}),
])
def test_graphs_hold_only_tensorrt_ops(name, patch, tmp_path):
    cls = get_detector(name)
    config = cls.Config(backbone_name="vit_tiny_patch16_224", allow_random_backbone=True, **patch)
    embedder = cls.build_embedder(config)
    spec = export_embedder(embedder, (64, 64), tmp_path / "embedder.onnx")
    export_head(cls(config).head(), [tuple(o.shape[1:]) for o in spec.outputs], tmp_path / "head.onnx")
    assert rejected_ops(tmp_path / "embedder.onnx") == set()
    assert rejected_ops(tmp_path / "head.onnx") == set()
