import numpy as np
import torch

from hiad_train.components.coreset import greedy_coreset
from hiad_train.components.knn import KnnHead


def test_coreset_size_and_coverage():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=gen) * 20
    points = torch.cat([c + torch.randn(500, 32, generator=gen) for c in centres])
    picked = greedy_coreset(points, 0.01, projection_dim=16)
    assert len(picked) == 40 and len(set(picked.tolist())) == 40
    clusters = set((picked // 500).tolist())
    assert clusters == set(range(8))  # farthest-point sampling reaches every cluster


def test_knn_head_matches_brute_force_in_chunks():
    gen = torch.Generator().manual_seed(1)
    bank = torch.randn(1000, 24, generator=gen)
    emb = torch.randn(2, 24, 5, 7, generator=gen)
    for k in (1, 3):
        head = KnnHead(bank, k, chunk=128)  # 8 chunks: exercises the running top-k merge
        out = head(emb)
        q = emb.permute(0, 2, 3, 1).reshape(-1, 24)
        d = torch.cdist(q.double(), bank.double())
        expected = d.topk(k, largest=False).values.mean(1).reshape(2, 5, 7)
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
