"""Training on a device (#21): the `device:` setting read in every form and refused by name before any work
when it names a GPU PyTorch does not see; the CPU path bit for bit what the default trains; `precision: bf16`
(autocast) training and scoring real models on the CPU; one worker process per device sharing the tasks out.
What only a GPU can show (CUDA training against the CPU, bf16 there, two GPUs) skips, saying why."""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from hiad_train import cli
from hiad_train.checkpoint import load_checkpoint, save_checkpoint
from hiad_train.components.epochs import optimize
from hiad_train.config import ConfigError, load_config
from hiad_train.device import CPU, DeviceError, Devices, resolve_devices
from hiad_train.evaluation import image_auroc
from hiad_train.executors import DeviceExecutor, LocalExecutor, Stage, local_executor
from hiad_train.trainer import HRTrainer

ROOT = Path(__file__).resolve().parent.parent
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
no_gpu = pytest.mark.skipif(GPUS > 0, reason="PyTorch sees a GPU here: `auto` takes it and `cuda` is valid")
needs_cuda = pytest.mark.skipif(
    GPUS == 0, reason="PyTorch sees no CUDA GPU (run on a GPU machine: benchmarks/gpu_check.sh on a lent one)"
)
FASTFLOW = dict(  # an epoch-trained detector with per-epoch validation and a thumbnail branch
    detector="fastflow",
    patch={"flow_step": 2, "hidden_ratio": 0.5, "num_epochs": 2, "batch_size": 4},
    thumbnail={"flow_step": 2, "hidden_ratio": 0.5, "num_epochs": 1, "batch_size": 4, "thumbnail_size": 128},
    tasks={"generator": "neighborhood", "num_groups_width": 2, "num_groups_height": 1},
    val_config={"anomaly_syn_fn": {"name": "random_box", "p": 0.5}, "val_sample_ratio": 0.25, "max_patch_number": 200},
)
VITAD = dict(  # configs/vitad.yaml's detector, shrunk: a random ViT-Tiny (no weights offline)
    detector="vitad",
    patch={
        "backbone_name": "vit_tiny_patch16_224",
        "allow_random_backbone": True,
        "layers_to_extract_from": [0, 1, 2],
        "neck_layers": [3],
        "total_epochs": 2,
        "batch_size": 4,
    },
    tasks={"generator": "a2o"},
)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the setting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "given, read",
    [("auto", "auto"), ("CPU", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), (1, "cuda:1"), ([0, "cuda:1"], [0, 1])],
)
def test_the_device_setting_is_read_in_every_form(given, read):
    assert tiny_config(device=given).device == read
    assert "device" not in tiny_config(device=given).model_dump()  # not a part of the model: never in a checkpoint


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", [], [0, 0], [0, "gpu"], -1, True])
def test_a_malformed_device_is_refused_by_name(bad):
    with pytest.raises(ConfigError, match=r"\n  device: "):
        tiny_config(device=bad)


def test_gpus_are_checked_against_those_pytorch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs, as PyTorch sees it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_devices("auto").all == resolve_devices("cuda").all == (torch.device("cuda", 0),)
    two = resolve_devices([1, 0])
    assert two.all == (torch.device("cuda", 1), torch.device("cuda", 0)) and two.main == torch.device("cuda", 1)
    assert isinstance(local_executor(two), DeviceExecutor) and type(local_executor(resolve_devices("cuda:1"))) is (
        LocalExecutor
    )
    with pytest.raises(DeviceError, match=r"^device: 'cuda:3' names GPU 3 but PyTorch sees 2 GPU\(s\) \(ids 0-1"):
        resolve_devices("cuda:3")
    with pytest.raises(DeviceError, match=r"^--device: \[0, 2, 5\] names GPU 2, 5 but"):
        resolve_devices([0, 2, 5], "--device")


@no_gpu
def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused_by_name():
    assert resolve_devices().all == resolve_devices("cpu").all == (CPU,)
    for spec in ("cuda", "cuda:0", [0, 1]):
        with pytest.raises(DeviceError, match=r"^device: .* asks for a CUDA GPU but PyTorch sees none"):
            resolve_devices(spec)
    with pytest.raises(DeviceError, match="asks for a CUDA GPU"):  # the trainer too, before any work
        HRTrainer(tiny_config(device="cuda"))


@no_gpu
@pytest.mark.parametrize("where", ["--device", "device"])
def test_cli_refuses_cuda_without_a_gpu_before_reading_any_image(where, tmp_path, monkeypatch):
    def read(*_):
        raise AssertionError("training data read")

    monkeypatch.setattr(cli, "_samples", read)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, **({"device": "cuda"} if where == "device" else {})}))
    out = tmp_path / "run"
    args = ["train", str(config), "--data", str(tmp_path), "--out", str(out)]
    result = CliRunner().invoke(cli.app, args + (["--device", "cuda"] if where == "--device" else []))
    assert result.exit_code == 2, result.output
    assert f"error: {where}: 'cuda' asks for a CUDA GPU but PyTorch sees none" in result.output
    assert not out.exists()  # nothing written


@no_gpu
def test_cli_reads_a_list_of_gpu_ids(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["train", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "0, 1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and "error: --device: [0, 1] asks for a CUDA GPU" in result.output


def test_vitads_gpu_setting_takes_cuda_and_bf16():
    config = load_config(ROOT / "configs" / "vitad.yaml", {"device": "cuda", "patch": {"precision": "bf16"}})
    assert (config.device, config.patch.precision, config.detector) == ("cuda", "bf16", "vitad")


def test_cli_precision_is_refused_for_a_detector_without_epochs(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))  # patchcore
    args = ["train", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--precision", "bf16"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and "--precision: detector 'patchcore' is not trained over epochs" in result.output


# -- the CPU path: what it was --------------------------------------------------------------------------


@no_gpu
def test_device_cpu_trains_bit_for_bit_what_the_default_trains(trained, train_samples, tmp_path):
    explicit = HRTrainer(tiny_config(device="cpu"), progress=False).fit(train_samples)
    assert files(save_checkpoint(trained, tmp_path / "auto")) == files(save_checkpoint(explicit, tmp_path / "cpu"))
    epochs = [
        HRTrainer(tiny_config(**FASTFLOW, **d), progress=False).fit(train_samples) for d in ({}, {"device": "cpu"})
    ]
    assert epochs[0].training == epochs[1].training and epochs[0].training["task_0"]["selection_metrics"]
    saved = [files(save_checkpoint(m, tmp_path / f"ff{i}")) for i, m in enumerate(epochs)]
    assert saved[0] == saved[1] and any(k.startswith("thumbnail/") for k in saved[0])


# -- bf16 autocast ---------------------------------------------------------------------------------------


class Probe(nn.Module):
    """A linear layer that notes the dtype its output was computed in."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        y = self.linear(x)
        self.seen.append(y.dtype)
        return y


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_optimize_runs_the_forward_passes_in_the_precision(precision, dtype):
    probe = Probe()
    x = torch.randn(8, 4)
    loss = lambda b: probe(b).float().square().mean()  # noqa: E731
    optimize(probe, [x[:4], x[4:]], loss, [torch.optim.SGD(probe.parameters())], precision=precision)
    assert probe.seen == [dtype, dtype] and probe.linear.weight.dtype == torch.float32


@pytest.mark.parametrize("setup", [FASTFLOW, VITAD], ids=["fastflow", "vitad"])
def test_bf16_trains_and_scores_a_real_model_on_the_cpu(setup, train_samples, test_samples, tmp_path):
    models = {
        p: HRTrainer(tiny_config(**{**setup, "patch": {**setup["patch"], "precision": p}}), progress=False).fit(
            train_samples
        )
        for p in ("fp32", "bf16")
    }
    bf16 = models["bf16"]
    assert all(np.isfinite(r["final_loss"]) for r in bf16.training.values())
    ckpt = save_checkpoint(bf16, tmp_path / "bf16")
    tensors = {f: load_file(f) for f in ckpt.rglob("*.safetensors")}
    assert all(t.dtype == torch.float32 for ts in tensors.values() for t in ts.values() if t.is_floating_point())
    task = next(iter(bf16.detectors))
    fp32_state, bf16_state = models["fp32"].detectors[task].state(), bf16.detectors[task].state()
    assert any(not torch.equal(fp32_state[k], bf16_state[k]) for k in fp32_state)  # autocast took effect
    reloaded = load_checkpoint(ckpt)
    for sample in test_samples[:2]:
        image = sample.image((256, 256))
        amap, score = bf16.predict(image)
        assert np.isfinite(amap).all() and np.isfinite(score)
        assert np.array_equal(reloaded.predict(image)[0], amap)


# -- one worker per device -------------------------------------------------------------------------------


@dataclass
class Meeting:
    """A stage's shared inputs for `meet`: a folder where the workers sign in."""

    folder: str
    device: torch.device = CPU


def meet(shared: Meeting, item: int) -> tuple[int, int, str]:
    """Signs this worker in, then waits (at most a minute) until two workers have: both must take items."""
    Path(shared.folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(shared.folder)) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("a single worker took the items")
        time.sleep(0.05)
    return item, os.getpid(), str(shared.device)


def test_one_worker_per_device_shares_the_items_out(tmp_path):
    devices = Devices((CPU, CPU))  # two workers, as for two GPUs: each gets its device from the list
    executor = DeviceExecutor(devices)
    stage = Stage("meet", meet, Meeting(str(tmp_path)), list(range(6)), [f"item {i}" for i in range(6)], TINY_RES)
    results = executor.run(stage)
    assert [r[0] for r in results] == list(range(6))  # in item order
    pids = {r[1] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids and {r[2] for r in results} == {"cpu"}
    assert set(executor.seconds["meet"]) == set(stage.labels)


@pytest.mark.parametrize("setup", [{"device": "cpu"}, FASTFLOW], ids=["patchcore", "fastflow+thumbnail"])
def test_a_config_travels_to_a_worker_process_as_its_data(setup):
    config = tiny_config(**setup)  # its class is made per detector: pickle cannot find it by name
    again = pickle.loads(pickle.dumps(config))
    assert again == config and type(again).__name__ == type(config).__name__ and again.device == config.device


def test_two_cpu_workers_train_bit_for_bit_what_one_process_trains(trained, train_samples, tmp_path, caplog):
    executor = DeviceExecutor(Devices((CPU, CPU)))
    with caplog.at_level("INFO", logger="hiad_train.executors"):
        model = HRTrainer(tiny_config(), progress=False, executor=executor).fit(train_samples)
    assert set(executor.seconds["tasks"]) == {"task_0", "task_1", "task_2", "task_3"}
    assert sum("on cpu (worker " in r.getMessage() for r in caplog.records) == 5  # 1 feature batch + 4 tasks
    assert files(save_checkpoint(trained, tmp_path / "one")) == files(save_checkpoint(model, tmp_path / "two"))


def test_a_failing_item_fails_the_stage_by_name(tmp_path):
    from hiad_train.executors import StageFailed

    stage = Stage("meet", meet, Meeting(str(tmp_path / "missing")), [0], ["item 0"], TINY_RES)
    with pytest.raises(StageFailed, match=r"^item 0 failed: FileNotFoundError"):
        DeviceExecutor(Devices((CPU, CPU))).run(stage)


def test_a_ray_task_uses_the_gpu_ray_gave_it(monkeypatch):
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from hiad_train.distributed import task_device

    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])  # Ray set CUDA_VISIBLE_DEVICES=3: cuda:0 in the task
    assert task_device() == torch.device("cuda", 0)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert task_device() == CPU


# -- on a GPU only ---------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_training_keeps_the_checkpoint_format_and_the_cpus_results(trained, train_samples, test_samples, tmp_path):
    on_gpu = HRTrainer(tiny_config(device="cuda"), progress=False).fit(train_samples)
    on_cpu = HRTrainer(tiny_config(device="cpu"), progress=False).fit(train_samples)
    ckpt = save_checkpoint(on_gpu, tmp_path / "cuda")
    assert sorted(files(ckpt)) == sorted(files(save_checkpoint(on_cpu, tmp_path / "cpu")))
    assert all(t.device.type == "cpu" for d in on_gpu.detectors.values() for t in d.state().values())
    overlap = []
    for task, det in on_gpu.detectors.items():
        gpu_rows = {tuple(r) for r in det.memory_bank.numpy().round(3).tolist()}
        cpu_rows = {tuple(r) for r in on_cpu.detectors[task].memory_bank.numpy().round(3).tolist()}
        overlap.append(len(gpu_rows & cpu_rows) / len(cpu_rows))
    scores = {
        m: [on.predict(s.image((256, 256)))[1] for s in test_samples] for m, on in (("gpu", on_gpu), ("cpu", on_cpu))
    }
    labels = np.array([s.label for s in test_samples])
    print(f"bank overlap per task {overlap}; scores gpu {scores['gpu']} cpu {scores['cpu']}")
    assert min(overlap) >= 0.8
    assert (
        abs(image_auroc(scores["gpu"], labels)["image_auroc"] - image_auroc(scores["cpu"], labels)["image_auroc"])
        <= 0.1
    )


@needs_cuda
def test_bf16_on_cuda_trains_a_finite_model(train_samples, test_samples):
    config = tiny_config(device="cuda", **{**FASTFLOW, "patch": {**FASTFLOW["patch"], "precision": "bf16"}})
    model = HRTrainer(config, progress=False).fit(train_samples)
    assert np.isfinite(model.predict(test_samples[0].image((256, 256)))[0]).all()


@pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs; PyTorch sees {GPUS}")
def test_two_gpus_train_what_one_trains(train_samples, tmp_path):
    one = HRTrainer(tiny_config(device="cuda:0"), progress=False).fit(train_samples)
    two = HRTrainer(tiny_config(device=[0, 1]), progress=False).fit(train_samples)
    assert files(save_checkpoint(one, tmp_path / "one")).keys() == files(save_checkpoint(two, tmp_path / "two")).keys()


TINY_RES = tiny_config().distributed.fit
