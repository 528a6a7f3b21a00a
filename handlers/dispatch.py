"""The job type -> handler table the worker dispatches on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handlers.generate import generate
from handlers.ports import Handler
from handlers.upscale import upscale

HANDLERS: Mapping[str, Handler[Any]] = {"generate": generate, "upscale": upscale}
