"""Cost proportional to the model: statistics streamed in batches (equal to the one-shot figures), DF-MPC's
working arrays bounded by a small multiple of the layer, and the prior's images made chunk by chunk."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from onnxdfq.graph import layers as graph_layers
from onnxdfq.graph import surgery
from onnxdfq.graph.io import prepare_model
from onnxdfq.passes.dfmpc_math import LOW_BLOCK_ELEMENTS, _running_channel_sum, quantize_low, ternarize_corr
from tests.models import demo_model


def _peak_bytes(func, *args, **kwargs) -> int:
    tracemalloc.start()
    try:
        func(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_moments_in_batches_equal_the_one_shot_statistics():
    """Per-channel mean/std reduced inside onnxruntime, batch by batch, equal numpy's on the fetched tensors."""
    from onnxdfq.eval.calibrate import collect_moments, collect_statistics

    model = prepare_model(demo_model())
    graph = surgery.import_graph(model)
    tensors = [layer.output_name for layer in graph_layers.read_layers(graph)]
    samples = np.random.default_rng(0).standard_normal((13, 3, 32, 32)).astype(np.float32)
    full = collect_statistics(surgery.model_with_outputs(graph, tensors, model), tensors, samples, histogram=False,
                              channels=frozenset(tensors), batch_size=13)
    reduced = surgery.model_with_moments(graph, tensors, model)
    for batch in (1, 4, 13):
        streamed = collect_moments(reduced, tensors, samples, batch_size=batch)
        for name in tensors:
            np.testing.assert_allclose(streamed[name].channel_mean, full[name].channel_mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(streamed[name].channel_std, full[name].channel_std, rtol=1e-4, atol=1e-6)
            assert streamed[name].sample_mean.shape == (13, full[name].channel_mean.size)


def test_ensemble_statistics_take_the_larger_std_per_channel():
    from onnxdfq.passes.channel_stats import ensemble_statistics

    rng = np.random.default_rng(1)
    a = rng.normal(1.0, [0.5, 2.0], (4000, 2))  # generator 0: channel 1 wide
    b = rng.normal(-1.0, [3.0, 0.1], (4000, 2))  # generator 1: channel 0 wide
    values = np.concatenate([a, b])
    groups = np.repeat([0, 1], 4000)
    mean, std = ensemble_statistics(values, values**2, groups)  # one position per sample
    np.testing.assert_allclose(mean, values.mean(axis=0))
    np.testing.assert_allclose(std, [b[:, 0].std(), a[:, 1].std()])


def test_running_channel_sum_equals_the_one_hot_reference():
    rng = np.random.default_rng(2)
    values = rng.choice([-1.0, 0.0, 1.0], (5, 36))
    channel = rng.integers(0, 4, (5, 36))
    onehot = values[:, :, None] * (channel[:, :, None] == np.arange(4))
    reference = np.take_along_axis(np.cumsum(onehot, axis=1), channel[:, :, None], axis=2)[:, :, 0] - values
    np.testing.assert_array_equal(_running_channel_sum(values, channel), reference)


@pytest.mark.parametrize("channels", [64, 128])
def test_dfmpc_working_arrays_grow_with_the_layer_not_its_square(channels):
    """A [C, C, 3, 3] layer: the ternary search and the 4-bit grid search stay within a fixed multiple of the
    layer's float64 size (the one-hot search needed C times the layer: 9.7 GB for a VGG-16's 512 x 512 x 3 x 3)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((channels, channels, 3, 3))
    in_var = rng.uniform(0.5, 2.0, channels)
    layer_bytes = w.astype(np.float64).nbytes
    assert _peak_bytes(ternarize_corr, w, in_var, 0.2) < 24 * layer_bytes
    # the grid search works in blocks: a few block-sized arrays (LOW_BLOCK_ELEMENTS float64) on top
    assert _peak_bytes(quantize_low, w, 4) < 24 * layer_bytes + 6 * LOW_BLOCK_ELEMENTS * 8


def test_prior_images_are_made_in_chunks():
    from onnxdfq.synth.prior import CHUNK, pink_noise

    count = 4 * CHUNK
    image_bytes = 3 * 96 * 96 * 4
    peak = _peak_bytes(pink_noise, count, 3, 96, 96)
    assert peak < count * image_bytes + 12 * CHUNK * image_bytes  # the output plus a few chunks' spectra
