"""Work shared out over the cores (hiad_runtime/cores.py): results in order, each worker's libraries on one
thread, and a chunk's scores the same whatever the number of cores."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from hiad_runtime import cores
from hiad_runtime.engines import tiles
from hiad_runtime.inspector import Inspector


def threads(api: str) -> list[int]:
    return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == api)


def test_results_come_in_order_with_one_library_thread_per_worker():
    import faiss  # noqa: F401  (its OpenMP loaded, as in the runtime)

    before = threads("blas")
    seen = cores.map_on_cores(lambda i: (i, threads("blas"), threads("openmp")), range(12))
    assert [i for i, *_ in seen] == list(range(12))
    assert all(set(blas) == {1} for _, blas, _ in seen)  # BLAS on one thread while the workers run
    assert all(set(omp) == {1} for *_, omp in seen)  # and each worker's OpenMP (faiss's libgomp)
    assert threads("blas") == before  # given back after
    assert cores.map_on_cores(lambda i: i * i, range(7), cores=3) == [i * i for i in range(7)]
    assert cores.map_on_cores(lambda i: threads("blas"), range(3), cores=1) == [before] * 3  # here, as it was


@pytest.mark.parametrize("cores_used", [1, 3])
def test_maps_do_not_depend_on_the_number_of_cores(bundle_dir, test_samples, cores_used):
    inspector = Inspector.load(bundle_dir)
    images = [s.image(inspector.tiling.image_size) for s in test_samples]
    expected = [inspector.predict(image) for image in images]  # the cores this machine has
    inspector.engine.cores = cores_used  # the chunk cut into that many shares, on that many workers at most
    for image, e in zip(images, expected):
        result = inspector.predict(image)
        np.testing.assert_array_equal(result.anomaly_map, e.anomaly_map)
        assert result.score == e.score


def test_shares_cut_one_task_or_many_into_runs_for_every_core():
    assert tiles.shares({"a": list(range(16))}, 2) == [("a", list(range(8))), ("a", list(range(8, 16)))]
    many = {f"t{i}": [i] for i in range(4)}
    assert tiles.shares(many, 2) == [(f"t{i}", [i]) for i in range(4)]
    assert tiles.shares({"a": [0, 1, 2], "b": [3]}, 2) == [("a", [0, 1]), ("a", [2]), ("b", [3])]
    assert tiles.shares({"a": [], "b": [5]}, 4) == [("b", [5])] and tiles.shares({"a": []}, 2) == []
