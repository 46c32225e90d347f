"""Data formats of `eval`, checked against a plain reimplementation of the metric."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxdfq
from models import run, varied_chain
from onnxdfq.errors import DataError
from onnxdfq.eval.data import open_dataset
from onnxdfq.eval.metrics import topk_correct


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    model = varied_chain(0)
    path = tmp / "m.onnx"
    onnx.save(model, path)
    images = np.random.default_rng(0).integers(0, 256, (12, 17, 17, 3), dtype=np.uint8)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    x = (x - 0.5) / 0.25
    logits = run(model, x.astype(np.float32))
    labels = logits.argmax(1)
    labels[:3] = (labels[:3] + 1) % 10  # 9 of 12 correct
    return tmp, path, images, labels


def test_topk_correct():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, np.array([2, 0]), 1) == 1
    assert topk_correct(logits, np.array([2, 0]), 2) == 2


def test_topk_correct_breaks_ties_like_argmax():
    """Tied logits (common on quantized outputs) count for the lower index only, as argmax does."""
    logits = np.array([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3]])
    labels = np.array([1, 1, 2])
    assert topk_correct(logits, labels, 1) == int((logits.argmax(1) == labels).sum()) == 1
    assert topk_correct(logits, labels, 2) == 2  # the third row's label ranks third
    assert topk_correct(logits, labels, 3) == 3


def test_npz_uint8_nhwc(model_and_images):
    tmp, path, images, labels = model_and_images
    np.savez(tmp / "d.npz", x=images, y=labels)
    result = onnxdfq.evaluate(path, str(tmp / "d.npz"), mean=[0.5] * 3, std=[0.25] * 3)
    assert result.count == 12 and result.top1 == pytest.approx(75.0)


def test_folder_with_labels_txt_and_class_folders(model_and_images):
    tmp, path, images, labels = model_and_images
    (tmp / "lab" / "images").mkdir(parents=True)
    lines = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp / "lab" / "images" / f"{i}.png")
        lines.append(f"{i}.png {labels[i]}")
        (tmp / "cls" / f"class{labels[i]:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp / "cls" / f"class{labels[i]:02d}" / f"{i}.png")
    (tmp / "lab" / "labels.txt").write_text("\n".join(lines))
    result = onnxdfq.evaluate(path, str(tmp / "lab"), mean=[0.5] * 3, std=[0.25] * 3)
    assert result.top1 == pytest.approx(75.0)
    dataset = open_dataset(tmp / "cls")
    assert dataset.count == 12


def test_labels_txt_pointing_to_missing_file(tmp_path):
    (tmp_path / "labels.txt").write_text("missing.jpg 3\n")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path)


def test_npz_without_x(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((1, 3, 4, 4)))
    with pytest.raises(DataError, match="'x'"):
        open_dataset(tmp_path / "d.npz")
