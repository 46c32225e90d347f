"""Convolution geometry that every runtime shares: ONNX's explicit pads, ``auto_pad`` expanded (pure Python)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["resolve_pads"]


def resolve_pads(
    attrs: dict[str, Any],
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """Explicit ONNX pads ``[b_0, b_1, .., e_0, e_1, ..]`` for a conv/pool node, expanding ``auto_pad``
    SAME_UPPER/SAME_LOWER (TF exports) over input ``spatial`` sizes."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    nd = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * (2 * nd)))
    if auto_pad == "VALID":
        return [0] * (2 * nd)
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends
