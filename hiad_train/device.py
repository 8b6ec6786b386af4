"""Where training runs: the `device:` setting, resolved to the torch devices the work is placed on,
and the `precision:` of epoch-trained detectors (bf16 autocast around their forward passes).

`device:` is `auto` (the default: CUDA when PyTorch sees a GPU, else the CPU), `cpu`, `cuda` (the
current GPU), `cuda:N`, or a list of GPU ids as HiAD writes them (`device: [0, 1]`, or `cuda:N` names):
one worker per GPU. Its syntax is checked with the config; whether the GPUs exist is checked by
`resolve_devices`, which the CLI and the trainer call before any data is read, so a checkpoint trained
on a GPU still loads where there is none. Tensors go to a device and results come back to the CPU, so
checkpoints keep their format, and on the CPU every `.to` is a no-op: results are those of a CPU run.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from dataclasses import dataclass
from typing import Iterator, Literal, Union

import torch
from torch import nn

DeviceSpec = Union[str, int, list[Union[int, str]]]
Precision = Literal["fp32", "bf16"]
CPU = torch.device("cpu")
_CUDA_N = re.compile(r"cuda:(\d+)")


class DeviceError(ValueError):
    """A `device:` setting this machine cannot honour; the message names the key and what PyTorch sees."""


def check_device_spec(value) -> str | list[int]:
    """The setting in canonical form: 'auto', 'cpu', 'cuda', 'cuda:N', or a list of distinct GPU ids.
    Refuses (ValueError, for the config's message) anything else; needs no GPU."""

    def gpu_id(v) -> int:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
        match = _CUDA_N.fullmatch(v.strip().lower()) if isinstance(v, str) else None
        if match is None:
            raise ValueError(f"a GPU id is an int >= 0 or 'cuda:N', got {v!r}")
        return int(match.group(1))

    if isinstance(value, str) and value.strip().lower() in ("auto", "cpu", "cuda"):
        return value.strip().lower()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return f"cuda:{gpu_id(value)}"
        except ValueError:
            raise ValueError(f"expected auto, cpu, cuda, cuda:N or a list of GPU ids, got {value!r}") from None
    if isinstance(value, (list, tuple)) and value:
        ids = [gpu_id(v) for v in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"GPU ids repeat in {value!r}: list each GPU once")
        return ids
    raise ValueError(f"expected auto, cpu, cuda, cuda:N or a non-empty list of GPU ids, got {value!r}")


@dataclass(frozen=True)
class Devices:
    """The devices a run uses: `main` for this process's work, one worker per device when there are several."""

    all: tuple[torch.device, ...]

    @property
    def main(self) -> torch.device:
        return self.all[0]

    def __len__(self) -> int:
        return len(self.all)

    def __str__(self) -> str:
        return ", ".join(map(str, self.all))


def resolve_devices(spec: DeviceSpec = "auto", key: str = "device") -> Devices:
    """The devices a setting names, on this machine; DeviceError (naming `key`) for a GPU PyTorch does not see."""
    spec = check_device_spec(spec)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return Devices((torch.device("cuda", torch.cuda.current_device()) if count else CPU,))
    if spec == "cpu":
        return Devices((CPU,))
    if not count:
        raise DeviceError(
            f"{key}: {spec!r} asks for a CUDA GPU but PyTorch sees none (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}, torch.cuda.is_available() is False); "
            f"use {key}: cpu, or auto to take a GPU only where there is one"
        )
    if spec == "cuda":
        return Devices((torch.device("cuda", torch.cuda.current_device()),))
    ids = [int(spec.split(":")[1])] if isinstance(spec, str) else spec
    missing = [i for i in ids if i >= count]
    if missing:
        raise DeviceError(
            f"{key}: {spec!r} names GPU {', '.join(map(str, missing))} but PyTorch sees {count} GPU(s) "
            f"(ids 0-{count - 1}, after CUDA_VISIBLE_DEVICES)"
        )
    return Devices(tuple(torch.device("cuda", i) for i in ids))


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors are (its first parameter's or buffer's device; the CPU for none)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return CPU


@contextlib.contextmanager
def placed(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module on `device` inside the block, back where it was on exit (nothing moves on the CPU)."""
    home = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16: the block's forward passes under torch.autocast in bfloat16 (weights, optimizer state and the
    checkpoint stay fp32); fp32: nothing changes."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
