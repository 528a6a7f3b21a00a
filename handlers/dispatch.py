"""The job type -> handler table the worker dispatches on, and the shape every handler has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from handlers.engine_set import Engines
from handlers.generate import generate
from handlers.ports import Finished, Transfer
from handlers.upscale import upscale

InputT = TypeVar("InputT", contravariant=True)


class Handler(Protocol[InputT]):
    """A job handler: validated input in, ``Finished`` out, or a ``JobError`` raised."""

    def __call__(self, inp: InputT, /, *, engines: Engines, transfer: Transfer) -> Finished: ...


HANDLERS: Mapping[str, Handler[Any]] = {"generate": generate, "upscale": upscale}
