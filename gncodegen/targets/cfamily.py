"""What the C-family targets (C, CUDA, and any later one like them) share when they print the
common numerics of templates/common/numerics.j2: a style record that spells it for one target."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import Spelling


@dataclass(frozen=True)
class Style:
    """How one target spells the shared numerics functions."""

    qualifier: str        # before each function: static, __device__ __forceinline__
    acc: Spelling         # the accumulation type
    acc_name: str         # how the code names that type: float, acc_t
    stats: str            # the statistics type
    finish: str           # function names
    split_mean: str
    inv_numel: str        # the named constants the functions use
    epsilon: str
    cpp: bool = False     # C++: default arguments for the common case
    inv_param: bool = False   # 1/N is finish()'s last argument (sizes known at run time)

    @property
    def zero(self) -> str:
        """0 in the accumulation type."""
        return "0.0" + self.acc.suffix

    @property
    def one(self) -> str:
        """1 in the accumulation type."""
        return "1.0" + self.acc.suffix

    @property
    def sqrt(self) -> str:
        """The square root of the accumulation type."""
        return self.acc.sqrt

    def default(self, value: str) -> str:
        """A parameter's default where the language has them (` = value`), else nothing."""
        return f" = {value}" if self.cpp else ""
