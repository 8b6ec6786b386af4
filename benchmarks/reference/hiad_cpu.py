"""HiAD 0.2.1 on a CPU, patched at import time (never by editing installed files).

Importing this module, in the reference venv only, before anything else of HiAD:
- gives HiAD's worker functions a `torch` whose `device("cuda")` is the CPU (they hard-code CUDA),
- makes `Tensor.cuda()` a no-op in this process (HiAD's image score and some detectors call it),
- lets `torch.load` (weights_only, PyTorch >= 2.6) read the NumPy arrays HiAD's checkpoints hold,
- registers `tf_efficientnet_lite0` with the project's packaged ImageNet weights in the backbone
  tables of HiAD's PatchCore and PaDiM, the same way HiAD registers its timm backbones (an
  expression that `backbones.load` evaluates).

HiAD trains in `spawn`ed worker processes, which re-import the harness's main module: the harness
imports this module at its top level so every worker is patched too.
"""

from __future__ import annotations

import types

import numpy as np
import torch


class _CpuTorch(types.ModuleType):
    """`torch` as HiAD's device functions see it: every device is the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs) -> torch.device:
        return torch.device("cpu")


def packaged_backbone(name: str) -> torch.nn.Module:
    """A timm classifier with the ImageNet weights the project uses (hiad_train.backbones)."""
    import timm

    from hiad_train.backbones import pretrained_state_dict

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(pretrained_state_dict(name))
    return model.eval()


def _patch() -> None:
    import hiad.utils.device
    from hiad.detectors.padim import backbones as padim_backbones
    from hiad.detectors.patchcore import backbones as patchcore_backbones

    hiad.utils.device.torch = _CpuTorch("torch")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    arrays = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float32))]
    torch.serialization.add_safe_globals(arrays)
    for table in (patchcore_backbones, padim_backbones):  # PatchCore's and PaDiM's backbone tables
        table.packaged_backbone = packaged_backbone
        table._BACKBONES["tf_efficientnet_lite0"] = 'packaged_backbone("tf_efficientnet_lite0")'


_patch()
