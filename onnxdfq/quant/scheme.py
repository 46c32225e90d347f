"""Typed quantization settings: one grid (`QuantScheme`) and the per-layer bit-width map."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MIN_BITS", "MAX_BITS", "QuantScheme", "BitWidthMap", "parse_bits", "parse_act_bits"]

MIN_BITS = 2  # ternary {-1, 0, 1}: the narrowest symmetric signed grid
MAX_BITS = 8  # the widest grid we store (int8 / uint8 containers)


@dataclass(frozen=True)
class QuantScheme:
    """A uniform integer grid.

    Signed symmetric grids use the restricted range [-(2^(b-1)-1), 2^(b-1)-1] so that zero is
    exact and the grid is symmetric (2 bits -> {-1, 0, 1}). Unsigned grids use [0, 2^b - 1].
    """

    bits: int
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = True
    axis: int = 0

    def __post_init__(self) -> None:
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bit width must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1) - 1) if self.symmetric else -(2 ** (self.bits - 1))
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


@dataclass(frozen=True)
class BitWidthMap:
    """Weight bit width per layer. Precedence: `default` < `by_op` (op type) < `by_name` (node name)."""

    default: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)

    def bits_for(self, name: str, op_type: str) -> int:
        if name in self.by_name:
            return self.by_name[name]
        return self.by_op.get(op_type, self.default)

    def with_names(self, updates: dict[str, int]) -> BitWidthMap:
        return BitWidthMap(self.default, dict(self.by_op), {**self.by_name, **updates})


def _check_width(value: int, what: str) -> int:
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{what} must be between {MIN_BITS} and {MAX_BITS} bits, got {value}")
    return value


def parse_bits(text: str | int) -> tuple[int, int | None]:
    """Parse ``--bits``: ``"8"`` -> (8, None); ``"2/6"`` -> (2, 6) with LOW < HIGH."""
    text = str(text).strip()
    try:
        if "/" in text:
            low_s, high_s = text.split("/", 1)
            low, high = int(low_s), int(high_s)
            _check_width(low, "the low bit width")
            _check_width(high, "the high bit width")
            if low >= high:
                raise ValueError(f"LOW/HIGH needs LOW < HIGH, got {text}")
            return low, high
        return _check_width(int(text), "--bits"), None
    except ValueError as exc:
        if "invalid literal" in str(exc):
            raise ValueError(f"--bits takes N or LOW/HIGH with integers in 2..8, got {text!r}") from None
        raise


def parse_act_bits(text: str | int | None) -> int | None:
    """Parse ``--act-bits``: an integer in 2..8, or ``none`` for float activations."""
    if text is None:
        return None
    text = str(text).strip().lower()
    if text in ("none", "fp32", "float"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--act-bits takes an integer in 2..8 or 'none', got {text!r}") from None
    return _check_width(value, "--act-bits")
