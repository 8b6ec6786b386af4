"""`hiad-runtime predict --ray`: Ray actors (a local cluster of 2 CPUs) write what the local command writes,
byte for byte but latency; `--resume` completes a killed run with every input recorded exactly once, locally
and on Ray; an actor killed mid-run loses no input and records none twice."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import pytest
from typer.testing import CliRunner

from hiad_runtime.batch import Input, OutputSettings, write_all
from hiad_runtime.cli import app
from hiad_runtime.options import RuntimeOptions
from hiad_runtime.results import ResultsFolder, find_inputs, output_keys

IMAGES = 24


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs; the tests that need it are skipped without the [ray] extra."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(test_samples, tmp_path_factory):
    """IMAGES real images (the test modules rolled and flipped: each scores differently) and one broken file."""
    folder = tmp_path_factory.mktemp("inputs")
    for i in range(IMAGES):
        image = cv2.imread(str(test_samples[i % len(test_samples)].image_path))
        image = cv2.flip(image, i % 3 - 1) if i % 4 else image
        cv2.imwrite(str(folder / f"img_{i:02d}.png"), image[:, (i * 7) % 256 :] if i % 5 else image)
    (folder / "img_99_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


@pytest.fixture(scope="module")
def reference(bundle_dir, inputs, tmp_path_factory):
    """The local command's run over every input: what every other run must write."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), str(inputs), "--out", str(out), "--overlays"])
    assert result.exit_code == 1, result.output  # 1: the broken input, recorded as an error
    return out


def records(out):
    """results.jsonl's records, latency left out."""
    lines = (out / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "latency_ms"} for line in lines]


def files(out):
    """Every map and overlay, byte for byte."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("results.jsonl", ".predict.lock")
    }


def assert_same_run(out, reference):
    assert records(out) == records(reference)  # each input once, in input order, same fields and values
    assert files(out) == files(reference)


def test_ray_with_two_actors_writes_what_the_local_command_writes(cluster, bundle_dir, inputs, reference, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["predict", str(bundle_dir), str(inputs), "--out", str(out), "--overlays", "--ray", "local", "--actors", "2"],
    )
    assert result.exit_code == 1, result.output
    assert "2 Ray actor(s) of 1 thread(s) each" in result.output
    assert records(out)[-1] == {"input": str(inputs / "img_99_broken.png"), "error": records(reference)[-1]["error"]}
    assert_same_run(out, reference)


def test_relative_inputs_a_glob_and_a_list_resolve_on_the_actors_and_an_actor_never_placed_holds_none(
    cluster, bundle_dir, inputs, monkeypatch, tmp_path
):
    monkeypatch.chdir(inputs.parent)
    (tmp_path / "list.txt").write_text(f"# two images\n{inputs.name}/img_01.png\n\n{inputs.name}/img_00.png\n")
    args = ["predict", str(bundle_dir), str(tmp_path / "list.txt"), f"{inputs.name}/img_0[2-3].png", "--out"]
    local = CliRunner().invoke(app, [*args, str(tmp_path / "local")])
    on_ray = CliRunner().invoke(app, [*args, str(tmp_path / "ray"), "--ray", "local", "--actors", "3"])
    assert local.exit_code == on_ray.exit_code == 0, on_ray.output
    assert "3 Ray actor(s) of 1 thread(s) each (the cluster holds 2 at once)" in on_ray.output  # one never starts
    expected = [f"{inputs.name}/img_{i:02d}.png" for i in (1, 0, 2, 3)]
    assert [r["input"] for r in records(tmp_path / "ray")] == expected
    assert records(tmp_path / "ray") == records(tmp_path / "local")


def killed_run(bundle_dir, inputs, out, after):
    """The local command as a process, killed (SIGKILL) once `after` records are written; then a record
    cut short, as a kill in the middle of writing one leaves it."""
    command = [
        sys.executable,
        "-m",
        "hiad_runtime.cli",
        "predict",
        str(bundle_dir),
        str(inputs),
        "--out",
        str(out),
        "--overlays",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    results = out / "results.jsonl"
    while process.poll() is None and not (results.is_file() and results.read_text().count("\n") >= after):
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = results.read_text().count("\n")
    assert after <= written < IMAGES, "the run ended before it could be killed mid-way"
    with open(results, "a") as f:
        f.write('{"input": "' + str(inputs / f"img_{written:02d}.png")[:20])
    return written


@pytest.mark.parametrize("where", ["local", "ray"])
def test_resume_completes_a_killed_run_with_every_input_exactly_once(
    request, bundle_dir, inputs, reference, tmp_path, where
):
    if where == "ray":
        request.getfixturevalue("cluster")
    out = tmp_path / "out"
    written = killed_run(bundle_dir, inputs, out, after=3)
    args = ["predict", str(bundle_dir), str(inputs), "--out", str(out), "--overlays"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--resume" in refused.output  # not empty: neither replaced nor mixed
    result = CliRunner().invoke(
        app, [*args, "--resume", *(["--ray", "local", "--actors", "2"] if where == "ray" else [])]
    )
    assert result.exit_code == 1, result.output
    assert f"resuming: {written} of {IMAGES + 1} input(s) already recorded" in result.output
    assert_same_run(out, reference)


@pytest.mark.parametrize("restart", [False, True], ids=["killed-for-good", "killed-and-restarted"])
def test_an_actor_killed_mid_run_loses_no_input_and_records_none_twice(
    cluster, bundle_dir, inputs, reference, tmp_path, restart
):
    from hiad_runtime.ray_scoring import RayScorers

    ray = cluster
    files_ = find_inputs([inputs])
    items = [Input(str(f), key) for f, key in zip(files_, output_keys(files_))]
    pool = RayScorers(bundle_dir, RuntimeOptions(threads=1), OutputSettings(overlays=True), actors=2)

    def killing_one_actor(scored):
        for n, s in enumerate(scored):
            if n == 2:  # both actors hold calls now: the killed one's go to the other (or to it, restarted)
                ray.kill(pool.actors[0], no_restart=not restart)
            yield s

    try:
        with ResultsFolder(tmp_path / "out") as folder:
            assert write_all(folder, killing_one_actor(pool.score(items)), len(items)) == 1  # the broken input
        if not restart:
            assert pool.resent >= 1
            with pytest.raises(ray.exceptions.ActorDiedError):
                ray.get(pool.actors[0].describe.remote())
    finally:
        pool.close()
    assert_same_run(tmp_path / "out", reference)


def test_a_bundle_the_actors_cannot_load_is_refused_by_name_before_any_output(cluster, bundle_dir, inputs, tmp_path):
    altered = tmp_path / "bundle"
    shutil.copytree(bundle_dir, altered)
    graph = next(altered.glob("*.onnx"))
    graph.write_bytes(graph.read_bytes() + b"\0")
    result = CliRunner().invoke(
        app, ["predict", str(altered), str(inputs), "--out", str(tmp_path / "out"), "--ray", "local"]
    )
    assert result.exit_code == 2
    assert f"error: the actors could not load the bundle: BundleError: {graph}: truncated or altered" in result.output
    assert not (tmp_path / "out").exists()


def test_a_pattern_matching_nothing_and_resume_with_overwrite_are_refused_by_name(bundle_dir, inputs, tmp_path):
    pattern = str(inputs / "*.jpeg")
    result = CliRunner().invoke(app, ["predict", str(bundle_dir), pattern, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and f"error: {pattern}: no file matches this pattern" in result.output
    result = CliRunner().invoke(
        app, ["predict", str(bundle_dir), str(inputs), "--out", str(tmp_path / "b"), "--resume", "--overwrite"]
    )
    assert result.exit_code == 2 and "--overwrite and --resume exclude each other" in result.output
