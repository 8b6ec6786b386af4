"""The detector registry: a detector module registers its class, and everything that needs the list
of detectors (config choices and sections, checkpoints, CLI help, the contract test) reads it here."""

from __future__ import annotations

from hiad_train.detectors.base import Detector, DetectorConfig

DETECTORS: dict[str, type[Detector]] = {}


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: add a Detector subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise TypeError(f"{cls!r} is not a Detector")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no `name`")
    if not (isinstance(getattr(cls, "Config", None), type) and issubclass(cls.Config, DetectorConfig)):
        raise TypeError(f"{cls.__name__}.Config must subclass DetectorConfig")
    if name in DETECTORS and DETECTORS[name] is not cls:
        raise ValueError(f"detector {name!r} is registered twice ({DETECTORS[name].__name__}, {cls.__name__})")
    DETECTORS[name] = cls
    return cls


def get_detector(name: str) -> type[Detector]:
    """The registered class; every detector module is imported with this package (its __init__)."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r} (registered: {', '.join(sorted(DETECTORS))})") from None
