"""The shared ViT backbone: weights in the forms users have (timm, Meta's DINOv2 and DINOv3) load key
for key, a file that does not fit is refused by name, no silent random backbone, tile sizes checked on
load, and the ViT detectors' graphs (DINOv3's RoPE included) hold only ops TensorRT's parser takes and
match PyTorch."""

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from hiad_export.graphs import export_embedder, export_head
from hiad_export.tensorrt_ops import op_types, rejected_ops
from hiad_train.backbones import BackboneWeightsError
from hiad_train.components.vit import ViTFeatures, load_vit_weights
from hiad_train.config import ConfigError
from hiad_train.detectors import get_detector

REG_VIT = dict(model_name="vit_small_patch14_reg4_dinov2", depth=2, img_size=56, num_classes=0)  # small DINOv2-reg ViT
DINOV3 = dict(depth=2, img_size=64, num_classes=0, dynamic_img_size=False)  # small DINOv3 (timm Eva), 4x4 grid


def _fresh(seed, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(pretrained=False, **kwargs).eval()


def _perturbed(model, seed=0):
    """Every weight moved off its init (DINOv3's layer scale starts at 1e-5: its blocks would pass tokens through)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _tiles(size, batch=1):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def _features(model, size=56):
    return ViTFeatures(model, [[0], [1]])(_tiles(size))


def _meta_dinov3(state):
    """timm's DINOv3 state dict in Meta's names: the inverse of timm's eva.checkpoint_filter_fn, with what Meta's
    files carry besides (mask_token, RoPE periods, the masked k part of qkv.bias, zero biases of no-bias models)."""
    names = {"reg_token": "storage_tokens", "gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}
    meta = {"mask_token": torch.zeros(1, state["cls_token"].shape[-1]), "rope_embed.periods": torch.ones(16)}
    for key, value in state.items():
        if key.endswith("attn.qkv.weight"):
            q = state.get(key.replace("qkv.weight", "q_bias"), torch.zeros(value.shape[1]))
            v = state.get(key.replace("qkv.weight", "v_bias"), torch.zeros(value.shape[1]))
            meta[key.replace("weight", "bias")] = torch.cat([q, torch.zeros_like(q), v])
            meta[key.replace("weight", "bias_mask")] = torch.cat(
                [torch.ones_like(q), torch.zeros_like(q), torch.ones_like(v)]
            )
        if not key.endswith(("q_bias", "v_bias")):
            meta[".".join(names.get(part, part) for part in key.split("."))] = value
    return meta


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
    meta.update(
        register_tokens=state["reg_token"],
        cls_token=state["cls_token"] - cls_position,
        pos_embed=torch.cat([cls_position, state["pos_embed"]], 1),
        mask_token=torch.zeros(1, state["cls_token"].shape[-1]),
    )
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


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
@pytest.mark.parametrize("layout", ["timm", "meta"])
def test_dinov3_loads_from_timm_and_meta_files(name, layout, tmp_path):
    reference = _perturbed(_fresh(0, model_name=name, **DINOV3))
    path = tmp_path / ("model.safetensors" if layout == "timm" else "dinov3_vits16_pretrain_lvd1689m.pth")
    if layout == "timm":
        save_file(reference.state_dict(), path)
    else:
        torch.save(_meta_dinov3(reference.state_dict()), path)
    loaded = _fresh(1, model_name=name, **DINOV3)
    load_vit_weights(loaded, path)
    for ours, theirs in zip(_features(loaded, 64), _features(reference, 64)):
        assert ours.shape == (1, 384, 4, 4)  # class and 4 register tokens dropped
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_dinov3_file_that_does_not_fit_is_refused_by_name(tmp_path):
    meta = _meta_dinov3(_perturbed(_fresh(0, model_name="vit_small_patch16_dinov3_qkvb", **DINOV3)).state_dict())
    meta["blocks.2.ls1.gamma"] = meta.pop("blocks.1.ls2.gamma")
    torch.save(meta, tmp_path / "odd.pth")
    with pytest.raises(
        BackboneWeightsError, match=r"missing \(1\): blocks.1.gamma_2; unexpected \(1\): blocks.2.gamma_1"
    ):
        load_vit_weights(_fresh(1, model_name="vit_small_patch16_dinov3_qkvb", **DINOV3), tmp_path / "odd.pth")
    # q/v biases the no-bias model would silently lose: refused, pointing to the variant that has them
    with pytest.raises(
        BackboneWeightsError, match=r"odd.pth: .*non-zero attention biases .*blocks.0.attn.qkv.bias.* `_qkvb`"
    ):
        load_vit_weights(_fresh(1, model_name="vit_small_patch16_dinov3", **DINOV3), tmp_path / "odd.pth")


def test_no_weights_file_is_refused_before_training():
    config = tiny_config(
        detector="vitad",
        patch={"backbone_name": "vit_tiny_patch16_224", "layers_to_extract_from": [0, 1], "neck_layers": [2]},
    )
    with pytest.raises(BackboneWeightsError, match="needs a local weights file.*allow_random_backbone"):
        get_detector("vitad").build_embedder(config.patch)


@pytest.mark.parametrize("tile, proposal", [(128, "126 or 140"), (512, "504 or 518")])
def test_tile_size_must_be_whole_patches(tile, proposal):
    with pytest.raises(
        ConfigError, match=f"patch_size: tile side {tile} px is not a multiple of .* 14: use {proposal}"
    ):
        tiny_config(
            detector="dinomaly",
            image_size=1024,
            patch_size=tile,
            patch={"backbone_name": "vit_small_patch14_reg4_dinov2"},
        )


@pytest.mark.parametrize("backbone, patch", [("vit_small_patch14_reg4_dinov2", 14), ("vit_small_patch16_dinov3", 16)])
def test_checkpointed_embedder_keeps_its_tile_grid(backbone, patch):
    """Positions (embedding resampled, or DINOv3's RoPE table) follow the tiles' grid; a reload (random init)
    takes that grid back."""
    config = get_detector("dinomaly").Config(
        backbone_name=backbone,
        layers_to_extract_from=[0, 1],
        fuse_layer_encoder=[[0], [1]],
        fuse_layer_decoder=[[0], [1]],
        allow_random_backbone=True,
    )
    embedder = get_detector("dinomaly").build_embedder(config)
    _perturbed(embedder.vit)
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 5 * patch, 3 * patch, 3), dtype=np.uint8))
    expected = embedder(tiles)
    assert expected[0].shape == (1, 384, 5, 3)
    reloaded = get_detector("dinomaly").build_embedder(config, pretrained=False)
    reloaded.load_state_dict(embedder.state_dict())
    for ours, theirs in zip(reloaded(tiles), expected):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


RECONSTRUCTION = {
    "layers_to_extract_from": [0, 1],
    "fuse_layer_encoder": [[0], [1]],
    "decoder_depth": 2,
    "fuse_layer_decoder": [[0], [1]],
}


@pytest.mark.parametrize(
    "name, backbone, patch",
    [
        ("vitad", "vit_tiny_patch16_224", {"layers_to_extract_from": [0, 1], "neck_layers": [2]}),
        ("dinomaly", "vit_tiny_patch16_224", RECONSTRUCTION),
        ("inpformer", "vit_tiny_patch16_224", RECONSTRUCTION),
        ("dinomaly", "vit_small_patch16_dinov3", RECONSTRUCTION),  # RoPE: its table is a constant of the tile grid
    ],
)
def test_graphs_hold_only_tensorrt_ops(name, backbone, patch, tmp_path):
    cls = get_detector(name)
    config = cls.Config(backbone_name=backbone, allow_random_backbone=True, **patch)
    embedder = cls.build_embedder(config)
    spec = export_embedder(embedder, (64, 64), tmp_path / "embedder.onnx")
    export_head(cls(config).head(), [tuple(o.shape[1:]) for o in spec.outputs], tmp_path / "head.onnx")
    assert rejected_ops(tmp_path / "embedder.onnx") == set()
    assert rejected_ops(tmp_path / "head.onnx") == set()


def test_dinov3_embedder_onnx_matches_pytorch_off_its_224_grid(tmp_path):
    """At 160 px tiles (10x10 patches, not timm's 14x14) the exported DINOv3 embedder gives PyTorch's maps."""
    config = get_detector("dinomaly").Config(
        backbone_name="vit_small_patch16_dinov3", allow_random_backbone=True, **RECONSTRUCTION
    )
    embedder = get_detector("dinomaly").build_embedder(config)
    _perturbed(embedder.vit)
    export_embedder(embedder, (160, 160), tmp_path / "embedder.onnx")
    assert not {"Sin", "Cos", "Range"} & op_types(
        tmp_path / "embedder.onnx"
    )  # RoPE table fixed at export, not computed
    tiles = _tiles(160, batch=2)
    with torch.no_grad():
        expected = [t.numpy() for t in embedder(tiles)]
    got = ort.InferenceSession(str(tmp_path / "embedder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": tiles.numpy()}
    )
    assert [g.shape for g in got] == [(2, 384, 10, 10)] * 2
    for ours, theirs in zip(got, expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
