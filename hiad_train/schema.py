"""The building blocks every config section is made of: strict sections and size values.

A leaf module (it imports no other hiad_train module), so config.py, the detector contract
(detectors/base.py), the task generators and the synthesizers can all declare their sections with
it without importing one another.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _size(value):
    """An int or a (width, height) pair of positive ints, kept in the form given."""

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if whole(value):
        pair = (value, value)
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(whole, value)):
        pair = tuple(value)
    else:
        raise ValueError(f"must be a positive int or a [width, height] pair of ints, got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value if whole(value) else pair


SizeSpec = Annotated[Union[int, tuple[int, int]], BeforeValidator(_size)]


class Strict(BaseModel):
    """A config section: unknown keys are refused (by name, see config.py), values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
