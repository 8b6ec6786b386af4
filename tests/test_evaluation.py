import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from hiad_train.evaluation import aupro, default_evaluators, evaluate, image_auroc, pixel_metrics


def _case(seed=0):
    rng = np.random.default_rng(seed)
    masks = [np.zeros((32, 32), bool) for _ in range(4)]
    masks[1][4:10, 4:12] = True
    masks[3][20:30, 2:6] = True
    masks[3][1:3, 25:31] = True
    maps = [rng.random((32, 32)) + 0.8 * m for m in masks]
    labels = np.array([0, 1, 0, 1])
    scores = np.array([m.max() for m in maps])
    return scores, labels, maps, masks


def test_against_sklearn():
    scores, labels, maps, masks = _case()
    px = pixel_metrics(scores, labels, maps, masks)
    flat_m, flat_g = np.concatenate([m.ravel() for m in maps]), np.concatenate([g.ravel() for g in masks])
    assert abs(px["pixel_auroc"] - roc_auc_score(flat_g, flat_m)) < 1e-12
    assert abs(px["pixel_ap"] - average_precision_score(flat_g, flat_m)) < 1e-12
    assert image_auroc(scores, labels)["image_auroc"] == roc_auc_score(labels, scores)


def test_perfect_prediction_scores_one():
    _, labels, _, masks = _case()
    maps = [m.astype(float) for m in masks]
    scores = np.array([m.max() for m in maps])
    result = evaluate(scores, labels, maps, masks, default_evaluators(resize=None))
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"):
        assert abs(result[key] - 1.0) < 1e-9, key


def test_aupro_of_a_known_curve():
    # one region of 4 pixels among 100; the region's pixels rank 1st, 2nd and after 10 and 30 normals
    mask = np.zeros((10, 10), bool)
    mask[0, :4] = True
    amap = np.zeros((10, 10))
    normals = [i for i in range(100) if i not in (0, 1, 2, 3)]
    ranking = [0, 1] + normals[:10] + [2] + normals[10:30] + [3] + normals[30:]
    for rank, pixel in enumerate(ranking):
        amap.flat[pixel] = 1 - rank / 100
    # PRO: 0.5 up to FPR 10/96, 0.75 up to 30/96, then 1.0 (beyond the 0.3 limit)
    expected = (0.5 * 10 / 96 + 0.75 * (0.3 - 10 / 96)) / 0.3
    got = aupro([1.0], [1], [amap], [mask])["aupro"]
    assert abs(got - expected) < 1e-9
