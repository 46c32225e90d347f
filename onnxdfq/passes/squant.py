"""SQuant: data-free rounding that flips the cheapest roundings (Guo et al., ICLR 2022, arXiv 2202.07471)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SQUANT_STAGES", "squant_round", "squant_quantize"]

logger = logging.getLogger(__name__)

# the stage combinations the paper ablates: nearest rounding (E) with kernel (K) and/or channel (C) flips
SQUANT_STAGES: tuple[tuple[str, ...], ...] = (("e",), ("e", "k"), ("e", "c"), ("e", "k", "c"))
# smallest positive float64: `priority >= _TINY` means `priority > 0`
_TINY = float(np.nextafter(0.0, 1.0))
# when a row's largest flip count is below this fraction of the row, partition instead of sorting it
_PARTITION_FRACTION = 0.25


@dataclass(frozen=True)
class _KernelFlips:
    """What the K stage did, per kernel [O, I]."""

    err_sum: np.ndarray  # E = sum of rounding errors after nearest rounding
    sign: np.ndarray  # sign(E): +1 flips round-ups down, -1 flips round-downs up
    flipped: np.ndarray  # number of elements flipped (round(|E|) unless the grid ends stopped it)
    last: np.ndarray  # priority of the last element flipped (meaningful where flipped > 0)
    top: np.ndarray  # largest priority in the kernel (the first candidate)


def squant_round(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, *,
                 stages: Sequence[str] = ("e", "k", "c")) -> np.ndarray:
    """Round weights onto the integer grid with SQuant's progressive flipping.

    Parameters
    ----------
    w_fp : ndarray, float32 or float64, shape [O, I, *spatial]
        Weight with the output channel first: ONNX Conv OIHW (depthwise is [O, 1, kh, kw]), 1-D
        convs [O, I, k], Gemm/MatMul weights given as [O, I]. A kernel is one (o, i) slice.
    scale : ndarray, shape [O] or size 1
        Positive per-output-channel (or per-tensor) scale; the grid is ``q * scale``.
    qmin, qmax : int
        Integer grid limits, e.g. [-(2^(b-1)-1), 2^(b-1)-1] for a signed symmetric b-bit grid.
    stages : sequence of str
        One of ``SQUANT_STAGES``: ``("e",)`` is nearest rounding, ``"k"`` adds kernel flips,
        ``"c"`` channel flips.

    Returns
    -------
    ndarray, int64, same shape as `w_fp`, values in [qmin, qmax].

    Notes
    -----
    With x = w / scale (float64) and the rounding error e = q - x, SQuant approximates the
    Hessian of the task loss by a diagonal plus per-kernel and per-channel constant blocks, so it
    minimises the CASE objective: the element-, kernel- and channel-wise sums of e.

    - E: q = clip(rint(x), qmin, qmax) (ties to even), so |e| <= 1/2 inside the range.
    - K, per kernel with E = sum e over its taps: the candidates are the elements whose error has
      the sign of E and that can move one step toward reducing |E| without leaving the grid.
      The round(|E|) candidates with the largest |e| (the cheapest to flip) move one step, ties
      going to the lower tap index. Then |E_kernel| <= 1/2. Kernels with one tap skip this stage.
    - C, per output channel with E_c = sum of the kernel sums: each kernel with E_kernel of the
      sign of E_c and E_kernel != 0 offers one candidate, the element whose flip reduces
      |E_kernel|: the last element the K stage flipped, which flips back (its |e| is then >= 1/2),
      or else the next unflipped candidate in the K order. The round(|E_c|) offers with the
      largest |e| (ties to the lower input channel) move one step. Then |E_channel| <= 1/2,
      every |E_kernel| < 1 and every |e| < 1. Without the K stage (``("e", "c")`` or one-tap
      kernels) every element of the channel is a candidate, as in the reference code.

    The bounds hold for elements whose x lies in [qmin, qmax]; clipped elements cannot move
    outward, which can leave fewer candidates than flips wanted. Every q stays within one step of
    nearest rounding. The paper's ``over_squant`` quirk for E == 0 is not copied: a kernel with
    E_kernel == 0 after the K stage offers nothing, which keeps |E_kernel| < 1 strict.

    The work is vectorised over all kernels and channels (a sort or partition per row, rank masks);
    only the few rows with tied priorities are re-ranked with a stable argsort. Inputs are never
    modified.
    """
    stage_set = _check_stages(stages)
    weight = np.asarray(w_fp)
    if weight.ndim < 2:
        raise ValueError(f"w_fp must be [O, I, *spatial], got shape {weight.shape}")
    if weight.dtype not in (np.float32, np.float64):
        raise ValueError(f"w_fp must be float32 or float64, got {weight.dtype}")
    qmin, qmax = int(qmin), int(qmax)
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got [{qmin}, {qmax}]")
    out_ch, in_ch = weight.shape[:2]
    taps = math.prod(weight.shape[2:])
    scale64 = _channel_scale(scale, out_ch)
    if weight.size == 0:
        return np.zeros(weight.shape, np.int64)

    # block layout [O, taps, I]: sums and maxima over a kernel's taps are then vector operations
    rows = weight.reshape(out_ch, in_ch, taps)
    x_lo, x_hi = _grid_range(rows, scale64)
    resid = np.empty((out_ch, taps, in_ch))
    np.divide(rows.transpose(0, 2, 1), scale64[:, None, None], out=resid)
    q = np.empty(resid.shape, _grid_dtype(qmin, qmax))
    outside = None
    if x_lo < qmin or x_hi > qmax:
        # clipped elements cannot move further out: they are never candidates
        outside = (resid < qmin) | (resid > qmax)
        np.rint(np.clip(resid, qmin, qmax), out=q, casting="unsafe")
        logger.debug("squant: %d element(s) outside [%d, %d]", int(outside.sum()), qmin, qmax)
    else:
        np.rint(resid, out=q, casting="unsafe")
    resid -= q  # x - q = -e

    if "k" in stage_set and taps > 1:
        flips = _kernel_stage(resid, q, outside)  # resid now holds the flip priorities
        if "c" in stage_set:
            _channel_stage_after_kernels(resid, q, flips)
    elif "c" in stage_set:
        _channel_stage_flat(resid, q, outside)

    w_int = np.empty((out_ch, in_ch, taps), np.int64)
    np.copyto(w_int, q.transpose(0, 2, 1))
    return w_int.reshape(weight.shape)


def squant_quantize(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, *,
                    stages: Sequence[str] = ("e", "k", "c")) -> np.ndarray:
    """``squant_round`` followed by dequantization: q * scale, in the dtype of `w_fp`."""
    w_int = squant_round(w_fp, scale, qmin, qmax, stages=stages)
    weight = np.asarray(w_fp)
    scale64 = _channel_scale(scale, weight.shape[0])
    w_dq = w_int * scale64.reshape((-1,) + (1,) * (weight.ndim - 1))
    return w_dq.astype(weight.dtype)


def _check_stages(stages: Sequence[str]) -> frozenset[str]:
    if isinstance(stages, str) or tuple(stages) not in SQUANT_STAGES:
        raise ValueError(f"stages must be one of {SQUANT_STAGES}, got {stages!r}")
    return frozenset(stages)


def _channel_scale(scale: np.ndarray, out_ch: int) -> np.ndarray:
    """Scale as float64 [O]; rejects wrong sizes and non-positive or non-finite values."""
    scale64 = np.asarray(scale, dtype=np.float64).reshape(-1)
    if scale64.size == 1:
        scale64 = np.full(out_ch, scale64[0])
    if scale64.size != out_ch:
        raise ValueError(f"scale must have size 1 or {out_ch} (output channels), got {scale64.size}")
    if not (np.all(np.isfinite(scale64)) and np.all(scale64 > 0)):
        raise ValueError("scale must be finite and positive")
    return scale64


def _grid_range(rows: np.ndarray, scale64: np.ndarray) -> tuple[float, float]:
    """min and max of w / scale over the tensor (division is monotone, so per-channel extrema do)."""
    flat = rows.reshape(rows.shape[0], -1)
    x_lo = (flat.min(axis=1).astype(np.float64) / scale64).min()
    x_hi = (flat.max(axis=1).astype(np.float64) / scale64).max()
    if not (np.isfinite(x_lo) and np.isfinite(x_hi)):
        raise ValueError("w_fp / scale must be finite")
    return float(x_lo), float(x_hi)


def _grid_dtype(qmin: int, qmax: int) -> np.dtype:
    """The narrowest signed integer type holding [qmin - 1, qmax + 1]."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min < qmin and qmax < info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _kernel_stage(resid: np.ndarray, q: np.ndarray, outside: np.ndarray | None) -> _KernelFlips:
    """K stage on the block layout [O, taps, I]; updates `q` and turns `resid` into priorities.

    The priority of an element is e * sign(E): positive for candidates, equal to |e|, so the
    largest priorities flip first. Non-candidates (wrong sign, zero, or clipped) are <= 0.
    """
    err_sum = -resid.sum(axis=1)
    sign = np.sign(err_sum)
    want = np.rint(np.abs(err_sum)).astype(np.intp)
    prio = resid
    prio *= -sign[:, None, :]
    if outside is not None:
        prio[outside] = -1.0
    top = prio.max(axis=1)

    # threshold = the want-th largest priority; +inf flips nothing
    thresh = np.where(want == 1, top, np.inf)
    many = np.nonzero(want >= 2)
    if many[0].size:
        thresh[many] = _kth_largest(prio[many[0], :, many[1]], want[many])
    thresh = np.where(thresh > 0, thresh, _TINY)
    flip = prio >= thresh[:, None, :]
    count_dtype = np.uint8 if prio.shape[1] < 256 else np.intp
    flipped = np.add.reduce(flip.view(np.uint8), axis=1, dtype=count_dtype).astype(np.intp)
    tied = np.nonzero(flipped > want)
    if tied[0].size:
        flip[tied[0], :, tied[1]] = _rank_mask(prio[tied[0], :, tied[1]], want[tied])
        flipped[tied] = want[tied]
    np.subtract(q, sign.astype(q.dtype)[:, None, :], out=q, where=flip)
    return _KernelFlips(err_sum=err_sum, sign=sign, flipped=flipped, last=thresh, top=top)


def _channel_stage_after_kernels(prio: np.ndarray, q: np.ndarray, flips: _KernelFlips) -> None:
    """C stage after the K stage: one offer per kernel, round(|E_c|) offers taken per channel."""
    taps = prio.shape[1]
    kernel_err = flips.err_sum - flips.sign * flips.flipped
    side = np.sign(kernel_err)
    over = (side != 0) & (side == -flips.sign)  # flipped past zero: offer the last flip back
    under = (side != 0) & (side == flips.sign)  # not there yet: offer the next candidate
    channel_err = kernel_err.sum(axis=1)
    direction = np.sign(channel_err)
    want = np.rint(np.abs(channel_err)).astype(np.intp)
    offering = side == direction[:, None]

    # |e| of each offer: 1 - p for a flip back (>= 1/2), p for a next candidate (<= 1/2)
    keys = np.full(kernel_err.shape, -1.0)
    keys = np.where(offering & over, 1.0 - flips.last, keys)
    first = offering & under & (flips.flipped == 0)
    keys = np.where(first & (flips.top > 0), flips.top, keys)
    # next candidates after a flip need a sort of their kernel; they only matter where the
    # channel's want-th best known offer is not above 1/2
    unknown = offering & under & (flips.flipped > 0)
    if unknown.any():
        active = np.flatnonzero(want > 0)
        undecided = np.zeros(want.shape, bool)
        if active.size:
            kth = _kth_largest(keys[active], want[active])
            undecided[active] = kth <= 0.5
        fill = np.nonzero(unknown & undecided[:, None])
        if fill[0].size:
            rank = flips.flipped[fill] + 1
            nxt = _kth_largest(prio[fill[0], :, fill[1]], rank)
            keys[fill] = np.where((rank <= taps) & (nxt > 0), nxt, -1.0)

    chosen = np.nonzero(_select_topk(keys, want))
    if not chosen[0].size:
        return
    order = np.argsort(-prio[chosen[0], :, chosen[1]], axis=1, kind="stable")
    rank = np.where(over[chosen], flips.flipped[chosen] - 1, flips.flipped[chosen])
    pos = order[np.arange(rank.size), rank]
    q[chosen[0], pos, chosen[1]] -= direction[chosen[0]].astype(q.dtype)


def _channel_stage_flat(resid: np.ndarray, q: np.ndarray, outside: np.ndarray | None) -> None:
    """C stage without the K stage: every element of a channel is a candidate, in [I, *spatial] order."""
    out_ch, taps, in_ch = resid.shape
    if taps == 1:
        neg_err = resid[:, 0, :]
        out_rows = None if outside is None else outside[:, 0, :]
    else:
        neg_err = resid.transpose(0, 2, 1).reshape(out_ch, in_ch * taps)
        out_rows = None if outside is None else outside.transpose(0, 2, 1).reshape(out_ch, -1)
    channel_err = -neg_err.sum(axis=1)
    direction = np.sign(channel_err)
    want = np.rint(np.abs(channel_err)).astype(np.intp)
    prio = neg_err * -direction[:, None]
    if out_rows is not None:
        prio[out_rows] = -1.0
    chosen = _select_topk(prio, want)
    if taps > 1:
        chosen = chosen.reshape(out_ch, in_ch, taps).transpose(0, 2, 1)
    else:
        chosen = chosen[:, None, :]
    np.subtract(q, direction.astype(q.dtype)[:, None, None], out=q, where=chosen)


def _kth_largest(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k-th largest value of each row of `rows` [m, L], k >= 1 (clamped to L)."""
    length = rows.shape[1]
    k = np.minimum(k, length)
    kmax = int(k.max())
    index = np.arange(rows.shape[0])
    if kmax < length * _PARTITION_FRACTION:
        top = np.partition(rows, length - kmax, axis=1)[:, length - kmax:]
        top.sort(axis=1)
        return top[index, kmax - k]
    return np.sort(rows, axis=1)[index, length - k]


def _rank_mask(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exact top-k mask of each row: larger values first, ties to the lower index, values > 0 only."""
    order = np.argsort(-rows, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(rows.shape[1]), order.shape), axis=1)
    return (rank < k[:, None]) & (rows > 0)


def _select_topk(keys: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Top-k mask of each row of `keys` [m, L] (see `_rank_mask`), by threshold plus tie repair."""
    mask = np.zeros(keys.shape, bool)
    active = np.flatnonzero(k > 0)
    if not active.size:
        return mask
    sub = keys[active]
    thresh = np.maximum(_kth_largest(sub, k[active]), _TINY)
    sub_mask = sub >= thresh[:, None]
    tied = sub_mask.sum(axis=1) > k[active]
    if tied.any():
        sub_mask[tied] = _rank_mask(sub[tied], k[active][tied])
    mask[active] = sub_mask
    return mask
