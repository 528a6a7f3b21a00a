"""The engines the handlers drive: the FLUX.2-klein pipeline and the Real-ESRGAN upscaler.

Importing this package does not import torch: the names below resolve on first attribute access
(PEP 562), so the worker's config and contract code can name engines without loading the GPU stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handlers.engines.klein import HUB_IDS, KleinEngine, build_engine, create_klein_engine, load_pipeline
    from handlers.engines.quantize import UnsupportedQuantization
    from handlers.engines.tiny import build_tiny_pipeline
    from handlers.engines.upscaler import Upscaler, create_upscaler

_LAZY: dict[str, str] = {
    "HUB_IDS": "handlers.engines.klein",
    "KleinEngine": "handlers.engines.klein",
    "build_engine": "handlers.engines.klein",
    "create_klein_engine": "handlers.engines.klein",
    "UnsupportedQuantization": "handlers.engines.quantize",
    "load_pipeline": "handlers.engines.klein",
    "build_tiny_pipeline": "handlers.engines.tiny",
    "Upscaler": "handlers.engines.upscaler",
    "create_upscaler": "handlers.engines.upscaler",
}

__all__ = [
    "HUB_IDS",
    "KleinEngine",
    "UnsupportedQuantization",
    "Upscaler",
    "build_engine",
    "build_tiny_pipeline",
    "create_klein_engine",
    "create_upscaler",
    "load_pipeline",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
