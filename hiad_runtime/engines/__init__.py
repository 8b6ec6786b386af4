"""The engines an Inspector can run a bundle with, in a table: kind -> how to make one from the bundle,
its plan, a session factory and the runtime options. Adding one: a module here and one entry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from hiad_runtime.backends import SessionFactory
from hiad_runtime.bundle import Bundle
from hiad_runtime.cores import CORES
from hiad_runtime.engines.base import Engine, EngineKind
from hiad_runtime.engines.pipeline import PipelineEngine
from hiad_runtime.engines.tiles import TileEngine
from hiad_runtime.plan import InferencePlan

if TYPE_CHECKING:
    from hiad_runtime.options import RuntimeOptions

Maker = Callable[[Bundle, InferencePlan, SessionFactory, "RuntimeOptions"], Engine]

ENGINES: dict[EngineKind, Maker] = {
    EngineKind.tiles: lambda bundle, plan, sessions, o: TileEngine(
        bundle, plan, sessions, o.batch_size, o.head_path, o.stream_tiles, o.head_memory, o.threads or CORES
    ),
    EngineKind.pipeline: lambda bundle, plan, sessions, o: PipelineEngine(bundle, sessions),
}

__all__ = ["ENGINES", "Engine", "EngineKind", "PipelineEngine", "TileEngine"]
