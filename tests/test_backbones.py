import pytest
import timm
import torch

from hiad_train.backbones import BackboneWeightsError, create_backbone, pretrained_state_dict


def _classify(model, image):
    import cv2

    x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    x = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return int(model(x).argmax())


def test_efficientnet_lite0_packaged_weights_classify_real_photos():
    import skimage.data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(pretrained_state_dict("tf_efficientnet_lite0"))
    model.eval()
    assert _classify(model, skimage.data.chelsea()) in range(281, 286)  # a domestic cat
    assert _classify(model, skimage.data.coffee()) in (967, 968)  # espresso / cup


def test_features_only_backbone_is_frozen_and_uses_the_weights():
    bb = create_backbone("tf_efficientnet_lite0", [2, 3])
    assert bb.feature_info.channels() == [40, 112] and bb.feature_info.reduction() == [8, 16]
    assert not any(p.requires_grad for p in bb.parameters())
    full = pretrained_state_dict("tf_efficientnet_lite0")
    torch.testing.assert_close(bb.state_dict()["conv_stem.weight"], full["conv_stem.weight"])


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
