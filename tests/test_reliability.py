"""Issue #7: each class of failure (images, results on disk, bundles, export, configs and CLIs),
reproduced on real inputs, real bundles and real processes (kill -9 included)."""

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from hiad_runtime.bundle import Bundle, BundleError
from hiad_runtime.files import atomic_directory, versions
from hiad_runtime.image import ImageError, decode, load_image, resize_image
from hiad_runtime.inspector import Inspector

ROOT = Path(__file__).resolve().parents[1]


def _png_header(width: int, height: int, depth: int = 16, colour: int = 6) -> bytes:
    """A tiny PNG whose header declares width x height (16-bit RGBA by default) with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


def _run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inspector(bundle_dir):
    return Inspector.load(bundle_dir)


# -- images ---------------------------------------------------------------------------------------
def test_every_decoding_and_resizing_failure_is_an_image_error_naming_the_input(tmp_path, inspector):
    with pytest.raises(ImageError, match=r"upload\.png: empty \(0 bytes\)"):
        decode(b"", "upload.png")
    with pytest.raises(ImageError, match="bomb: cannot be decoded .*PIXELS"):  # OpenCV's own limit, no budget given
        decode(_png_header(40000, 40000), "bomb")
    with pytest.raises(
        ImageError, match="bomb: declares more pixels than the decoder allows"
    ):  # Pillow's, on the header
        decode(_png_header(40000, 40000), "bomb", max_pixels=2_000_000_000)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png"):
        load_image(empty)
    with pytest.raises(ImageError, match="empty"):
        inspector.predict(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ImageError, match="image bytes"):
        inspector.predict(b"")
    with pytest.raises(ImageError, match="cannot be resized"):
        resize_image(np.zeros((0, 5, 3), np.uint8), (4, 4))


def test_pixel_budget_is_checked_on_the_header_before_decoding(tmp_path, inspector, monkeypatch, test_samples):
    bomb = _png_header(8500, 8500)  # 16-bit RGBA: ~580 MB decoded from a few hundred bytes
    assert len(bomb) < 1000

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the header is over budget")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    with pytest.raises(ImageError, match=r"big.png: declares 8500x8500 = 72250000 pixels, above the limit of 1000000"):
        decode(bomb, "big.png", max_pixels=1_000_000)
    assert inspector.max_pixels == 4 * 256 * 256  # default: 4x the bundle's image area
    with pytest.raises(ImageError, match="above the limit of 262144"):
        inspector.predict(bomb)
    monkeypatch.undo()

    large = tmp_path / "large.png"  # a real image just over the default budget (513 x 512 > 4 x 256^2)
    cv2.imwrite(str(large), cv2.resize(cv2.imread(str(test_samples[0].image_path)), (1026, 1024)))
    with pytest.raises(ImageError, match="large.png: declares 1026x1024"):
        inspector.predict(large)
    assert Inspector(inspector.bundle, max_pixels=2_000_000).predict(large).anomaly_map.shape == (256, 256)


def test_predict_batch_goes_on_past_empty_bomb_and_oversized_inputs(bundle_dir, test_samples, tmp_path):
    from hiad_runtime.cli import app

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a_empty.png").write_bytes(b"")
    (inputs / "b_bomb.png").write_bytes(_png_header(40000, 40000))
    (inputs / "c_deep.png").write_bytes(_png_header(8500, 8500))
    shutil.copy(test_samples[0].image_path, inputs / "d_good.png")
    result = _run(app, "predict", bundle_dir, inputs, "--out", tmp_path / "out")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    records = _records(tmp_path / "out")
    assert [Path(r["input"]).name for r in records] == ["a_empty.png", "b_bomb.png", "c_deep.png", "d_good.png"]
    assert [("error" in r) for r in records] == [True, True, True, False]
    for r in records[:3]:
        assert Path(r["input"]).name in r["error"]
    assert "8500x8500" in records[2]["error"] and records[3]["warnings"] == []


def test_odd_sizes_are_scored_with_a_warning(inspector, bundle_dir, test_samples, tmp_path):
    from hiad_runtime.cli import app

    image = load_image(test_samples[0].image_path)
    assert inspector.predict(image).warnings == []
    tiny = inspector.predict(image[:1, :1])
    assert any("far smaller" in w for w in tiny.warnings)
    wide = inspector.predict(cv2.resize(image, (512, 256)))
    assert len(wide.warnings) == 1 and "aspect ratio 2.000" in wide.warnings[0]
    assert inspector.predict(cv2.resize(image, (260, 256))).warnings == []  # within a few percent
    cv2.imwrite(str(tmp_path / "wide.png"), cv2.resize(image, (512, 256)))
    assert _run(app, "predict", bundle_dir, tmp_path / "wide.png", "--out", tmp_path / "out").exit_code == 0
    assert "aspect ratio" in _records(tmp_path / "out")[0]["warnings"][0]


# -- results on disk ------------------------------------------------------------------------------
def test_records_are_on_disk_as_soon_as_each_image_is_done(bundle_dir, elpv_root, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from hiad_runtime.inspector import Inspector
        from hiad_runtime.cli import app
        done, original = [], Inspector.predict
        def predict(self, image):
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while the third image is scored
            done.append(1)
            return original(self, image)
        Inspector.predict = predict
        app(["predict", {str(bundle_dir)!r}, {str(elpv_root / "test")!r}, "--out", {str(out)!r}])
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr
    records = _records(out)
    assert len(records) == 2
    for r in records:
        assert np.load(out / r["map"]).shape == (256, 256)


def test_an_earlier_run_is_never_destroyed(bundle_dir, elpv_root, test_samples, tmp_path):
    from hiad_runtime.cli import app

    out = tmp_path / "out"
    assert _run(app, "predict", bundle_dir, elpv_root / "test", "--out", out).exit_code == 0
    before = (out / "results.jsonl").read_bytes()
    maps = sorted(p.relative_to(out) for p in out.rglob("*.npy"))
    rerun = _run(app, "predict", bundle_dir, test_samples[0].image_path, "--out", out)  # a mistyped rerun
    assert rerun.exit_code == 2 and "--overwrite" in rerun.output
    assert (out / "results.jsonl").read_bytes() == before and sorted(
        p.relative_to(out) for p in out.rglob("*.npy")
    ) == maps
    assert _run(app, "predict", bundle_dir, test_samples[0].image_path, "--out", out, "--overwrite").exit_code == 0
    assert len(_records(out)) == 1 and len(list(out.rglob("*.npy"))) == 1


def test_inputs_with_the_same_stem_get_their_own_maps(bundle_dir, inspector, test_samples, tmp_path):
    from hiad_runtime.cli import app

    images = [load_image(s.image_path) for s in test_samples[:3]]
    files = [tmp_path / "a" / "m.png", tmp_path / "b" / "m.png", tmp_path / "x.png", tmp_path / "x.jpg"]
    for f, image in zip(files, [images[0], images[1], images[2], images[0][::-1].copy()]):
        f.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(f), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert _run(app, "predict", bundle_dir, *files, "--out", out).exit_code == 0
    records = _records(out)
    assert len({r["map"] for r in records}) == 4
    assert [r["map"] for r in records] == ["maps/a/m.png.npy", "maps/b/m.png.npy", "maps/x.png.npy", "maps/x.jpg.npy"]
    for r in records:  # each record names the map of its own input
        np.testing.assert_allclose(
            np.load(out / r["map"]), inspector.predict(r["input"]).anomaly_map, rtol=1e-5, atol=1e-6
        )


def test_a_second_run_on_the_same_output_folder_is_refused(bundle_dir, test_samples, tmp_path):
    from hiad_runtime.cli import app

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".predict.lock", "a") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        result = _run(app, "predict", bundle_dir, test_samples[0].image_path, "--out", out)
        assert result.exit_code == 2 and "another run is writing here" in result.output
        assert not (out / "results.jsonl").exists()
    assert _run(app, "predict", bundle_dir, test_samples[0].image_path, "--out", out).exit_code == 0


# -- bundles --------------------------------------------------------------------------------------
def _bundle_copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _point_bank_at(bundle: Path, name: str, content: bytes, size: int | None = None) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["tasks"][0]["head"]["files"]["bank"] = name
    m["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content) if size is None else size}
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_manifest_paths_are_confined_to_the_bundle(bundle_dir, tmp_path):
    secret = tmp_path / "secret.npy"
    secret.write_bytes(b"outside the bundle")
    cases = {
        str(secret): "absolute or contains '..'",  # matching checksum: old runtimes loaded it
        "../secret.npy": "absolute or contains '..'",
        "tasks/../../secret.npy": "absolute or contains '..'",
    }
    for i, (name, message) in enumerate(cases.items()):
        b = _bundle_copy(bundle_dir, tmp_path / f"c{i}")
        (b.parent / "secret.npy").write_bytes(secret.read_bytes())
        _point_bank_at(b, name, secret.read_bytes(), size=1)  # a wrong size used to reveal the real one
        for verify in (True, False):
            with pytest.raises(BundleError, match=message) as e:
                Bundle.load(b, verify=verify)
            assert "18 bytes" not in str(e.value)
    b = _bundle_copy(bundle_dir, tmp_path / "link")
    (b / "tasks" / "escape.npy").symlink_to(secret)
    _point_bank_at(b, "tasks/escape.npy", secret.read_bytes())
    with pytest.raises(BundleError, match="leads outside the bundle"):
        Bundle.load(b)


def test_archive_extraction_is_capped_before_anything_is_written(tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    class Zeros:
        def __init__(self, n):
            self.left = n

        def read(self, size=-1):
            size = self.left if size is None or size < 0 else min(size, self.left)
            self.left -= size
            return bytes(size)

    bomb = tmp_path / "bundle.tar.gz"  # 64 MiB of zeros in ~64 kB
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("bundle/tasks/task_0_bank.npy")
        info.size = 64 << 20
        tar.addfile(info, Zeros(info.size))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="expands to more than"):  # stopped while listing the archive
        Bundle.load(bomb, max_extract_bytes=1 << 20)
    parts = tmp_path / "parts.tar"
    with tarfile.open(parts, "w") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"bundle/part_{i}.npy")
            info.size = 600_000
            tar.addfile(info, Zeros(info.size))
    with pytest.raises(
        BundleError, match="would extract 1200000 bytes, more than the limit of 1048576"
    ):  # the members' sum
        Bundle.load(parts, max_extract_bytes=1 << 20)
    assert list(temp.iterdir()) == []


def test_extraction_folders_of_dead_processes_are_removed(bundle_dir, tmp_path):
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(bundle_dir.resolve(), arcname="bundle")
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    load_and_die = (
        "import os, signal\nfrom hiad_runtime.bundle import Bundle\n"
        f"Bundle.load({str(archive)!r})\nos.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.Popen([sys.executable, "-c", load_and_die], env=env)
    assert killed.wait(timeout=120) == -9
    (left,) = list(temp.iterdir())  # a kill skips the exit-time cleanup
    assert left.name.startswith(f"hiad-bundle-{killed.pid}-")
    load_and_exit = f"from hiad_runtime.bundle import Bundle\nprint(Bundle.load({str(archive)!r}).root)"
    run = subprocess.run([sys.executable, "-c", load_and_exit], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not left.exists()  # removed on the next start: its owner is gone
    assert list(temp.iterdir()) == []  # and the new one at exit


# -- export ---------------------------------------------------------------------------------------
def _publish_and_die(target: Path, content: str, kill_at: int) -> subprocess.CompletedProcess:
    """Publish `content` into `target` in a child that kills itself (-9) at its `kill_at`-th rename."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from hiad_runtime.files import atomic_directory
        calls = []
        def dying(real):
            def rename(*args, **kwargs):
                calls.append(1)
                if len(calls) == {kill_at}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            return rename
        os.rename, os.replace = dying(os.rename), dying(os.replace)
        with atomic_directory({str(target)!r}) as tmp:
            (tmp / "manifest.json").write_text({content!r})
            (tmp / "weights.bin").write_bytes(os.urandom(1 << 16))
        """
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("first_time_real_directory", [False, True])
def test_a_kill_at_any_point_of_publishing_leaves_a_complete_bundle(tmp_path, first_time_real_directory):
    target = tmp_path / "bundle"
    if first_time_real_directory:  # written by an older export: migrated, never deleted first
        target.mkdir()
        (target / "manifest.json").write_text("v0")
    else:
        with atomic_directory(target) as tmp:
            (tmp / "manifest.json").write_text("v0")
    for kill_at in (1, 2, 3, 4):
        run = _publish_and_die(target, f"killed at {kill_at}", kill_at)
        assert run.returncode in (0, -9), run.stderr
        assert (target / "manifest.json").read_text() in ("v0", f"killed at {kill_at - 1}", f"killed at {kill_at}")
    assert target.is_symlink()
    with atomic_directory(target) as tmp:  # the next publish removes what the killed writers left
        (tmp / "manifest.json").write_text("last")
    assert (target / "manifest.json").read_text() == "last"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_readers_always_find_a_complete_bundle_and_old_versions_are_pruned_after_grace(tmp_path):
    target = tmp_path / "bundle"
    with atomic_directory(target) as tmp:
        (tmp / "manifest.json").write_text("0")
    stop = tmp_path / "stop"
    poll = f"""
import pathlib
target, stop, reads, misses = pathlib.Path({str(target)!r}), pathlib.Path({str(stop)!r}), 0, 0
while not stop.exists() or reads < 1000:
    reads += 1
    if reads == 1:
        (target.parent / "reading").touch()
    try:
        (target / "manifest.json").read_text()
    except FileNotFoundError:
        misses += 1
print(reads, misses)
"""
    reader = subprocess.Popen(
        [sys.executable, "-c", poll], stdout=subprocess.PIPE, text=True
    )  # a reader on another core
    while not (tmp_path / "reading").exists() and reader.poll() is None:
        time.sleep(0.01)
    for n in range(1, 60):
        with atomic_directory(target) as tmp:
            (tmp / "manifest.json").write_text(str(n))
    stop.touch()
    reads, misses = map(int, reader.communicate(timeout=60)[0].split())
    assert misses == 0 and reads >= 1000 and (target / "manifest.json").read_text() == "59"
    assert len(versions(target)) == 60  # all within the grace period: a reader may still be loading one
    with atomic_directory(target, grace_s=0) as tmp:
        (tmp / "manifest.json").write_text("60")
    assert versions(target) == [target.with_name("bundle.v61")] and target.resolve() == versions(target)[0]


def test_archive_is_named_after_the_full_bundle_name(bundle_dir, tmp_path):
    from hiad_export.writer import write_archive

    for name in ("bundle.v2", "bundle.v3"):
        shutil.copytree(bundle_dir, tmp_path / name)
        assert write_archive(tmp_path / name) == tmp_path / f"{name}.tar"
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["bundle.v2.tar", "bundle.v3.tar"]
    assert Bundle.load(tmp_path / "bundle.v3.tar").manifest.files == Bundle.load(bundle_dir).manifest.files


# -- configs and CLIs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"thumbnail": {"thumbnail_size": -64}}, r"thumbnail\.thumbnail_size: must be positive, got -64"),
        ({"image_size": 0}, r"image_size: must be positive"),
        ({"stride": 0}, r"stride: must be positive"),
        ({"patch_size": [128, -1]}, r"patch_size: must be positive"),
        ({"image_size": 100000}, r"image_size/patch_size/stride: one 100000x100000 image .* needs [\d,]+ bytes"),
        ({"image_size": 2048, "stride": 1}, r"cut into 3690241 tiles of 128x128 needs [\d,]+ bytes"),
        ({"patch_size": 512}, r"patch size 512 is larger than the image \(256\)"),
        ({"evaluation": {"resize": 0}}, r"evaluation\.resize: Input should be greater than or equal to 1"),
    ],
)
def test_config_sizes_and_ranges_are_refused_on_load(overrides, message):
    from hiad_train.config import ConfigError, parse_config

    base = {"image_size": 256, "patch_size": 128}
    with pytest.raises(ConfigError, match=message):
        parse_config({**base, **overrides})


def test_large_but_reasonable_geometry_is_accepted():
    from hiad_train.config import parse_config

    assert parse_config({"image_size": 256, "patch_size": 128, "stride": 1}).stride == 1  # 16641 tiles, ~0.8 GB
    assert parse_config({"image_size": [8192, 6144], "patch_size": 512}).image_size == (8192, 6144)


def test_duplicate_yaml_keys_are_refused_by_path(tmp_path):
    from hiad_train.config import ConfigError, load_config

    config = tmp_path / "c.yaml"
    config.write_text("image_size: 256\npatch_size: 128\npatch:\n  percentage: 0.1\n  percentage: 0.5\n")
    with pytest.raises(ConfigError, match=r"patch\.percentage: duplicate key \(lines 4 and 5\)"):
        load_config(config)
    config.write_text((ROOT / "configs" / "demo.yaml").read_text() + "\nseed: 3\nseed: 4\n")
    with pytest.raises(ConfigError, match=r"seed: duplicate key"):
        load_config(config)


def test_cli_options_are_validated(bundle_dir, test_samples, tmp_path):
    from hiad_export.cli import app as export_app
    from hiad_runtime.cli import app as runtime_app
    from hiad_train.cli import app as train_app

    image = test_samples[0].image_path
    for args, option in [
        (("predict", bundle_dir, image, "--out", tmp_path / "o", "--batch", "0"), "--batch"),
        (("predict", bundle_dir, image, "--out", tmp_path / "o", "--head-path", "bogus"), "--head-path"),
        (("predict", bundle_dir, image, "--out", tmp_path / "o", "--max-pixels", "0"), "--max-pixels"),
        (("bench", bundle_dir, "--repeat", "0"), "--repeat"),
    ]:
        result = _run(runtime_app, *args)
        assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "o").exists()
    result = _run(train_app, "demo-data", tmp_path / "d", "--rows", "0")
    assert result.exit_code == 2 and "--rows" in result.output
    result = _run(export_app, tmp_path / "missing", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "Invalid value for 'checkpoint'" in result.output


def test_verify_command_reports_a_usable_bundle_and_refuses_a_bad_one(bundle_dir, tmp_path):
    from hiad_runtime.cli import app

    result = _run(app, "verify", bundle_dir)
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256((bundle_dir / "manifest.json").read_bytes()).hexdigest()
    assert "OK" in result.output and digest in result.output and "parity [onnx]: passed" in result.output
    b = _bundle_copy(bundle_dir, tmp_path)
    (b / "tasks" / "task_1.faiss").write_bytes(b"altered")
    result = _run(app, "verify", b)
    assert result.exit_code == 2 and "task_1.faiss" in result.output and "NOT usable" in result.output
