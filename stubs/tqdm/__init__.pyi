# Minimal stubs for the part of tqdm nexus_sli uses.
# ruff: noqa: N801 - the stub mirrors tqdm's own class name
from typing import IO, Any

class tqdm:
    def __init__(
        self,
        iterable: Any = ...,
        desc: str | None = ...,
        total: float | None = ...,
        leave: bool | None = ...,
        file: IO[str] | None = ...,
        unit: str = ...,
        disable: bool | None = ...,
        **kwargs: Any,
    ) -> None: ...
    def update(self, n: float | None = ...) -> bool | None: ...
    def close(self) -> None: ...
    def set_postfix_str(self, s: str = ..., refresh: bool = ...) -> None: ...
