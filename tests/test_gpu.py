"""The runtime on CUDA (#21): what a CPU proves (the choice 'auto' makes on a CUDA build, the I/O-bound feature
path equal to plain runs, one session call per image for the whole-image graph), and what only a GPU can
(a real CUDA run, its parity with the CPU); those skip, saying why, where ONNX Runtime offers no CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest

from hiad_runtime.backends import Backend, SessionFactory
from hiad_runtime.features import Features
from hiad_runtime.heads import HeadPath, OnnxHead
from hiad_runtime.inspector import Inspector
from hiad_runtime.options import RuntimeOptions

TOLERANCE = 1e-4  # of the reference map's range
CUDA = "CUDAExecutionProvider"
CPU_ONLY = {"providers": ("CPUExecutionProvider",), "backend": "onnxruntime"}
needs_cuda = pytest.mark.skipif(
    CUDA not in ort.get_available_providers(),
    reason="this onnxruntime build offers no CUDAExecutionProvider (pip install '.[gpu]' "
    "on a CUDA 13 machine; benchmarks/gpu_check.sh)",
)


@pytest.fixture
def cuda_offered(monkeypatch):
    """This onnxruntime build made to say it offers CUDA (sessions asked for it still fall back to the CPU)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])


def test_auto_takes_cuda_and_the_heads_graphs_where_onnxruntime_offers_cuda(cuda_offered, bundle_dir):
    sessions = SessionFactory()
    assert (sessions.backend, sessions.maker.providers, sessions.on_gpu) == (
        Backend.onnxruntime,
        [CUDA, "CPUExecutionProvider"],
        True,
    )
    options = RuntimeOptions(stream_tiles=8).resolved(sessions.backend, sessions.on_gpu)
    assert (options.backend, options.head_path, options.batch_size) == (Backend.onnxruntime, HeadPath.onnx, 8)
    inspector = Inspector.load(bundle_dir)  # the same choice made by the Inspector; here the sessions run on the CPU
    assert (inspector.options.head_path, inspector.options.batch_size) == (HeadPath.onnx, 16)
    assert all(isinstance(inspector.engine.heads[t.name], OnnxHead) for t in inspector.plan.tasks)


def test_named_choices_stand_and_a_cpu_keeps_native_heads(cuda_offered):
    cpu = SessionFactory(providers=["CPUExecutionProvider"])  # asked for the CPU on a CUDA build
    assert (cpu.backend, cpu.on_gpu) == (Backend.onnxruntime, False)
    assert RuntimeOptions().resolved(cpu.backend, cpu.on_gpu).head_path is HeadPath.native
    named = RuntimeOptions(head_path="native", batch_size=2).resolved(Backend.onnxruntime, on_gpu=True)
    assert (named.head_path, named.batch_size) == (HeadPath.native, 2)


def test_a_cpu_only_build_resolves_as_before(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    sessions = SessionFactory()
    expected = Backend.openvino if importlib.util.find_spec("openvino") else Backend.onnxruntime
    assert (sessions.backend, sessions.on_gpu) == (expected, False)
    options = RuntimeOptions().resolved(sessions.backend, sessions.on_gpu)
    assert (options.head_path, options.batch_size) == (HeadPath.native, 1)


class PlainSession:
    """An ONNX Runtime session seen as OpenVINO's are, through `run` and `run_into` (outputs written into
    the caller's host arrays): the engine cannot bind it."""

    def __init__(self, session):
        self.session = session

    def run(self, output_names, feeds):
        return self.session.run(output_names, feeds)

    def run_into(self, feeds, outputs):
        for out, value in zip(outputs, self.session.run(None, feeds), strict=True):
            out[...] = value

    def get_providers(self):
        return self.session.get_providers()


def plain_inspector(monkeypatch, bundle, **options) -> Inspector:
    create = SessionFactory.create
    with monkeypatch.context() as m:
        m.setattr(SessionFactory, "create", lambda self, path, arena=False: PlainSession(create(self, path, arena)))
        return Inspector.load(bundle, **options)


@pytest.mark.parametrize("head_path", ["onnx", "native"])
@pytest.mark.parametrize("which", ["bundle_dir", "clustered_bundle"])
def test_io_bound_features_give_what_plain_runs_give_bit_for_bit(request, monkeypatch, test_samples, which, head_path):
    bundle = request.getfixturevalue(which)  # tiny O2O; fusion + thumbnail + clustering tasks
    options = dict(CPU_ONLY, head_path=head_path, batch_size=3, stream_tiles=3)  # batches and chunks cut unevenly
    bound, plain = Inspector.load(bundle, **options), plain_inspector(monkeypatch, bundle, **options)
    assert bound.engine.embedders["patch"].device == ("cpu", 0) and plain.engine.embedders["patch"].device is None
    for sample in test_samples:
        image = sample.image((256, 256))
        assert bound.engine.tile_features(image, {}).bound
        (tiles_b, thumb_b), (tiles_p, thumb_p) = bound.engine.raw_scores(image), plain.engine.raw_scores(image)
        assert [(t, i) for t, i, _ in tiles_b] == [(t, i) for t, i, _ in tiles_p]
        assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(tiles_b, tiles_p))
        assert (thumb_b is None) == (thumb_p is None) and (thumb_b is None or np.array_equal(thumb_b, thumb_p))
        rb, rp = bound.predict(image), plain.predict(image)
        assert np.array_equal(rb.anomaly_map, rp.anomaly_map) and rb.score == rp.score


def test_a_head_reads_contiguous_rows_by_address_and_others_gathered(bundle_dir, test_samples):
    inspector = Inspector.load(bundle_dir, **CPU_ONLY, head_path="onnx")
    image = test_samples[2].image((256, 256))
    features = inspector.engine.tile_features(image, {})
    host = [f.copy() for f in features.numpy()]
    head = inspector.engine.heads[inspector.plan.tasks[0].name]
    for positions in ([0, 1, 2, 3], [1, 2], [3], [0, 2], [3, 1]):
        assert np.array_equal(head.bound(features, positions), head([f[positions] for f in host])), positions
    assert all(np.array_equal(a, b) for a, b in zip(features.numpy(), host))  # nothing written into the features
    shape, address = features.block(0, 2, 2)
    assert shape == [2, *host[0].shape[1:]] and address == features.numpy()[0][2:].ctypes.data


def test_host_features_from_sessions_that_do_not_bind():
    arrays = [np.arange(24, dtype=np.float32).reshape(3, 2, 2, 2)]
    features = Features.host(arrays)
    assert not features.bound and np.array_equal(features.rows([2, 0])[0], arrays[0][[2, 0]])


def test_whole_image_graph_is_one_session_call_per_image(bundle_dir, test_samples):
    inspector = Inspector.load(bundle_dir, **CPU_ONLY, engine="pipeline")
    calls = []
    run = inspector.engine.session.run
    inspector.engine.session = type("Counted", (), {"run": lambda self, *a: calls.append(1) or run(*a)})()
    for sample in test_samples[:3]:
        inspector.predict(sample.image((256, 256)))
    assert len(calls) == 3


# -- on a GPU only --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("engine", ["tiles", "pipeline"])
def test_cuda_run_matches_the_cpu_and_pytorch(bundle_dir, trained, test_samples, engine):
    cuda = Inspector.load(bundle_dir, engine=engine)  # auto: CUDA, the heads' graphs, a chunk per embedder call
    assert CUDA in cuda.providers_in_use and cuda.sessions.on_gpu
    if engine == "tiles":
        assert cuda.options.head_path is HeadPath.onnx and cuda.engine.embedders["patch"].device[0] == "cuda"
    cpu = Inspector.load(bundle_dir, **CPU_ONLY, engine=engine, head_path="onnx")
    for sample in test_samples:
        image = sample.image((256, 256))
        on_gpu, on_cpu = cuda.predict(image), cpu.predict(image)
        ref_map, ref_score = trained.predict(image)
        for other_map, other_score in ((on_cpu.anomaly_map, on_cpu.score), (ref_map, ref_score)):
            span = other_map.max() - other_map.min()
            assert np.abs(on_gpu.anomaly_map - other_map).max() <= TOLERANCE * span
            assert abs(on_gpu.score - other_score) <= TOLERANCE * span


@needs_cuda
def test_cuda_features_stay_on_the_device(bundle_dir, test_samples):
    inspector = Inspector.load(bundle_dir)
    features = inspector.engine.tile_features(test_samples[0].image((256, 256)), {})
    assert features.bound and features.device[0] == "cuda" and features.arrays is None  # no host copy was made
    assert all(v.device_name().lower() == "cuda" for v in features.values)
