"""SQuant: data-free rounding that flips the cheapest roundings (Guo et al., ICLR 2022, arXiv 2202.07471)."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["SQUANT_STAGES", "squant_round", "squant_quantize", "squant_mean_flips"]

logger = logging.getLogger(__name__)

# the stage combinations the paper ablates: nearest rounding (E) with kernel (K) and/or channel (C) flips
SQUANT_STAGES: tuple[tuple[str, ...], ...] = (("e",), ("e", "k"), ("e", "c"), ("e", "k", "c"))
# when a row's largest flip count is below this fraction of the row, partition instead of sorting it
_PARTITION_FRACTION = 0.25
# elements per block of output channels that all stages run on in turn (see _channel_blocks);
# output channels round independently, so a layer of several blocks spreads them over threads
_BLOCK_SIZE = 1 << 21
# rows up to this long are ranked by pairwise comparison; longer rows by a stable argsort
_RANK_TAPS = 16
# below this many rows, one argsort call is cheaper than the L comparisons
_RANK_MIN_COLUMNS = 512
# kernels up to this many taps are written out one tap at a time (numpy's transposing copy of
# short rows is slower)
_PER_TAP_COPY_MAX = 16
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


@dataclass(frozen=True)
class _KernelFlips:
    """What the K stage did, per kernel [O, I]."""

    err_sum: np.ndarray  # E = sum of rounding errors after nearest rounding
    sign: np.ndarray  # sign(E): +1 flips round-ups down, -1 flips round-downs up
    flipped: np.ndarray  # number of elements flipped (round(|E|) unless the grid ends stopped it)
    last: np.ndarray  # priority of the last element flipped (meaningful where flipped > 0)
    top: np.ndarray  # largest priority in the kernel (the first candidate)
    step: np.ndarray  # [taps, O, I] int8, the step each element took (nonzero where flipped)


def squant_round(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, *,
                 stages: Sequence[str] = ("e", "k", "c"), threads: int | None = None) -> np.ndarray:
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
    threads : int, optional
        Threads for layers of more than one block (about two million weights); default: the
        CPUs available, at most 8. The result does not depend on it.

    Returns
    -------
    ndarray, the narrowest signed integer type holding [qmin, qmax] (int8 for any grid of 8 bits
    or fewer), same shape as `w_fp`, values in [qmin, qmax].

    Notes
    -----
    With x = w / scale and the rounding error e = q - x, SQuant splits its
    approximation of the task loss Hessian into three diagonal sub-items acting on single
    elements, on kernels and on output channels. The data-free objective that results, CASE
    (Constrained Absolute Sum of Error), asks for small |sum e| over every kernel and every output
    channel while every element keeps |e| < 1. It is solved greedily, stage by stage:

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
      kernels) every element of the channel is a candidate (ties to the lower index in
      [I, *spatial] order), as in the reference code.

    The bounds hold for elements whose x lies in [qmin, qmax]; clipped elements cannot move
    outward, which can leave fewer candidates than flips wanted. Every q stays within one step of
    nearest rounding. One corner of the reference code is not copied: a kernel whose sum is
    exactly 0 after the K stage (E == 0, or |E| exactly an integer) still offers an element there
    (for E == 0 through ``order[topk - 1]`` with topk = 0); here it offers nothing, which keeps
    |E_kernel| < 1 strict.

    Precision: the arithmetic is that of the weight, against the scale rounded to it. For
    float32 weights x = w / float32(scale), the grid ONNX DequantizeLinear will use (its scale is
    float32); e = q - x is exact, a kernel's E is the running float32 sum over its taps, and the
    offer keys are float32 too. Only channel sums, over up to thousands of kernels, are float64.
    float64 weights are handled in float64 throughout.

    The work is vectorised over all kernels and channels, in blocks of whole output channels of
    about two million weights (so that the dozen passes over a block stay in the CPU caches),
    each laid out [taps, O, I] so that per-kernel sums and maxima are vector operations over all
    kernels: threshold masks, a running top two for the few kernels that want two flips, a
    partition per channel for the C stage, and an exact ranking of rows with tied priorities.
    Inputs are never modified.

    References
    ----------
    C. Guo et al., "SQuant: On-the-Fly Data-Free Quantization via Diagonal Hessian
    Approximation", ICLR 2022, arXiv:2202.07471; reference code github.com/clevercool/SQuant.

    Examples
    --------
    >>> w = np.array([[[0.4, 0.4, 0.4, -0.2]]])  # one kernel, x = w / 1
    >>> squant_round(w, np.ones(1), -1, 1, stages=("e",)).tolist()  # E = -1.0
    [[[0, 0, 0, 0]]]
    >>> squant_round(w, np.ones(1), -1, 1, stages=("e", "k")).tolist()  # flip one 0.4 up
    [[[1, 0, 0, 0]]]
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
        return np.zeros(weight.shape, _store_dtype(qmin, qmax))

    rows = weight.reshape(out_ch, in_ch, taps)
    with np.errstate(over="ignore", under="ignore"):
        scale_w = scale64.astype(weight.dtype)  # the scale in the weight's precision (see Notes)
    if not (np.all(np.isfinite(scale_w)) and np.all(scale_w > 0)):  # beyond float32: work in float64
        rows, scale_w = rows.astype(np.float64), scale64
    w_int = np.empty((out_ch, in_ch, taps), _store_dtype(qmin, qmax))
    blocks = _channel_blocks(out_ch, in_ch * taps)
    workers = min(_thread_count(threads), len(blocks))

    def round_blocks(part: Sequence[slice]) -> None:
        for block in part:
            _round_channels(rows[block], scale_w[block], qmin, qmax, stage_set, w_int[block])

    if workers == 1:
        round_blocks(blocks)
    else:
        bounds = [len(blocks) * k // workers for k in range(workers + 1)]
        futures = [_pool().submit(round_blocks, blocks[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        for future in futures:
            future.result()
    return w_int.reshape(weight.shape)


def _round_channels(rows: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, stage_set: frozenset[str],
                    out: np.ndarray) -> None:
    """All stages for the output channels in `rows` [O', I, taps] (scale in their dtype), into `out`."""
    q = _round_blocks(rows, scale, qmin, qmax, stage_set, mask_outside=False)
    if q is None:
        logger.debug("squant: a flip left [%d, %d]; rerunning with clipped elements masked", qmin, qmax)
        q = _round_blocks(rows, scale, qmin, qmax, stage_set, mask_outside=True)
    taps = q.shape[0]
    if taps <= _PER_TAP_COPY_MAX:
        for tap in range(taps):
            out[:, :, tap] = q[tap]
    else:
        np.copyto(out, q.transpose(1, 2, 0), casting="unsafe")


class _Scratch(threading.local):
    """Per-thread working arrays, reused from block to block.

    Allocating the block-sized arrays afresh for every block let glibc map, fault in and trim
    the pages again each time, which doubled the run time; reused, they also stay in cache.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        size = math.prod(shape)
        buf = self.arrays.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(size, dtype)
            if size <= 4 * _BLOCK_SIZE:  # a huge single channel is not kept alive
                self.arrays[name] = buf
        return buf[:size].reshape(shape)


_SCRATCH = _Scratch()


def _channel_blocks(out_ch: int, channel_size: int) -> list[slice]:
    """Runs of whole output channels of about `_BLOCK_SIZE` elements each.

    Every stage is a handful of passes over the block; blocks this small keep those passes in
    the CPU caches instead of streaming a whole layer through memory each time.
    """
    per_block = max(1, _BLOCK_SIZE // max(channel_size, 1))
    count = -(-out_ch // per_block)
    bounds = [out_ch * k // count for k in range(count + 1)]  # equal shares
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _thread_count(threads: int | None) -> int:
    if threads is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(available, 8)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="squant")
        return _POOL


def squant_quantize(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, *,
                    stages: Sequence[str] = ("e", "k", "c")) -> np.ndarray:
    """SQuant fake quantization: ``squant_round`` followed by dequantization.

    Takes the same arguments as `squant_round` and returns q * scale (scale broadcast along the
    output axis 0) in the dtype of `w_fp`, e.g. to replace a float weight in a model.
    """
    w_int = squant_round(w_fp, scale, qmin, qmax, stages=stages)
    weight = np.asarray(w_fp)
    scale64 = _channel_scale(scale, weight.shape[0])
    w_dq = w_int * scale64.reshape((-1,) + (1,) * (weight.ndim - 1))
    return w_dq.astype(weight.dtype)


def _round_blocks(rows: np.ndarray, scale: np.ndarray, qmin: int, qmax: int, stage_set: frozenset[str],
                  mask_outside: bool) -> np.ndarray | None:
    """All stages on the block layout [taps, O, I]: sums and maxima over a kernel's taps are
    vector operations over all O * I kernels at once, whatever the shape.

    Elements with x outside [qmin, qmax] cannot step outward. Masking them costs full passes, so
    the first try (`mask_outside` False) skips the mask and returns None if a flip left the grid;
    a masked element that is not flipped changes nothing, so an on-grid result is exact.
    """
    out_ch, in_ch, taps = rows.shape
    resid = _SCRATCH.take("resid", (taps, out_ch, in_ch), rows.dtype)
    np.copyto(resid, rows.transpose(2, 0, 1))
    resid /= scale[:, None]  # x = w / scale in the weight's precision
    x_lo, x_hi = float(resid.min()), float(resid.max())
    if not (math.isfinite(x_lo) and math.isfinite(x_hi)):
        raise ValueError("w_fp / scale must be finite")
    q = _SCRATCH.take("q", resid.shape, _grid_dtype(qmin, qmax))
    outside = (resid < qmin) | (resid > qmax) if mask_outside else None
    if x_lo <= qmin - 0.5 or x_hi >= qmax + 0.5:
        np.rint(np.clip(resid, qmin, qmax), out=q, casting="unsafe")
    else:
        np.rint(resid, out=q, casting="unsafe")
    resid -= q  # x - q = -e
    check = not mask_outside and (x_lo < qmin or x_hi > qmax)

    if "k" in stage_set and taps > 1:
        flips = _kernel_stage(resid, q, outside)  # resid now holds the flip priorities
        if check and not _on_grid(q, qmin, qmax):
            return None  # checked before C, which could flip such an element back
        if "c" in stage_set:
            _channel_stage_after_kernels(resid, q, flips)
    elif "c" in stage_set:
        _channel_stage_flat(resid, q, outside)
    if check and not _on_grid(q, qmin, qmax):
        return None
    return q


def _on_grid(q: np.ndarray, qmin: int, qmax: int) -> bool:
    return bool(q.min() >= qmin and q.max() <= qmax)


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


def _int_dtype(lo: int, hi: int) -> np.dtype:
    """The narrowest signed integer type holding [lo, hi]."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _store_dtype(qmin: int, qmax: int) -> np.dtype:
    """The result type: int8 for every grid of 8 bits or fewer."""
    return _int_dtype(qmin, qmax)


def _grid_dtype(qmin: int, qmax: int) -> np.dtype:
    """The working type: room for one step past either end before the on-grid check."""
    return _int_dtype(qmin - 1, qmax + 1)


def _kernel_stage(resid: np.ndarray, q: np.ndarray, outside: np.ndarray | None) -> _KernelFlips:
    """K stage on the block layout [taps, O, I]; updates `q` and turns `resid` into priorities.

    The priority of an element is e * sign(E): positive for candidates, equal to |e|, so the
    largest priorities flip first. Non-candidates (wrong sign or zero error, and clipped
    elements when `outside` is given) are <= 0. Most kernels want at most one flip, the largest
    priority; for the few that want two, a running top two gives the threshold (a sort for more).
    Ties at a threshold are ranked exactly.
    """
    taps = resid.shape[0]
    err_sum = np.add.reduce(resid, axis=0)
    np.negative(err_sum, out=err_sum)
    sign = np.sign(err_sum)
    want = _flip_count(err_sum, taps)
    prio = resid
    prio *= np.negative(sign)
    if outside is not None:
        prio[outside] = -1.0
    top = prio.max(axis=0)

    # flip every priority >= the want-th largest one: the top one for one flip, above it for none
    thresh = top + (want == 0)
    many = np.flatnonzero(want >= 2)
    if many.size:
        thresh.reshape(-1)[many] = _kth_largest(prio.reshape(-1)[_kernel_index(prio, many)], want.reshape(-1)[many])
    np.maximum(thresh, _tiny(prio.dtype), out=thresh)  # fewer candidates than wanted: flip them all
    flip = np.greater_equal(prio, thresh, out=_SCRATCH.take("flip", prio.shape, np.bool_))
    flipped = np.add.reduce(flip.view(np.uint8), axis=0, dtype=np.uint8 if taps < 256 else np.intp)
    tied = np.flatnonzero(flipped > want)  # ties at the threshold: rank them exactly
    if tied.size:
        index = _kernel_index(prio, tied)
        cols = prio.reshape(-1)[index]
        exact = (_ranks(cols) < want.reshape(-1)[tied]) & (cols > 0)
        flip.reshape(-1)[index] = exact
        flipped.reshape(-1)[tied] = exact.sum(axis=0)
        # the last flipped priority; 1.0 (above any |e| of an element in range) where none flipped
        thresh.reshape(-1)[tied] = np.where(exact, cols, 1.0).min(axis=0)
    step = flip.view(np.int8)
    step *= sign.astype(np.int8)
    q -= step
    return _KernelFlips(err_sum=err_sum, sign=sign, flipped=flipped, last=thresh, top=top, step=step)


def _kth_largest(cols: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k-th largest entry (repeats counted) of each column of `cols` [L, m], k >= 2; -inf past L."""
    length, count = cols.shape
    # the running top two of each column: a few vector max/min per tap instead of a sort per kernel
    first, second = cols[0].copy(), np.full(count, -np.inf, cols.dtype)
    lower = np.empty(count, cols.dtype)
    for row in cols[1:]:
        np.minimum(first, row, out=lower)
        np.maximum(second, lower, out=second)
        np.maximum(first, row, out=first)
    deeper = np.flatnonzero(k > 2)  # rare (|E| >= 2.5): sort those kernels
    if deeper.size:
        ranked = np.sort(cols[:, deeper].T, axis=1)  # ascending
        rank = k[deeper].astype(np.intp)
        second[deeper] = np.where(rank <= length, ranked[np.arange(deeper.size), np.maximum(length - rank, 0)],
                                  -np.inf)
    return second


def _channel_stage_after_kernels(prio: np.ndarray, q: np.ndarray, flips: _KernelFlips) -> None:
    """C stage after the K stage: one offer per kernel, round(|E_c|) offers taken per channel."""
    in_ch = prio.shape[2]
    kernel_err = flips.err_sum - flips.sign * flips.flipped  # exact: E minus a whole number
    channel_err = kernel_err.astype(np.float64).sum(axis=1)
    direction = np.sign(channel_err).astype(kernel_err.dtype)
    want = _flip_count(channel_err, in_ch).astype(np.intp)
    # a kernel offers when its error has the channel's sign: its last flip back when the K stage
    # took it past zero (`back`), else its next candidate. The key is the offer's |e|: 1 - p for
    # a flip back (>= 1/2), p <= 1/2 for a next candidate; keys <= 0 are never taken. A next
    # candidate after K flips needs a ranking of its kernel, so its key starts as the kernel's
    # top priority (an upper bound <= 1/2) and is only made exact where the channel's want-th
    # key is not above 1/2.
    back = flips.sign * kernel_err < 0
    # np.where(back, 1 - last, top) without its slow branching: x * True + y * False is exactly x
    keys = (1.0 - flips.last) * back
    keys += flips.top * ~back
    keys *= kernel_err * direction[:, None] > 0
    thresh, following = _top_two(keys, np.maximum(want, 1))
    undecided = np.flatnonzero((want > 0) & (thresh <= 0.5))
    if undecided.size:
        bounded = np.zeros(keys.shape, bool)
        bounded[undecided] = (keys[undecided] > 0) & ~back[undecided] & (flips.flipped[undecided] > 0)
        fill = np.flatnonzero(bounded)
        if fill.size:  # the exact next candidate: the largest priority the K stage left alone
            index = _kernel_index(prio, fill)
            keys.reshape(-1)[fill] = np.where(flips.step.reshape(-1)[index] != 0, -1.0,
                                              prio.reshape(-1)[index]).max(axis=0)
            redo = _top_two(keys[undecided], np.maximum(want[undecided], 1))
            thresh[undecided], following[undecided] = redo

    chosen = np.flatnonzero(_topk_from_threshold(keys, want, thresh, following))
    if not chosen.size:
        return
    index = _kernel_index(prio, chosen).T
    rows = prio.reshape(-1)[index]
    done = flips.step.reshape(-1)[index] != 0
    taps = rows.shape[1]
    # a flip back undoes the last flip: the smallest flipped priority, ties to the higher tap;
    # a next candidate is the largest priority not flipped, ties to the lower tap
    undo = taps - 1 - np.argmin(np.where(done, rows, np.inf)[:, ::-1], axis=1)
    nxt = np.argmax(np.where(done, -np.inf, rows), axis=1)
    pos = np.where(back.reshape(-1)[chosen], undo, nxt)
    q.reshape(-1)[index[np.arange(chosen.size), pos]] -= direction[chosen // in_ch].astype(q.dtype)


def _tiny(dtype: np.dtype) -> float:
    """The smallest positive value of `dtype`: `priority >= _tiny` means `priority > 0`."""
    return float(np.finfo(dtype).smallest_subnormal)


def _flip_count(err_sum: np.ndarray, limit: int) -> np.ndarray:
    """round(|E|) as whole floats, capped at the row length (more flips than elements cannot happen)."""
    want = np.abs(err_sum)
    np.rint(want, out=want)
    return np.minimum(want, limit, out=want)


def _kernel_index(blocks: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Flat indices [taps, m] into the block layout [taps, O, I] of flat kernel numbers o * I + i."""
    taps, out_ch, in_ch = blocks.shape
    return np.arange(0, taps * out_ch * in_ch, out_ch * in_ch)[:, None] + kernels


def _channel_stage_flat(resid: np.ndarray, q: np.ndarray, outside: np.ndarray | None) -> None:
    """C stage without the K stage: every element of a channel is a candidate, in [I, *spatial] order."""
    taps, out_ch, in_ch = resid.shape
    if taps == 1:
        neg_err = resid[0]
        out_rows = None if outside is None else outside[0]
    else:
        neg_err = resid.transpose(1, 2, 0).reshape(out_ch, in_ch * taps)
        out_rows = None if outside is None else outside.transpose(1, 2, 0).reshape(out_ch, -1)
    channel_err = -neg_err.astype(np.float64).sum(axis=1)
    direction = np.sign(channel_err)
    want = _flip_count(channel_err, neg_err.shape[1]).astype(np.intp)
    prio = neg_err  # a view of the scratch residuals (or a copy), free to overwrite
    prio *= np.negative(direction, dtype=prio.dtype)[:, None]
    if out_rows is not None:
        prio[out_rows] = -1.0
    step = _select_topk(prio, want).view(np.int8)
    step *= direction.astype(np.int8)[:, None]
    if taps > 1:
        q -= step.reshape(out_ch, in_ch, taps).transpose(2, 0, 1)
    else:
        q -= step[None]


def _top_two(rows: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The k-th and (k+1)-th largest values of each row of `rows` [m, L] (k >= 1, clamped to L).

    Only the top max(k) + 1 of a row are sorted (after a partition) when that is a small part of
    it. The (k+1)-th is -inf where k == L.
    """
    length = rows.shape[1]
    k = np.minimum(k, length)
    span = int(k.max()) + 1
    if span < length * _PARTITION_FRACTION:
        top = np.partition(rows, length - span, axis=1)[:, length - span:]
        top.sort(axis=1)
    else:
        top = np.sort(rows, axis=1)
    index = np.arange(rows.shape[0])
    width = top.shape[1]
    kth = top[index, width - k]
    following = np.where(k < width, top[index, np.maximum(width - k - 1, 0)], -np.inf)
    return kth, following


def _rank_mask(rows: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Exact top-k mask of each row: larger values first, ties to the lower index, values > 0 only."""
    return (_ranks(rows.T).T < k[:, None]) & (rows > 0)


def _ranks(cols: np.ndarray) -> np.ndarray:
    """Each entry's 0-based place in its column of `cols` [L, m] sorted largest first, ties to the lower index.

    Many short columns are ranked by counting, for each entry, the entries larger than it: L
    vector comparisons over all columns at once. Only columns with equal entries (their counts
    do not add up to L(L-1)/2) are recounted with the ties. Long or few columns are sorted.
    """
    length, count = cols.shape
    if length > _RANK_TAPS or count < _RANK_MIN_COLUMNS:
        order = np.argsort(-cols.T, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(length), order.shape), axis=1)
        return rank.T
    rank = np.zeros(cols.shape, np.uint8)
    larger = np.empty(cols.shape, np.bool_)
    for i in range(length):
        np.greater(cols[i], cols, out=larger)
        rank += larger.view(np.uint8)
    tied = np.flatnonzero(np.add.reduce(rank, axis=0, dtype=np.intp) != length * (length - 1) // 2)
    if tied.size:
        sub = cols[:, tied]
        ahead = sub[:, None, :] > sub[None, :, :]  # [i, j]: entry i is ahead of entry j
        ahead |= (sub[:, None, :] == sub[None, :, :]) & np.triu(np.ones((length, length), bool), 1)[:, :, None]
        rank[:, tied] = np.add.reduce(ahead, axis=0, dtype=np.uint8)
    return rank


def _select_topk(keys: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Top-k mask of each row of `keys` [m, L] (see `_rank_mask`)."""
    return _topk_from_threshold(keys, k, *_top_two(keys, np.maximum(k, 1)))


def _topk_from_threshold(keys: np.ndarray, k: np.ndarray, kth: np.ndarray,
                         following: np.ndarray) -> np.ndarray:
    """`_select_topk` given each row's k-th and (k+1)-th largest keys.

    The mask is keys >= the k-th largest (or > 0 where fewer than k keys are positive); a row
    whose (k+1)-th key passes too has ties at the threshold and is ranked exactly.
    """
    thresh = np.where(k > 0, np.maximum(kth, _tiny(keys.dtype)), np.inf)
    mask = keys >= thresh[:, None]
    tied = np.flatnonzero(following >= thresh)
    if tied.size:
        mask[tied] = _rank_mask(keys[tied], k[tied])
    return mask


def squant_mean_flips(w_fp: np.ndarray, scale: np.ndarray, w_int: np.ndarray, mean: np.ndarray,
                      qmin: int, qmax: int) -> np.ndarray:
    """Flip roundings so that each output channel's error, weighted by its inputs' means, is near zero.

    SQuant's C stage balances the plain sum of a channel's rounding errors, which is what the output's mean
    shift is when every input channel has the same mean. With per-input-channel means ``m`` the shift is
    ``E_o = sum_i m_i sum_taps e[o, i, taps]`` (``e = q - w / scale``). Bias correction cancels it exactly
    when ``m`` is right; where ``m`` is only an estimate it leaves ``sum e (m_true - m)``, and on the BN-folded
    EfficientNet-Lite0 the prior's error on the linear-bottleneck streams points back along ``m`` itself
    (cosine -0.6 to -0.96 against 64 real images), so a small ``E_o`` keeps the residual small too.

    Per output channel: the candidates are the elements whose one-step move toward x's other grid neighbour
    reduces ``|E_o|`` (error of the sign that moves ``E_o`` toward zero, inside [qmin, qmax]), ranked by the
    squared error each adds per unit of ``|m_i|`` (``(1 + 2 d e) / |m_i|``: an element SQuant already moved past
    one half flips back for free); the prefix of that order whose summed ``|m_i|`` comes closest to ``|E_o|``
    moves. ``|E_o|`` never grows, every q stays within one step of nearest rounding (``|q - x| < 1``), and
    while candidates last ``|E_o|`` ends within half the largest candidate's ``|m_i|``.

    ``mean`` can be any per-input-channel direction the means are uncertain along: on ReLU outputs the
    weight-quant pass gives how each mean moves when the prior excites its layer more or less than real images
    do (see ``WeightQuantPass._uncertain_means``).

    ``w_fp`` [O, I, *k] (groups of one; a depthwise kernel's taps share one mean, which SQuant's K stage
    already balances), ``scale`` [O] or size 1, ``w_int`` the rounding to start from, ``mean`` [I]. Returns
    the new integers in ``w_int``'s dtype and shape.
    """
    weight = np.asarray(w_fp, np.float64)
    out_ch = weight.shape[0]
    rows = weight.reshape(out_ch, -1)
    q = np.asarray(w_int).reshape(out_ch, -1).astype(np.int64)
    taps = rows.shape[1] // max(weight.shape[1], 1)
    m = np.repeat(np.asarray(mean, np.float64).reshape(-1), taps)  # [I * taps], the [I, *k] order of a row
    if m.size != rows.shape[1]:
        raise ValueError(f"mean has {np.size(mean)} channels, the weight {weight.shape[1]}")
    x = rows / _channel_scale(scale, out_ch)[:, None]
    err = q - x
    shift = err @ m
    step = -np.sign(shift)[:, None] * np.sign(m)[None, :]  # the move that takes E_o toward zero
    movable = (step != 0) & (step * err < 0) & (q + step >= qmin) & (q + step <= qmax)
    weight_m = np.where(movable, np.abs(m)[None, :], 0.0)
    key = np.where(movable, (1.0 + 2.0 * step * err) / np.maximum(weight_m, np.finfo(np.float64).tiny), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    gained = np.cumsum(np.take_along_axis(weight_m, order, axis=1), axis=1)
    gained = np.concatenate([np.zeros((out_ch, 1)), gained], axis=1)
    count = np.argmin(np.abs(np.abs(shift)[:, None] - gained), axis=1)  # first minimum: fewest flips
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[1]), order.shape), axis=1)
    moved = (rank < count[:, None]) & movable
    q += np.where(moved, step, 0).astype(np.int64)
    return q.reshape(np.shape(w_int)).astype(np.asarray(w_int).dtype)
