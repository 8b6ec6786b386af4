import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiad_runtime.geometry import Tiling, split
from hiad_runtime.plan import InferencePlan
from hiad_runtime.postprocess import PostprocessSpec

# HiAD's advanced tutorial: image 2048, patch 512, ds_factors [0, 1].
TUTORIAL_CONTEXT = [(0, 0), (0, 0), (1024, 0), (1024, 0)] * 2 + [(0, 1024), (0, 1024), (1024, 1024), (1024, 1024)] * 2


def test_tutorial_indexes_with_context_windows():
    tiling = Tiling.create(2048, 512, ds_factors=[0, 1])
    assert len(tiling.tiles) == 16
    for i, t in enumerate(tiling.tiles):
        d = t.to_dict()
        assert d["main_index"] == {"x": 512 * (i % 4), "y": 512 * (i // 4), "width": 512, "height": 512}
        cx, cy = TUTORIAL_CONTEXT[i]
        assert d["low_resolution_indexes"] == [{"x": cx, "y": cy, "width": 1024, "height": 1024}]
    assert len(tiling.context_windows(1)) == 4


def test_last_tile_shifted_back_and_non_square():
    tiling = Tiling.create((1000, 600), (400, 256))
    xs = sorted({t.main.x for t in tiling.tiles})
    ys = sorted({t.main.y for t in tiling.tiles})
    assert xs == [0, 400, 600] and ys == [0, 256, 344]
    assert (tiling.rows, tiling.cols) == (3, 3)


def test_json_roundtrip_and_tamper_detection():
    tiling = Tiling.create((1024, 512), 256, stride=128, ds_factors=[0, 1])
    d = json.loads(json.dumps(tiling.to_dict()))
    assert Tiling.from_dict(d) == tiling
    d["tiles"][3]["main_index"]["x"] += 1
    with pytest.raises(ValueError, match="disagree"):
        Tiling.from_dict(d)


@pytest.mark.parametrize("bad", [dict(patch_size=600), dict(stride=300), dict(ds_factors=[1])])
def test_invalid_geometry_is_rejected(bad):
    args = dict(image_size=512, patch_size=256) | bad
    with pytest.raises(ValueError):
        Tiling.create(**args)


sizes = st.integers(min_value=8, max_value=96)


@settings(max_examples=60, deadline=None)
@given(w=sizes, h=sizes, data=st.data())
def test_tiles_cover_every_pixel_and_merge_inverts_split(w, h, data):
    pw = data.draw(st.integers(4, w))
    ph = data.draw(st.integers(4, h))
    sw = data.draw(st.integers(1, pw))
    sh = data.draw(st.integers(1, ph))
    tiling = Tiling.create((w, h), (pw, ph), (sw, sh), ds_factors=[0, 1])
    count = np.zeros((h, w), int)
    for t in tiling.tiles:
        count[t.main.slices()] += 1
        for c in t.context:  # every context window contains its tile and lies inside the image
            assert c.x <= t.main.x and c.y <= t.main.y
            assert t.main.x + pw <= c.x + c.width <= w and t.main.y + ph <= c.y + c.height <= h
    assert count.min() >= 1
    image = np.random.default_rng(0).random((h, w)).astype(np.float32)
    patches = split(image, tiling.tiles)
    assert patches.shape == (len(tiling.tiles), ph, pw)
    plan = InferencePlan(tiling, (), (0.5, 0.5), PostprocessSpec())
    assert (plan.overlap_counts == count).all()
    # float32 sums of up to count.max() overlapping tiles: a relative error of at most that many roundings
    np.testing.assert_allclose(plan.merge(list(patches)), image, rtol=count.max() * np.finfo(np.float32).eps)


@pytest.fixture()
def tiles_made(monkeypatch):
    """Every Tile constructed from here on; more than 1000 fails at once (an edited size made millions)."""
    import hiad_runtime.geometry as geometry

    made = []

    class Counted(geometry.Tile):
        def __init__(self, *args, **kwargs):
            made.append(1)
            assert len(made) <= 1000, "tiles computed before the geometry was refused"
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(geometry, "Tile", Counted)
    return made


def test_an_edited_image_size_is_refused_before_any_tile_is_made(bundle_dir, tmp_path, tiles_made):
    """Issue #18: tiling.image_size edited to 10^6 in a manifest made the loader compute tiles for 56 s and
    4.7 GB before refusing (the same through the service's /v1/reload)."""
    import shutil

    from hiad_runtime.bundle import Bundle, BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tiling"]["image_size"] = [10**6, 10**6]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"tiling: 4 stored tiles, but image_size/patch_size/stride make 61042969"):
        Bundle.load(bundle)
    with pytest.raises(ValueError, match=r"makes 3818116 tiles, more than the limit of 65536"):
        Tiling.create(10**6, 512)
    assert tiles_made == []
    assert len(Tiling.create(2048, 512).tiles) == len(tiles_made) == 16  # the count sees every tile made
