import importlib
from pathlib import Path

import pytest
import timm
import torch

from hiad_train.backbones import PACKAGED_WEIGHTS, BackboneWeightsError, create_backbone, pretrained_state_dict

LITES = [f"tf_efficientnet_lite{i}" for i in (0, 1, 2)]


def _classify(model, image):
    import cv2

    x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return int(model(x).argmax())


def _packaged_file(name):
    package, cls = PACKAGED_WEIGHTS[name]
    path = Path(getattr(importlib.import_module(package), cls).get_model_file_path())
    return torch.load(str(path), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", LITES)
def test_efficientnet_lite_packaged_weights_classify_real_photos(name):
    import skimage.data

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(pretrained_state_dict(name))
    model.eval()
    assert _classify(model, skimage.data.chelsea()) in range(281, 286)  # a domestic cat
    assert _classify(model, skimage.data.coffee()) in (967, 968)  # espresso / cup


# stages [2, 3] (HiAD's layers) of each packaged backbone: timm modules, channels (README.md, "Data and weights")
@pytest.mark.parametrize(
    "name, modules, channels",
    [
        ("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], [40, 112]),
        ("tf_efficientnet_lite1", ["blocks.2", "blocks.4"], [40, 112]),
        ("tf_efficientnet_lite2", ["blocks.2", "blocks.4"], [48, 120]),
    ],
)
def test_features_only_backbone_is_frozen_and_uses_the_packaged_weights(name, modules, channels):
    bb = create_backbone(name, [2, 3])
    assert bb.feature_info.module_name() == modules
    assert bb.feature_info.channels() == channels and bb.feature_info.reduction() == [8, 16]
    assert not any(p.requires_grad for p in bb.parameters())
    file = _packaged_file(name)  # the wheel's own key names (`_conv_stem`, `_blocks.N`)
    torch.testing.assert_close(bb.state_dict()["conv_stem.weight"], file["_conv_stem.weight"], rtol=0, atol=0)
    last_conv = [k for k in bb.state_dict() if k.endswith("conv_pwl.weight")][-1]  # the deepest stage kept
    assert any(torch.equal(bb.state_dict()[last_conv], v) for v in file.values())


def test_local_weights_file_with_foreign_key_names(tmp_path):
    source = timm.create_model("resnet18", pretrained=False).state_dict()
    renamed = {f"module.w{i}": v * 0 + i for i, v in enumerate(source.values())}  # other names, same order
    path = tmp_path / "r18.pth"
    torch.save(renamed, path)
    bb = create_backbone("resnet18", ["layer2", "layer3"], weights=path)
    assert bb.feature_info.reduction() == [8, 16]
    index = list(source).index("layer2.0.conv1.weight")
    assert float(bb.state_dict()["layer2.0.conv1.weight"].flatten()[0]) == index


def test_offline_without_weights_says_how_to_provide_them():
    with pytest.raises(BackboneWeightsError, match="backbone_weights"):
        create_backbone("resnet18", ["layer2", "layer3"])
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        create_backbone("resnet18", ["layer2"], weights="/nonexistent/weights.pth")
