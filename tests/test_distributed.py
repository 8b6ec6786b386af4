"""Training on Ray (a local cluster of 2 CPUs) computes exactly what the single-process path computes;
a worker killed mid-task is retried; a task failing every attempt fails the run by name, unpublished."""

import json

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

from conftest import TINY, tiny_config  # noqa: E402

from hiad_export.writer import write_bundle  # noqa: E402
from hiad_train.checkpoint import save_checkpoint  # noqa: E402
from hiad_train.distributed import FAULT_ENV, RayExecutor  # noqa: E402
from hiad_train.executors import StageFailed  # noqa: E402
from hiad_train.trainer import HRTrainer  # noqa: E402

EPOCHS = dict(  # an epoch-trained detector validated per epoch (the validator travels to the worker)
    detector="fastflow",
    patch={"flow_step": 2, "hidden_ratio": 0.5, "num_epochs": 1, "batch_size": 4},
    tasks={"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
    val_config={"anomaly_syn_fn": {"name": "random_box", "p": 0.5}, "val_sample_ratio": 0.25, "max_patch_number": 200},
)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_checkpoint_and_bundle_equal_the_single_process_ones(
    cluster, trained, default_bundle, train_samples, parity_images, tmp_path
):
    executor = RayExecutor()
    model = HRTrainer(tiny_config(), progress=False, executor=executor).fit(train_samples)
    assert set(executor.seconds["tasks"]) == {"task_0", "task_1", "task_2", "task_3"}
    local, remote = save_checkpoint(trained, tmp_path / "local"), save_checkpoint(model, tmp_path / "ray")
    assert files(local) == files(remote)  # every tensor bit for bit, and checkpoint.json

    write_bundle(model, tmp_path / "bundle", parity_images)
    manifests = [json.loads((b / "manifest.json").read_text()) for b in (default_bundle[1], tmp_path / "bundle")]
    for m in manifests:
        del m["created"]
    assert manifests[0] == manifests[1]


def test_epoch_training_with_validation_is_identical_on_ray(cluster, train_samples, tmp_path):
    config = tiny_config(**EPOCHS)
    local = HRTrainer(config, progress=False).fit(train_samples)
    remote = HRTrainer(config, progress=False, executor=RayExecutor(ship_features=True)).fit(train_samples)
    assert remote.training == local.training and remote.training["task_0"]["selection_metrics"]
    assert files(save_checkpoint(local, tmp_path / "local")) == files(save_checkpoint(remote, tmp_path / "ray"))


def test_a_worker_killed_mid_task_is_retried(cluster, trained, train_samples, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "task_1:kill-once")
    with pytest.raises(StageFailed, match="task_1 failed: after 1 attempt.*WorkerCrashedError"):  # the kill is real
        HRTrainer(tiny_config(distributed={"max_retries": 0}), progress=False, executor=RayExecutor()).fit(
            train_samples
        )
    model = HRTrainer(tiny_config(), progress=False, executor=RayExecutor()).fit(train_samples)
    assert files(save_checkpoint(model, tmp_path / "ray")) == files(save_checkpoint(trained, tmp_path / "local"))


def test_a_task_failing_every_attempt_fails_the_run_by_name_with_no_checkpoint(
    cluster, elpv_root, tmp_path, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    from hiad_train.cli import app

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "distributed": {"max_retries": 1}}))
    monkeypatch.setenv(FAULT_ENV, "task_2:raise")
    result = CliRunner().invoke(
        app, ["train", str(cfg), "--data", str(elpv_root), "--out", str(tmp_path / "run"), "--ray", "local"]
    )
    assert result.exit_code == 2
    assert "task_2 failed: after 2 attempt(s): RuntimeError: fault injected by HIAD_FAULT" in result.output
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert ray.is_initialized()  # the CLI leaves a Ray connection it did not open
