import torch

from hiad_train.backbones import create_backbone
from hiad_train.components.patch_embedding import PatchEmbedder, reference_embedding
from hiad_train.embedders import BackboneFeatures


def test_folded_embedding_equals_patchcore_chain():
    bb = create_backbone("tf_efficientnet_lite0", [2, 3])
    emb = PatchEmbedder(
        BackboneFeatures(bb), merge_size=3, pretrain_embed_dimension=1024, target_embed_dimension=96
    ).eval()
    x = torch.randint(0, 256, (2, 96, 128, 3), dtype=torch.uint8)
    mean, std = (
        torch.tensor(bb.pretrained_cfg["mean"]).view(1, 3, 1, 1),
        torch.tensor(bb.pretrained_cfg["std"]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        (folded,) = emb(x)
        features = bb((x.permute(0, 3, 1, 2).float() / 255 - mean) / std)
        literal = reference_embedding(features, 3, 1024, 96)
    assert folded.shape == (2, 96, 12, 16)
    torch.testing.assert_close(folded, literal, atol=2e-5, rtol=1e-4)
