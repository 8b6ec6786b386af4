"""The grouped IVF scan (hiad_runtime/ivf.py) against faiss's own IVF search and exact search, on the
tiny model's real features and its exported IVF-Flat indexes."""

import faiss
import numpy as np
import pytest

from hiad_export.writer import ExportOptions, write_bundle
from hiad_runtime.heads import FaissKnnHead, exact_knn_distance
from hiad_runtime.inspector import Inspector

NLIST = 8


@pytest.fixture(scope="module")
def ivf_bundle(trained, parity_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "ivf"
    write_bundle(trained, out, parity_images, ExportOptions({"index": f"IVF{NLIST},Flat", "search_params": "nprobe=2"}))
    return out


@pytest.fixture(scope="module")
def inspector(ivf_bundle):
    return Inspector.load(ivf_bundle, head_path="native")


@pytest.fixture(scope="module")
def queries(inspector, test_samples):
    """Every tile's feature vectors of the 4 test modules: (M, D) float32, real queries for every head."""
    size = inspector.tiling.image_size
    (f,) = np.concatenate([inspector.engine.tile_features(s.image(size), {}).numpy() for s in test_samples], 1)
    return np.ascontiguousarray(f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1]))


def heads(inspector, bundle):
    """(loaded native head, its faiss index read from the bundle) per task."""
    for task in inspector.manifest.tasks:
        head = inspector.engine.heads[task.name]
        assert isinstance(head, FaissKnnHead) and head.lists is not None  # the grouped scan is the path taken
        yield head, faiss.read_index(str(bundle / task.head.files["index"]))


def nearest_distances(queries, bank, idx):
    """Exact L2 distances of each query to its neighbours `idx`, sorted (ties in order do not matter)."""
    return np.sort(np.linalg.norm(queries[:, None, :] - bank[idx], axis=2), axis=1)


def test_lists_hold_the_bank(inspector, ivf_bundle):
    for head, index in heads(inspector, ivf_bundle):
        lists = head.lists
        assert lists.nlist == NLIST and lists.nprobe == 2 and len(lists.ids) == index.ntotal
        assert sorted(lists.ids) == list(range(index.ntotal))
        np.testing.assert_array_equal(lists.vectors, head.bank[lists.ids])


@pytest.mark.parametrize("k", [1, 3])
def test_grouped_scan_finds_faiss_neighbours(inspector, ivf_bundle, queries, k):
    for head, index in heads(inspector, ivf_bundle):
        for nprobe in range(1, NLIST + 1):
            index.nprobe = nprobe
            expected = index.search(queries, k)[1]
            found = head.lists.search(queries, k, nprobe)
            assert (found == expected).all(1).mean() > 0.99, nprobe  # the same ids, ties (if any) aside
            np.testing.assert_allclose(
                nearest_distances(queries, head.bank, found), nearest_distances(queries, head.bank, expected), rtol=1e-5
            )


def test_all_lists_probed_is_exact_search(inspector, ivf_bundle, queries):
    for head, _ in heads(inspector, ivf_bundle):
        exact = faiss.IndexFlatL2(head.bank.shape[1])
        exact.add(head.bank)
        found = head.lists.search(queries, 3, NLIST)
        np.testing.assert_allclose(
            nearest_distances(queries, head.bank, found),
            nearest_distances(queries, head.bank, exact.search(queries, 3)[1]),
            rtol=1e-5,
        )


def test_head_scores_equal_faiss_ivf_scores(inspector, ivf_bundle, queries):
    """The native head (grouped scan + exact re-ranking) scores as re-ranking faiss's own IVF neighbours does."""
    side = int(np.sqrt(len(queries) // 4))
    grid = queries[: 4 * side * side].reshape(4, side, side, -1).transpose(0, 3, 1, 2)
    for head, index in heads(inspector, ivf_bundle):
        index.nprobe = head.lists.nprobe
        q = np.ascontiguousarray(grid.transpose(0, 2, 3, 1).reshape(-1, grid.shape[1]))
        expected = exact_knn_distance(q, head.bank, index.search(q, head.k)[1]).reshape(4, side, side)
        np.testing.assert_allclose(head([grid]), expected, rtol=1e-6, atol=1e-7)


def test_overlapping_searches_restore_the_blas_threads(inspector, queries):
    """Searches on several threads (a service's workers): BLAS runs on one thread while any runs, and
    gets its own thread count back when the last one ends, whatever order they end in."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    before = blas_threads()
    head = inspector.engine.heads[inspector.manifest.tasks[0].name]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: head.lists.search(queries, 1, n % NLIST + 1), range(32)))
    assert blas_threads() == before
    for n, found in enumerate(results):
        np.testing.assert_array_equal(found, head.lists.search(queries, 1, n % NLIST + 1))


def test_position_rows_are_numpys_transpose():
    """The queries of a k-NN head: one row per position, as numpy's transpose gives (OpenCV's is faster)."""
    from hiad_runtime.heads import position_rows

    rng = np.random.default_rng(0)
    batch = rng.random((4, 128, 64, 64), dtype=np.float32)
    for features in (batch[:1], batch[1:3], batch[:, :40, :7, :9], rng.random((2, 5, 1, 1), dtype=np.float32)):
        expected = features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1])
        np.testing.assert_array_equal(position_rows(features), expected)


def test_probes_are_the_nearest_centroids_ties_included():
    """Each query probes its nprobe nearest lists, also where the nprobe-th distance is shared (two equal
    centroids): then nprobe lists are kept, never more, and the scan still finds faiss's neighbours."""
    from hiad_runtime.ivf import IvfLists

    rng = np.random.default_rng(1)
    d, nlist = 16, 12
    centroids = rng.normal(size=(nlist, d)).astype(np.float32)
    centroids[7] = centroids[3]  # a tie for every query that reaches one of them
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist)
    ivf.add(rng.normal(size=(600, d)).astype(np.float32))
    lists = IvfLists(ivf)
    queries = np.concatenate([rng.normal(size=(200, d)), centroids[[3, 3, 0]] + 0.01]).astype(np.float32)
    ones = np.concatenate([queries, np.ones((len(queries), 1), np.float32)], 1)
    distances = ((queries[:, None] - centroids[None]) ** 2).sum(-1)
    for nprobe in (1, 2, 3, 5):
        probes = lists.probes(ones, nprobe)
        assert probes.shape == (len(queries), nprobe)
        assert all(len(set(row)) == nprobe for row in probes.tolist())
        probed = np.take_along_axis(distances, probes, 1).max(1)
        kth = np.sort(distances, 1)[:, nprobe - 1]
        np.testing.assert_allclose(probed, kth, rtol=1e-5)  # no list farther than the nprobe-th nearest
        ivf.nprobe = nprobe
        found = lists.search(queries, 1, nprobe)
        expected = ivf.search(queries, 1)[1]
        same = found == expected
        # where the two equal lists compete, faiss may keep the other one of them: same distance either way
        tied = np.abs(np.sort(distances, 1)[:, nprobe - 1 : nprobe + 1] - distances[:, [3]]).min(1) < 1e-4
        assert same[~tied].all()
