"""SQuant rounding: the vectorised core against a plain-loop reference, its CASE bounds, real weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxdfq.passes.squant import SQUANT_STAGES, squant_quantize, squant_round
from onnxdfq.quant.scheme import QuantScheme


def _in_working_precision(w_fp: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weight and its [O] scale in the precision SQuant computes in: the weight's own, unless
    the scale does not fit it (then float64)."""
    w = np.asarray(w_fp)
    scale64 = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (w.shape[0],))
    with np.errstate(over="ignore", under="ignore"):
        scale_w = scale64.astype(w.dtype)
    if np.all(np.isfinite(scale_w)) and np.all(scale_w > 0):
        return w, scale_w
    return w.astype(np.float64), scale64


def _reference_squant(w_fp: np.ndarray, scale: np.ndarray, qmin: int, qmax: int,
                      stages: tuple[str, ...] = ("e", "k", "c")) -> np.ndarray:
    """Plain loops over kernels and channels, written from the algorithm's description.

    Arithmetic as documented: in the weight's precision against the scale rounded to it (kernel
    sums accumulate tap by tap, offer keys are 1 - p), channel sums in float64.
    """
    w, scale_w = _in_working_precision(w_fp, scale)
    work = w.dtype.type
    out_ch, in_ch = w.shape[:2]
    taps = math.prod(w.shape[2:])
    x = w.reshape(out_ch, in_ch, taps) / scale_w[:, None, None]
    q = np.clip(np.rint(x), qmin, qmax)
    err = q - x
    w_int = q.astype(np.int64)

    def candidates(errors, values, sign):
        """Indices whose error has the sign of the sum and that can step toward it, best first."""
        prio = [float(v) * sign for v in errors]
        cand = [j for j in range(len(prio)) if prio[j] > 0 and qmin <= values[j] - sign <= qmax]
        return sorted(cand, key=lambda j: (-prio[j], j)), prio

    run_k = "k" in stages and taps > 1
    kernel_err = np.zeros((out_ch, in_ch), work)
    kernel_log = {}
    if run_k:
        for o in range(out_ch):
            for i in range(in_ch):
                total = work(0)
                for v in err[o, i]:
                    total = work(total + v)
                sign = float(np.sign(total))
                want = int(np.rint(abs(float(total))))
                order, prio = candidates(err[o, i], q[o, i], sign)
                done = order[:want]
                for j in done:
                    w_int[o, i, j] -= int(sign)
                kernel_err[o, i] = total - work(sign * len(done))
                kernel_log[o, i] = (sign, order, done, prio)

    if "c" in stages:
        for o in range(out_ch):
            if run_k:
                channel = float(np.sum(kernel_err[o].astype(np.float64)))
                direction = float(np.sign(channel))
                want = int(np.rint(abs(channel)))
                offers = []
                for i in range(in_ch):
                    sign, order, done, prio = kernel_log[o, i]
                    side = float(np.sign(kernel_err[o, i]))
                    if side == 0 or side != direction:
                        continue
                    if side == -sign:  # flipped past zero: the last flip goes back
                        offers.append((-float(work(1) - work(prio[done[-1]])), i, done[-1]))
                    elif len(order) > len(done):  # not there yet: the next candidate
                        j = order[len(done)]
                        offers.append((-prio[j], i, j))
                for _, i, j in sorted(offers)[:want]:
                    w_int[o, i, j] -= int(direction)
            else:
                flat_err = err[o].reshape(-1)
                flat_q = q[o].reshape(-1)
                channel = float(np.sum(flat_err.astype(np.float64)))
                direction = float(np.sign(channel))
                want = int(np.rint(abs(channel)))
                order, _ = candidates(flat_err, flat_q, direction)
                flat_int = w_int[o].reshape(-1)
                for j in order[:want]:
                    flat_int[j] -= int(direction)
                w_int[o] = flat_int.reshape(in_ch, taps)
    return w_int.reshape(w.shape)


def _absmax_scale(w: np.ndarray, qmax: int) -> np.ndarray:
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    return np.where(absmax > 0, absmax, 1.0) / qmax


def _grid(bits: int) -> tuple[int, int]:
    scheme = QuantScheme(bits)
    return scheme.qmin, scheme.qmax


def _errors(w: np.ndarray, scale: np.ndarray, w_int: np.ndarray) -> np.ndarray:
    """Rounding errors q - x in grid units, shaped [O, I, taps], in float64.

    x is w / scale as SQuant sees it: in the weight's precision, against the scale rounded to it.
    """
    w_work, scale_w = _in_working_precision(w, scale)
    x = w_work / scale_w.reshape((-1,) + (1,) * (w.ndim - 1))
    return (w_int - x.astype(np.float64)).reshape(w.shape[0], w.shape[1], -1)


def _eps(w: np.ndarray) -> float:
    """Slack for sums of errors: float32 kernel sums round at ~1e-7 per tap, channel sums add those up."""
    return 1e-4 if w.dtype == np.float32 else 1e-9


SHAPES = {
    "conv3x3": (6, 5, 3, 3),
    "conv1x1": (7, 9, 1, 1),
    "conv1d": (5, 4, 5),
    "depthwise": (8, 1, 3, 3),
    "gemm": (6, 12),
    "single_kernel": (1, 1, 3, 3),
    "conv5x5": (4, 3, 5, 5),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference(shape, bits, dtype):
    qmin, qmax = _grid(bits)
    rng = np.random.default_rng(hash((shape, bits)) % 2**32)
    for trial in range(3):
        w = rng.standard_normal(shape).astype(dtype)
        scale = _absmax_scale(w, qmax) if trial < 2 else np.array([np.abs(w).max() / qmax])
        for stages in SQUANT_STAGES:
            fast = squant_round(w, scale, qmin, qmax, stages=stages)
            ref = _reference_squant(w, scale, qmin, qmax, stages)
            assert fast.dtype == (np.int8 if bits <= 8 else np.int16) and fast.shape == w.shape
            np.testing.assert_array_equal(fast, ref, err_msg=f"stages={stages} trial={trial}")


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_matches_reference_with_ties_and_clipping(shape):
    """Values on a quarter grid (exact ties of |e|, zero errors) and a scale that clips some of them."""
    rng = np.random.default_rng(7)
    qmin, qmax = _grid(3)
    for trial in range(4):
        w = (rng.integers(-12, 13, size=shape) / 4.0).astype(np.float32)
        scale = np.full(shape[0], 0.5 if trial % 2 else 1.0)  # 1.0: |x| <= 3; 0.5: clipped past 3
        for stages in SQUANT_STAGES:
            fast = squant_round(w, scale, qmin, qmax, stages=stages)
            ref = _reference_squant(w, scale, qmin, qmax, stages)
            np.testing.assert_array_equal(fast, ref, err_msg=f"stages={stages} trial={trial}")


@pytest.mark.parametrize(("qmin", "qmax"), [(0, 15), (-2047, 2047), (-8, 7)])
def test_matches_reference_on_other_grids(qmin, qmax):
    """Unsigned, wide (int16 working type) and asymmetric grids, with some values clipped."""
    rng = np.random.default_rng(qmax)
    for shape in ((5, 4, 3, 3), (6, 10)):
        scale = np.full(shape[0], 4.0 / (qmax - qmin))  # half the grid is 2 sigma of x: ~5% clipped
        w = rng.standard_normal(shape) + (qmin + qmax) / 2 * scale[0]
        for stages in SQUANT_STAGES:
            np.testing.assert_array_equal(squant_round(w, scale, qmin, qmax, stages=stages),
                                          _reference_squant(w, scale, qmin, qmax, stages))


def test_reference_is_not_nearest():
    """Guards the comparison above against both sides silently degrading to nearest rounding."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 8, 3, 3))
    scale = _absmax_scale(w, 3)
    nearest = squant_round(w, scale, -3, 3, stages=("e",))
    assert np.count_nonzero(_reference_squant(w, scale, -3, 3) != nearest) > 20
    assert np.count_nonzero(squant_round(w, scale, -3, 3) != nearest) > 20


def _check_case_bounds(w, scale, qmin, qmax):
    nearest = squant_round(w, scale, qmin, qmax, stages=("e",))
    after_k = squant_round(w, scale, qmin, qmax, stages=("e", "k"))
    after_c = squant_round(w, scale, qmin, qmax)
    for w_int in (after_k, after_c):
        assert w_int.dtype == np.int8 and w_int.shape == w.shape
        assert w_int.min() >= qmin and w_int.max() <= qmax
        assert np.abs(w_int - nearest).max() <= 1
    x = np.asarray(w, np.float64) / scale.reshape((-1,) + (1,) * (w.ndim - 1))
    inside = ((x >= qmin) & (x <= qmax)).reshape(w.shape[0], w.shape[1], -1)
    taps = inside.shape[2]

    eps = _eps(np.asarray(w))
    err_k = _errors(w, scale, after_k)
    if taps > 1:
        ok = inside.all(axis=2)
        assert np.all(np.abs(err_k.sum(axis=2))[ok] <= 0.5 + eps)

    err_c = _errors(w, scale, after_c)
    kernel_ok = inside.all(axis=2)
    channel_ok = kernel_ok.all(axis=1)
    # mathematically < 1; a flip of an error of 1e-26 reads as exactly 1.0 in float64
    assert np.all(np.abs(err_c)[inside] < 1.0 + eps)
    assert np.all(np.abs(err_c.sum(axis=2))[kernel_ok] < 1.0 + eps)
    # an element already on the grid is never a candidate
    exact = inside & (_errors(w, scale, nearest) == 0)
    assert np.array_equal(after_c.reshape(exact.shape)[exact], nearest.reshape(exact.shape)[exact])
    assert np.all(np.abs(err_c.sum(axis=(1, 2)))[channel_ok] <= 0.5 + eps)
    return err_c


weights = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.sampled_from([(3, 4, 3, 3), (2, 1, 3, 3), (4, 6), (3, 2, 5), (2, 3, 1, 1), (1, 1, 2, 2)]),
    elements=st.floats(-4, 4, width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(w=weights, bits=st.integers(2, 8), per_tensor=st.booleans())
def test_case_bounds(w, bits, per_tensor):
    qmin, qmax = _grid(bits)
    scale = np.array([max(np.abs(w).max(), 1e-3) / qmax]) if per_tensor else _absmax_scale(w, qmax)
    scale = np.broadcast_to(scale, (w.shape[0],)).copy()
    _check_case_bounds(w, scale, qmin, qmax)


@settings(max_examples=40, deadline=None)
@given(w=weights, bits=st.integers(2, 5), shrink=st.floats(0.3, 1.0))
def test_clipped_inputs_stay_on_grid(w, bits, shrink):
    """A scale below absmax / qmax clips: values stay in range and within a step of nearest."""
    qmin, qmax = _grid(bits)
    scale = _absmax_scale(w, qmax) * shrink
    _check_case_bounds(w, scale, qmin, qmax)


@settings(max_examples=30, deadline=None)
@given(w=weights, bits=st.integers(2, 8))
def test_deterministic_and_pure(w, bits):
    qmin, qmax = _grid(bits)
    scale = _absmax_scale(w, qmax)
    w_before, scale_before = w.copy(), scale.copy()
    first = squant_round(w, scale, qmin, qmax)
    np.testing.assert_array_equal(w, w_before)
    np.testing.assert_array_equal(scale, scale_before)
    np.testing.assert_array_equal(first, squant_round(w, scale, qmin, qmax))


def test_far_outliers_are_clipped():
    """Errors far beyond the grid (round(|E|) past any integer type) flip what can flip."""
    w = np.zeros((2, 3, 3, 3))
    w[0, 0, 0, 0], w[1, 2, 1, 1] = 1e19, -3e19
    w[:, :, 2, 2] = 0.3
    for stages in SQUANT_STAGES:
        w_int = squant_round(w, np.ones(2), -7, 7, stages=stages)
        np.testing.assert_array_equal(w_int, _reference_squant(w, np.ones(2), -7, 7, stages))
        assert w_int[0, 0, 0, 0] == 7 and w_int[1, 2, 1, 1] == -7


def test_kernel_and_channel_sums_shrink():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    qmin, qmax = _grid(4)
    scale = _absmax_scale(w, qmax)
    nearest = _errors(w, scale, squant_round(w, scale, qmin, qmax, stages=("e",)))
    after_k = _errors(w, scale, squant_round(w, scale, qmin, qmax, stages=("e", "k")))
    after_c = _errors(w, scale, squant_round(w, scale, qmin, qmax))
    assert np.abs(nearest.sum(axis=2)).max() > 0.5  # K has work to do
    assert np.abs(after_k.sum(axis=2)).max() <= 0.5 + _eps(w)
    assert np.abs(after_c.sum(axis=(1, 2))).max() <= 0.5 + _eps(w)
    assert np.abs(after_c.sum(axis=(1, 2))).mean() < 0.5 * np.abs(nearest.sum(axis=(1, 2))).mean()


def test_one_tap_kernels_skip_k_stage():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 40, 1, 1))
    scale = _absmax_scale(w, 7)
    np.testing.assert_array_equal(squant_round(w, scale, -7, 7, stages=("e", "k")),
                                  squant_round(w, scale, -7, 7, stages=("e",)))
    np.testing.assert_array_equal(squant_round(w, scale, -7, 7),
                                  squant_round(w, scale, -7, 7, stages=("e", "c")))


def test_quantize_is_round_times_scale():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    scale = _absmax_scale(w, 7)
    w_dq = squant_quantize(w, scale, -7, 7)
    assert w_dq.dtype == np.float32
    expected = squant_round(w, scale, -7, 7) * scale[:, None, None, None]
    np.testing.assert_allclose(w_dq, expected.astype(np.float32))


@pytest.mark.parametrize("stages", [("k",), ("e", "c", "k"), ("e", "e"), "ekc", ()])
def test_rejects_bad_stages(stages):
    with pytest.raises(ValueError, match="stages"):
        squant_round(np.ones((2, 2, 3, 3)), np.ones(2), -7, 7, stages=stages)


@pytest.mark.parametrize(("w", "scale", "qmin", "qmax"), [
    (np.ones(4), np.ones(4), -7, 7),  # no output/input axes
    (np.ones((2, 2), np.int32), np.ones(2), -7, 7),  # integer weights
    (np.ones((2, 2)), np.ones(3), -7, 7),  # scale size
    (np.ones((2, 2)), np.array([1.0, 0.0]), -7, 7),  # zero scale
    (np.array([[1.0, np.nan]]), np.ones(1), -7, 7),  # NaN weight
    (np.ones((2, 2)), np.ones(2), 3, 3),  # empty grid
])
def test_rejects_bad_inputs(w, scale, qmin, qmax):
    with pytest.raises(ValueError):
        squant_round(w, scale, qmin, qmax)


def _conv_weights(path: Path) -> list[tuple[str, np.ndarray]]:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return [(node.name, numpy_helper.to_array(inits[node.input[1]]))
            for node in model.graph.node if node.op_type == "Conv" and node.input[1] in inits]


def test_resnet20_weights_at_3_bits(resnet20):
    qmin, qmax = _grid(3)
    convs = _conv_weights(resnet20)
    assert len(convs) >= 19
    for name, w in convs:
        scale = _absmax_scale(w, qmax)
        err_c = _check_case_bounds(w, scale, qmin, qmax)
        nearest = _errors(w, scale, squant_round(w, scale, qmin, qmax, stages=("e",)))
        squant_ch = np.abs(err_c.sum(axis=(1, 2)))
        nearest_ch = np.abs(nearest.sum(axis=(1, 2)))
        assert squant_ch.max() <= 0.5 + _eps(w), name
        assert squant_ch.mean() < 0.25 * nearest_ch.mean(), name


@pytest.mark.parametrize("shape", [(256, 128, 3, 3), (1000, 512), (64, 1, 3, 3)])
def test_threads_do_not_change_the_result(monkeypatch, shape):
    """Layers of several blocks spread them across threads; the rounding must not notice."""
    import onnxdfq.passes.squant as squant_module

    monkeypatch.setattr(squant_module, "_BLOCK_SIZE", 1 << 12)  # many blocks even for small layers
    rng = np.random.default_rng(7)
    w = rng.standard_normal(shape).astype(np.float32)
    w[::5] *= 0.01  # channels of very different scale, and clipped outliers with a shared scale
    scheme = QuantScheme(3)
    for scale in (np.abs(w.reshape(shape[0], -1)).max(axis=1) / scheme.qmax, np.array([0.3])):
        serial = squant_round(w, scale, scheme.qmin, scheme.qmax, threads=1)
        for threads in (2, 3, 8):
            np.testing.assert_array_equal(squant_round(w, scale, scheme.qmin, scheme.qmax, threads=threads), serial)


def test_float32_weights_round_against_the_float32_scale():
    """The QDQ file stores the scale as float32, so float32 weights round x = w / float32(scale) in
    float32; near a half step that can differ from w / scale in float64."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 0.1, 200_000)
    w = ((rng.integers(-6, 6, scale.size) + 0.5) * scale).astype(np.float32)
    x32 = w / scale.astype(np.float32)
    differ = np.flatnonzero(np.rint(x32) != np.rint(w.astype(np.float64) / scale))[:16]
    assert differ.size >= 8  # half-step weights where the two precisions disagree
    got = squant_round(w[differ].reshape(-1, 1), scale[differ], -7, 7, stages=("e",))
    np.testing.assert_array_equal(got.ravel(), np.rint(x32[differ]))
    np.testing.assert_array_equal(_reference_squant(w[differ].reshape(-1, 1), scale[differ], -7, 7, ("e",)).ravel(),
                                  np.rint(x32[differ]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_flips_per_kernel_match_reference(dtype):
    """Errors of one sign (|E| up to 4.5 per 3x3 kernel, up to 12 per 5x5) exercise the k-th-largest search."""
    rng = np.random.default_rng(4)
    for shape in ((6, 5, 3, 3), (4, 3, 5, 5)):
        frac = rng.uniform(0.3, 0.5, shape) * rng.choice([-1.0, 1.0], size=(shape[0], shape[1], 1, 1))
        w = (rng.integers(-2, 3, shape) + frac).astype(dtype)
        scale = np.ones(shape[0])
        for stages in SQUANT_STAGES:
            np.testing.assert_array_equal(squant_round(w, scale, -7, 7, stages=stages),
                                          _reference_squant(w, scale, -7, 7, stages))


@pytest.mark.parametrize("block", [1, 40, 500])
def test_blocks_do_not_change_the_result(monkeypatch, block):
    """Layers are rounded in blocks of output channels (as small as one channel); blocks are independent."""
    import onnxdfq.passes.squant as squant_module

    rng = np.random.default_rng(9)
    w = rng.standard_normal((12, 7, 3, 3)).astype(np.float32)
    scale = _absmax_scale(w, 3)
    whole = squant_round(w, scale, -3, 3, threads=1)
    monkeypatch.setattr(squant_module, "_BLOCK_SIZE", block)
    np.testing.assert_array_equal(squant_round(w, scale, -3, 3, threads=1), whole)
    np.testing.assert_array_equal(whole, _reference_squant(w, scale, -3, 3))


def test_scale_beyond_float32_rounds_in_float64():
    """A scale float32 cannot hold (here it would underflow to 0) falls back to float64 arithmetic."""
    w = np.array([[1e-45, 0.0, 7e-46], [1.0, -0.5, 0.2]], np.float32)
    scale = np.array([float(w[0].max()) / 3, 1.0 / 3])
    np.testing.assert_array_equal(squant_round(w, scale, -3, 3), squant_round(w.astype(np.float64), scale, -3, 3))
