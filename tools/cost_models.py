#!/usr/bin/env python3
"""Large models for cost benchmarks, built in code with random weights (no torch, no downloads).

- ``resnet50``: torchvision's ResNet-50 v1.5 layout at 224 px (53 convolutions with BatchNormalization,
  bottlenecks [3, 4, 6, 3], projection shortcuts, 1000-way classifier; 25.6 M parameters);
- ``vgg16_bn``: the CIFAR-10 VGG-16 with BN (13 convolutions, 512 -> 10 classifier; 14.7 M parameters).

Weights are He-normal and every BN has running statistics that keep activations near unit scale,
so the files exercise time and memory the way trained ones do; they say nothing about accuracy.
``--folded`` also writes a BN-folded copy (onnxruntime's basic graph optimization, as users' tools
fold it) and ``--batch 1`` fixes the batch dimension, as exporters write it.

    python tools/cost_models.py --out /tmp/cost --folded --batch 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_bn(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True,
                gamma_scale: float = 1.0) -> str:
        name = self._name("conv")
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        pad = k // 2
        self.nodes.append(helper.make_node("Conv", [x, self._init(f"{name}.weight", w)], [f"{name}_out"], name=name,
                                           kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        bn = f"{name}_bn"
        stats = [self.rng.uniform(0.5, 1.5, cout) * gamma_scale, self.rng.normal(0.0, 0.1, cout),
                 self.rng.normal(0.0, 0.1, cout), self.rng.uniform(0.5, 1.5, cout)]
        names = [self._init(f"{bn}.{part}", v) for part, v in zip(("scale", "bias", "mean", "var"), stats,
                                                                   strict=True)]
        self.nodes.append(helper.make_node("BatchNormalization", [f"{name}_out", *names], [f"{bn}_out"], name=bn,
                                           epsilon=1e-5))
        out = f"{bn}_out"
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            out = f"{name}_relu"
        return out

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def gemm(self, x: str, cin: int, cout: int) -> str:
        name = self._name("fc")
        w = self.rng.standard_normal((cout, cin)) / np.sqrt(cin)
        self.nodes.append(helper.make_node("Gemm", [x, self._init(f"{name}.weight", w),
                                                    self._init(f"{name}.bias", np.zeros(cout))],
                                           ["logits"], name=name, transB=1))
        return "logits"

    def model(self, name: str, size: int, classes: int, batch: int | None) -> onnx.ModelProto:
        dim = batch if batch else "N"
        graph = helper.make_graph(self.nodes, name,
                                  [helper.make_tensor_value_info("input", TensorProto.FLOAT, [dim, 3, size, size])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dim, classes])],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def resnet50(batch: int | None = None, seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    x = b.conv_bn("input", 3, 64, 7, stride=2)
    x = b.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = b.conv_bn(x, cin, width, 1)
            y = b.conv_bn(y, width, width, 3, stride=stride)
            y = b.conv_bn(y, width, width * 4, 1, relu=False, gamma_scale=0.3)  # residual branches start small
            shortcut = b.conv_bn(x, cin, width * 4, 1, stride=stride, relu=False) if block == 0 else x
            x = b.op("Relu", [b.op("Add", [y, shortcut])])
            cin = width * 4
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    b.gemm(x, cin, 1000)
    return b.model("resnet50", 224, 1000, batch)


def vgg16_bn(batch: int | None = None, seed: int = 0) -> onnx.ModelProto:
    b = _Builder(seed)
    x, cin = "input", 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            continue
        x = b.conv_bn(x, cin, width, 3)
        cin = width
    x = b.op("Flatten", [x], axis=1)
    b.gemm(x, cin, 10)
    return b.model("vgg16_bn", 32, 10, batch)


BUILDERS = {"resnet50": resnet50, "vgg16_bn": vgg16_bn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=list(BUILDERS))
    parser.add_argument("--batch", type=int, default=None, help="fix the batch dimension (exporters write 1)")
    parser.add_argument("--folded", action="store_true", help="also write a BN-folded copy (onnxruntime basic)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        path = args.out / f"{name}.onnx"
        onnx.save(BUILDERS[name](args.batch), path)
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        if args.folded:
            from onnxdfq.eval.session import fold_batchnorm_copy

            folded = args.out / f"{name}_folded.onnx"
            fold_batchnorm_copy(str(path), folded)
            print(f"{folded} ({folded.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
