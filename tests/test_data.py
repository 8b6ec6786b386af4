import numpy as np

from hiad_runtime.image import load_image
from hiad_train.data import read_jsonl, read_mvtec
from hiad_train.data.elpv import build_elpv_demo, elpv_cells
from hiad_train.data.textures import build_synthetic


def test_elpv_demo_layout_labels_and_masks(elpv_root):
    train, test = read_mvtec(elpv_root, "train"), read_mvtec(elpv_root, "test")
    assert len(train) == 4 and all(s.label == 0 for s in train)
    assert [s.label for s in test] == [1, 1, 0, 0]
    img = load_image(test[0].image_path)
    assert img.shape == (256, 256, 3)  # stored as 8-bit gray, read as RGB
    mask = test[0].mask((256, 256))
    cells = mask.reshape(2, 128, 2, 128).any(axis=(1, 3))
    assert 1 <= cells.sum() <= 3  # 1-3 defective cells, each a whole cell
    assert (mask.reshape(2, 128, 2, 128).all(axis=(1, 3)) == cells).all()
    # the jsonl meta files describe the same samples
    from_meta = read_jsonl(elpv_root / "test.jsonl", elpv_root.parent)
    assert sorted((s.image_path, s.label, s.mask_path) for s in from_meta) == sorted(
        (s.image_path, s.label, s.mask_path) for s in test
    )


def test_elpv_demo_is_deterministic_and_real(tmp_path):
    a = build_elpv_demo(tmp_path / "a", rows=1, cols=2, cell_size=64, n_train=2, n_test=2, seed=3)
    b = build_elpv_demo(tmp_path / "b", rows=1, cols=2, cell_size=64, n_train=2, n_test=2, seed=3)
    for sa, sb in zip(read_mvtec(a, "test"), read_mvtec(b, "test")):
        np.testing.assert_array_equal(load_image(sa.image_path), load_image(sb.image_path))
    cells = elpv_cells()
    assert len(cells) == 2624 and {c.module_type for c in cells} == {"mono", "poly"}
    assert sorted({round(c.probability, 2) for c in cells}) == [0.0, 0.33, 0.67, 1.0]


def test_synthetic_defects_have_exact_masks(tmp_path):
    root = build_synthetic(tmp_path, size=(128, 128), n_train=2, n_test=4)
    defect = [s for s in read_mvtec(root, "test") if s.label == 1]
    assert defect
    for s in defect:
        img, mask = load_image(s.image_path), s.mask((128, 128))
        assert mask.any()
        painted = img[mask]
        assert (painted == painted[0]).all() and painted[0, 0] in (0, 255)  # one flat colour inside the mask
