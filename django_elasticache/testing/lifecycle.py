"""The ``with`` protocol shared by what the testing package starts and must stop."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TypeVar

StartableT = TypeVar("StartableT", bound="Startable")
StoppableT = TypeVar("StoppableT", bound="Stoppable")


class Stoppable(abc.ABC):
    """Something that holds what a test must not leak (processes, sockets, key files).

    Leaving a ``with`` block stops it, however the block ended.
    """

    @abc.abstractmethod
    def stop(self) -> None:
        """Release everything this object holds (idempotent)."""

    def __enter__(self: StoppableT) -> StoppableT:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Startable(Stoppable):
    """A Stoppable that entering a ``with`` block starts."""

    @abc.abstractmethod
    def start(self: StartableT) -> StartableT:
        """Start serving and return self."""

    def __enter__(self: StartableT) -> StartableT:
        return self.start()
