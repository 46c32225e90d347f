"""Our QDQ files in a second runtime: OpenVINO (the optional extra [openvino]) gives the same top-1 as onnxruntime."""

from __future__ import annotations

import pytest
from conftest import CIFAR_MEAN, CIFAR_STD

import onnxdfq
from onnxdfq.eval.runner import evaluate

pytest.importorskip("openvino")

IMAGENET = {"mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize(("bits", "fmt"), [(8, "qdq"), (4, "qdq-packed")])
def test_openvino_matches_onnxruntime_on_resnet20(resnet20, cifar_test, bits, fmt):
    """W8A8 and packed-INT4 W4A8 files run unchanged in OpenVINO; top-1 on 2000 images within 0.5 of ORT's
    (10 images: the runtimes round differently; the full-set check below is tighter)."""
    model = onnxdfq.quantize(resnet20, bits=bits, act_bits=8, fmt=fmt)
    ort = evaluate(model, cifar_test, mean=CIFAR_MEAN, std=CIFAR_STD, limit=2000).top1
    ov = evaluate(model, cifar_test, mean=CIFAR_MEAN, std=CIFAR_STD, limit=2000, provider="openvino").top1
    assert ort > 88.0 and abs(ov - ort) <= 0.5, (ov, ort)


def test_openvino_session_reports_itself_and_its_shapes(resnet20):
    from onnxdfq.eval.session import make_session

    session = make_session(onnxdfq.quantize(resnet20, bits=8, act_bits=8), "openvino")
    assert session.get_providers() == ["OpenVINO CPU"]
    assert session.get_inputs()[0].shape[1:] == [3, 32, 32] and len(session.get_outputs()) == 1


@pytest.mark.slow
def test_openvino_full_test_sets(resnet56, cifar_test, mobilenet, val1300):
    """The BENCHMARKS figures: ResNet-56 W8A8 over 10 000 images within 0.1; MobileNet dfq per-tensor within 0.2."""
    r56 = onnxdfq.quantize(resnet56, bits=8, act_bits=8)
    ort = evaluate(r56, cifar_test, mean=CIFAR_MEAN, std=CIFAR_STD).top1
    ov = evaluate(r56, cifar_test, mean=CIFAR_MEAN, std=CIFAR_STD, provider="openvino").top1
    assert ort >= 93.0 and abs(ov - ort) <= 0.1, (ov, ort)
    mb = onnxdfq.quantize(mobilenet, method="dfq", bits=8, act_bits=8, granularity="tensor")
    ort = evaluate(mb, val1300, **IMAGENET).top1
    ov = evaluate(mb, val1300, **IMAGENET, provider="openvino").top1
    assert ort >= 75.85 and abs(ov - ort) <= 0.2, (ov, ort)
