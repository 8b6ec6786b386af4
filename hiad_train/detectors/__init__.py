"""Detectors by name: each implements `hiad_train.detectors.base.Detector`."""

from hiad_train.detectors.base import Detector
from hiad_train.detectors.patchcore import PatchCore

DETECTORS: dict[str, type[Detector]] = {PatchCore.name: PatchCore}

__all__ = ["DETECTORS", "Detector", "PatchCore"]
