"""Class-conditional inversion (``synth:invert``): samples for a model whose BatchNormalization was folded away.

The generator is checked on a small random classifier (it drives the cross-entropy to its random targets, stays in
the input's box, repeats with a seed, refuses what it cannot do), and end to end on the shared ResNet-20 with BN
folded, where reconstruction on its samples must beat the procedural prior at W4A4 on the full CIFAR-10 test set.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from conftest import CIFAR_MEAN, CIFAR_STD  # noqa: E402
from test_prior import folded_copy  # noqa: E402

import onnxdfq  # noqa: E402
from models import ConvSpec, build_chain  # noqa: E402
from onnxdfq import synth  # noqa: E402
from onnxdfq.eval.runner import evaluate  # noqa: E402
from onnxdfq.preprocessing import pixel_box  # noqa: E402
from onnxdfq.synth.base import SynthInputError, SynthOptionError  # noqa: E402

pytestmark = pytest.mark.torch


def small_classifier():
    """Random conv features and a head with logits wide enough for the images to reach any class (the random head
    alone spans about one nat)."""
    model = build_chain([ConvSpec(8, 3, bn=False, act="relu"), ConvSpec(16, 3, bn=False, act="relu")], size=16,
                        seed=2)
    head = next(init for init in model.graph.initializer if init.name == "fc.weight")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * 20.0, head.name))
    return model


def feature_map_model():
    """One conv whose [N, 8, 16, 16] output is the graph's: no class scores to invert."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["features"], name="conv", pads=[1] * 4)],
                              "features", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 8, 16, 16])],
                              [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_inversion_drives_the_classifier_to_its_targets_inside_the_box():
    model = small_classifier()
    box = pixel_box(CIFAR_MEAN, CIFAR_STD)
    losses: list[float] = []
    x = synth.generate(model, "invert", 16, batch_size=8, steps=60, seed=1, input_bounds=box,
                       progress=lambda step, total, loss: losses.append(loss))
    assert x.shape == (16, 3, 16, 16) and x.dtype == np.float32
    assert len(losses) == 120
    # each batch starts from pink noise at chance level (log 10 = 2.3) and ends near its targets
    for first, last in ((losses[0], losses[59]), (losses[60], losses[119])):
        assert first > 1.0 and last < 0.25 * first, (first, last)
    lows, highs = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in box)
    assert np.all(x >= lows - 1e-5) and np.all(x <= highs + 1e-5)
    again = synth.generate(model, "invert", 16, batch_size=8, steps=60, seed=1, input_bounds=box)
    np.testing.assert_array_equal(x, again)


def test_inversion_gradient_in_chunks_is_the_batch_gradient():
    """Every loss term is a per-image mean, so chunked backward passes give the same Adam steps."""
    model = small_classifier()
    box = pixel_box(CIFAR_MEAN, CIFAR_STD)
    whole = synth.generate(model, "invert", 8, batch_size=8, steps=5, seed=4, input_bounds=box)
    chunked = synth.generate(model, "invert", 8, batch_size=8, steps=5, seed=4, input_bounds=box, chunk=3)
    np.testing.assert_allclose(chunked, whole, atol=2e-4)


def test_inversion_keeps_earlier_iterates_of_the_same_run():
    """keep=2 over 6 steps: the 6-step images first, then the same run's 3-step images (the same seed walks the same
    path), for one run's cost."""
    model, box = small_classifier(), pixel_box(CIFAR_MEAN, CIFAR_STD)
    both = synth.generate(model, "invert", 16, batch_size=8, steps=6, input_bounds=box, keep=2)
    late = synth.generate(model, "invert", 8, batch_size=8, steps=6, input_bounds=box)
    early = synth.generate(model, "invert", 8, batch_size=8, steps=3, input_bounds=box)
    np.testing.assert_array_equal(both[:8], late)
    np.testing.assert_array_equal(both[8:], early)
    assert not np.array_equal(late, early)


def test_inversion_smooth_blurs_the_kept_images_of_the_same_run():
    """The default smooth=0.5 returns the same run's images as smooth=0, each blurred by a Gaussian of half a pixel in
    pixel space (the optimisation path is untouched), so they stay in the box and are smoother."""
    from onnxdfq.synth.dffg import gaussian_blur

    model, box = small_classifier(), pixel_box(CIFAR_MEAN, CIFAR_STD)
    plain = synth.generate(model, "invert", 8, batch_size=8, steps=6, seed=3, input_bounds=box, smooth=0.0)
    smooth = synth.generate(model, "invert", 8, batch_size=8, steps=6, seed=3, input_bounds=box)
    lows, highs = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in box)
    pixels = torch.from_numpy((plain - lows) / (highs - lows))
    expected = lows + (highs - lows) * gaussian_blur(pixels, 0.5).numpy()
    np.testing.assert_allclose(smooth, expected, atol=1e-5)
    assert np.all(smooth >= lows - 1e-5) and np.all(smooth <= highs + 1e-5)

    def roughness(x):
        return float(np.mean((x[:, :, 1:] - x[:, :, :-1]) ** 2))

    assert roughness(smooth) < 0.8 * roughness(plain)
    with pytest.raises(SynthOptionError, match="smooth"):
        synth.generate(model, "invert", 4, steps=2, input_bounds=box, smooth=-1.0)


def test_inversion_needs_a_box_and_a_classifier():
    box = pixel_box(CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(SynthOptionError, match="input_bounds"):
        synth.generate(small_classifier(), "invert", 4, steps=2)
    with pytest.raises(SynthInputError, match="classifier"):  # a feature map, not class scores
        synth.generate(feature_map_model(), "invert", 4, steps=2, input_bounds=box)
    with pytest.raises(SynthOptionError, match="lr"):
        synth.generate(small_classifier(), "invert", 4, steps=2, input_bounds=box, lr=0.0)


def test_auto_learns_on_inverted_samples_and_keeps_prior_statistics():
    """--calib auto on a small folded classifier with --method gptq: statistics and ranges from the prior's images,
    the Hessians from inverted samples; --calib prior keeps prior images for both."""
    model = small_classifier()
    common = dict(method="gptq", bits=4, act_bits=8, preprocess="imagenet", reconstruct_samples=8,
                  synth_options={"steps": 3})
    auto = onnxdfq.quantize_model(model, **common)
    assert auto.report["statistics"]["source"] == "prior:auto"
    hessians = next(p for p in auto.report["passes"] if p["name"] == "hessians")
    assert hessians["params"]["source"] == "synth:invert" and hessians["params"]["samples"] == 8
    assert hessians["params"]["sample_info"]["steps"] == 3 and not hessians["warnings"]
    prior = onnxdfq.quantize_model(model, **common, calib="prior")
    hessians = next(p for p in prior.report["passes"] if p["name"] == "hessians")
    assert hessians["params"]["source"].startswith("prior") and "prior images" in hessians["warnings"][0]
    # 4-bit GPTQ layers under 8-bit activations take the MSE-clipped weight range (under 4-bit ones max |w|), its
    # grid no coarser than max |w| gives
    rows = next(p for p in auto.report["passes"] if p["name"] == "weight_quant")["layers"]
    assert rows and {row["weight_range"] for row in rows.values()} == {"mse"}
    a4 = onnxdfq.quantize_model(model, **{**common, "act_bits": 4})
    assert {row["weight_range"] for row in next(p for p in a4.report["passes"]
                                                if p["name"] == "weight_quant")["layers"].values()} == {"absmax"}
    plain = onnxdfq.quantize_model(model, **{**common, "method": "squant"})
    plain_rows = next(p for p in plain.report["passes"] if p["name"] == "weight_quant")["layers"]
    assert {row["weight_range"] for row in plain_rows.values()} == {"absmax"}
    assert all(rows[name]["scale_max"] <= plain_rows[name]["scale_max"] + 1e-12 for name in rows)


@pytest.mark.slow
def test_folded_resnet20_reconstructs_on_inverted_samples(resnet20, cifar_test, tmp_path):
    """BN-folded ResNet-20 W4A4 on the full test set. --reconstruct under --calib auto keeps the prior's statistics
    and learns on samples from inverting the classifier (a small folded classifier): measured 87.3-87.7 % at the
    defaults, against 81.3 without reconstruction and 80.2 when it learnt on the prior's images. Here 128 samples
    at 50 inversion steps and 100 steps a block."""
    path = str(folded_copy(resnet20, tmp_path))
    common = dict(method="squant", bits=4, act_bits=4, mean=CIFAR_MEAN, std=CIFAR_STD)
    prior = onnxdfq.quantize_model(path, **common)
    assert prior.report["statistics"]["source"] == "prior:auto"
    learnt = onnxdfq.quantize_model(path, **common, reconstruct=True, reconstruct_steps=100, reconstruct_samples=128,
                                    synth_options={"steps": 50})
    stats = learnt.report["statistics"]
    assert stats["source"] == "prior:auto" and "prior images" in stats["hint"]
    rec = next(p for p in learnt.report["passes"] if p["name"] == "reconstruct")
    assert rec["params"]["source"] == "synth:invert" and rec["params"]["samples"] == 128, rec["params"]
    assert not any("prior images" in w for w in rec["warnings"])

    def top1(result):
        return evaluate(result.model, str(cifar_test), mean=CIFAR_MEAN, std=CIFAR_STD, batch_size=500).top1

    base, after = top1(prior), top1(learnt)
    assert after >= base + 2.5, f"reconstructed on inverted samples {after:.2f} vs prior without {base:.2f}"
