"""Per-layer weight widths under a budget: a multiple-choice knapsack over the layers (numpy only).

Each item l (a layer, or a pair of layers decided together) takes one option b from a candidate list; it then
costs ``size[l, b]`` (bits in the file or grid bits, whatever the budget counts) and adds ``noise[l, b]`` to the
network's output (relative noise power: the quantization noise of independent layers adds up in power, so the
sum over items is what to minimise). Items with fewer options pad their rows with noise inf.

`allocate_widths` solves it exactly up to a size resolution by dynamic programming over the budget, rounding
every size *up* to the resolution's unit, so that the widths it returns never exceed the budget as counted in
exact sizes. `pareto_front` gives the whole trade-off curve from the same table: the least noise reachable at
each size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_RESOLUTION", "Allocation", "allocate_widths", "pareto_front", "storage_bits", "stored_bits"]

DEFAULT_RESOLUTION = 4096  # budget units of the dynamic programme: sizes are rounded up to 1/4096 of the slack


def storage_bits(bits: int, packed: bool, int2: bool = False) -> int:
    """Bits one weight of a ``bits``-bit grid takes in the file: its container (int8, or packed INT4 / INT2)."""
    if not packed:
        return 8
    if bits <= 2 and int2:
        return 2
    return 4 if bits <= 4 else 8


def stored_bits(params: np.ndarray | float, channels: np.ndarray | float, bits: int, packed: bool,
                int2: bool = False) -> np.ndarray | float:
    """Bits a layer's weights and their per-channel zero points take in the file at a ``bits``-bit grid."""
    return (np.asarray(params, np.float64) + channels) * storage_bits(bits, packed, int2)


@dataclass(frozen=True)
class Allocation:
    choice: np.ndarray  # [L] index into the candidate widths
    size: float  # exact summed size of the choice
    noise: float  # summed noise of the choice


def _units(size: np.ndarray, budget: float, resolution: int) -> tuple[np.ndarray, int, float]:
    """Integer size units above each layer's smallest candidate (rounded up), the budget's units, and the base."""
    base = size.min(axis=1)
    slack = float(budget - base.sum())
    if slack < 0:
        raise ValueError(f"budget {budget:.6g} is below the smallest possible size {base.sum():.6g}")
    extra = size - base[:, None]
    top = float(extra.max(axis=1).sum())
    span = max(min(slack, top), 1e-12)
    unit = span / resolution
    units = np.ceil(extra / unit - 1e-9).astype(np.int64)  # up: the exact sizes then fit the budget
    return units, int(np.floor(min(slack, top) / unit + 1e-9)), float(base.sum())


def _table(noise: np.ndarray, units: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """best[j]: the least summed noise within j units; picks[l, j]: layer l's choice on that optimum."""
    layers, options = noise.shape
    best = np.zeros(capacity + 1)
    picks = np.zeros((layers, capacity + 1), np.int16)
    for layer in range(layers):
        candidates = np.full((options, capacity + 1), np.inf)
        for option in range(options):
            shift = units[layer, option]
            if shift <= capacity:
                candidates[option, shift:] = best[:capacity + 1 - shift] + noise[layer, option]
        picks[layer] = np.argmin(candidates, axis=0)
        best = candidates[picks[layer], np.arange(capacity + 1)]
    return best, picks


def _backtrack(picks: np.ndarray, units: np.ndarray, budget_units: int) -> np.ndarray:
    choice = np.zeros(picks.shape[0], np.int64)
    j = budget_units
    for layer in range(picks.shape[0] - 1, -1, -1):
        choice[layer] = picks[layer, j]
        j -= units[layer, choice[layer]]
    return choice


def _check_options(noise: np.ndarray, size: np.ndarray) -> None:
    """Every option finite, except padding (noise inf: items with fewer options than others), which must never be
    an item's smallest size (the dynamic programme starts from each item's smallest option)."""
    if np.isnan(noise).any() or not np.isfinite(size).all() or (noise == -np.inf).any():
        raise ValueError("noise and size must be finite (noise inf marks an option that does not exist)")
    smallest = np.argmin(size, axis=1)
    if not np.isfinite(noise[np.arange(noise.shape[0]), smallest]).all():
        raise ValueError("each row's smallest option must be a real (finite-noise) option")


def allocate_widths(noise: np.ndarray, size: np.ndarray, budget: float, *,
                    resolution: int = DEFAULT_RESOLUTION) -> Allocation:
    """The choice per layer (rows of ``noise``/``size``, [L, B]) with the least summed noise whose summed size
    is at most ``budget``. ValueError if even the smallest choices do not fit."""
    noise = np.asarray(noise, np.float64)
    size = np.asarray(size, np.float64)
    if noise.shape != size.shape or noise.ndim != 2:
        raise ValueError(f"noise {noise.shape} and size {size.shape} must be the same [layers, options]")
    _check_options(noise, size)
    units, capacity, _ = _units(size, budget, resolution)
    _, picks = _table(noise, units, capacity)
    choice = _backtrack(picks, units, capacity)
    rows = np.arange(len(choice))
    return Allocation(choice, float(size[rows, choice].sum()), float(noise[rows, choice].sum()))


def pareto_front(noise: np.ndarray, size: np.ndarray, *, points: int = 64,
                 resolution: int = DEFAULT_RESOLUTION) -> list[tuple[float, float]]:
    """(size, least summed noise) along the whole range of sizes: the allocations no other beats on both."""
    noise = np.asarray(noise, np.float64)
    size = np.asarray(size, np.float64)
    _check_options(noise, size)
    top = float(size.max(axis=1).sum())
    units, _, _ = _units(size, top, resolution)
    capacity = int(units.max(axis=1).sum())  # every layer at its largest option fits (rounding up included)
    best, picks = _table(noise, units, capacity)
    front: list[tuple[float, float]] = []
    rows = np.arange(noise.shape[0])
    for j in np.unique(np.linspace(0, capacity, points).round().astype(int)):
        choice = _backtrack(picks, units, int(j))
        point = (float(size[rows, choice].sum()), float(best[j]))
        if not front or point[1] < front[-1][1] - 1e-15:
            front.append(point)
    return front
