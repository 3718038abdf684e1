from collections.abc import Callable
from typing import Any

def parse_values(
    other_line: Callable[[bytes | bytearray, int, dict[bytes, tuple[int, bytes]]], Any],
    malformed: type[Exception],
    buffer: bytes | bytearray,
    start: int,
) -> tuple[Any, int] | None: ...
