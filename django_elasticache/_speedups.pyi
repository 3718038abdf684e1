from collections.abc import Callable, Sequence
from typing import Any

def parse_values(
    other_line: Callable[[bytes | bytearray, int, dict[bytes, tuple[int, bytes]]], Any],
    malformed: type[Exception],
    buffer: bytes | bytearray,
    start: int,
) -> tuple[Any, int] | None: ...
def made_key(cache: Any, key: Any, version: Any) -> str | None: ...
def prefixed_keys(prefix: str, keys: list[Any]) -> dict[str, Any] | None: ...
def group_by_node(
    keys: list[Any], node_index: Callable[[Any], int], count: int
) -> list[list[Any]]: ...
def retrieval_request(keys: list[Any]) -> tuple[bytes, dict[bytes, Any]] | None: ...
def decoded_values(
    found: dict[bytes, tuple[int, bytes]],
    asked: dict[bytes, Any],
    decode: Callable[[bytes, int], Any],
    flag: int,
    decode_flagged: Callable[[bytes, int], Any],
    text_flags: int,
) -> dict[Any, Any]: ...
def borrow(pool: Any) -> Any: ...
def give_back(pool: Any, client: Any) -> None: ...
def pooled_call(
    pools: Sequence[Any],
    node_index: Callable[[str], int] | None,
    is_node_failure: Callable[[BaseException], bool],
    method: str,
    key: str,
    *args: Any,
) -> Any: ...
