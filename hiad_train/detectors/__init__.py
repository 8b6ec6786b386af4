"""Detectors: one module each, registering itself; importing this package imports them all."""

import importlib
import pkgutil

from hiad_train.detectors.base import Detector, DetectorConfig, EpochConfig, TaskData
from hiad_train.detectors.registry import DETECTORS, get_detector, register_detector

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "registry"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DETECTORS", "Detector", "DetectorConfig", "EpochConfig", "TaskData", "get_detector", "register_detector"]
