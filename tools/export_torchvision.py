#!/usr/bin/env python3
"""Export torchvision classifiers with both PyTorch exporters, as users do: the robustness corpus.

Runs in a separate environment (torchvision does not import beside the project's torch 2.13.0):

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx onnxscript
    /tmp/tvenv/bin/python tools/export_torchvision.py --out /tmp/tv_models

Weights are random (no pretrained weights can be downloaded here): the files cover shapes and
ops, not accuracy. Both exporters are used with their defaults, which fold BatchNormalization
(TorchScript: do_constant_folding=True; dynamo: optimize=True), and batch 1 as exporters write it.
Not part of the test suite or CI.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

ARCHS = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0",
         "regnet_y_400mf", "convnext_tiny", "vit_b_16"]


def main() -> None:
    import torch
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--keep-bn", action="store_true",
                        help="export as the README advises for real statistics: TorchScript with "
                             "do_constant_folding=False, dynamo with optimize=False (files ARCH.bn_kept.EXPORTER.onnx)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for arch in args.only or ARCHS:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        for exporter in ("torchscript", "dynamo"):
            path = args.out / f"{arch}{'.bn_kept' if args.keep_bn else ''}.{exporter}.onnx"
            if path.exists():
                continue
            try:
                with torch.no_grad():
                    if exporter == "torchscript":
                        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                          input_names=["input"], output_names=["logits"],
                                          do_constant_folding=not args.keep_bn)
                    else:
                        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=not args.keep_bn)
                print(f"{path.name}: ok", flush=True)
            except Exception as exc:  # report and go on: the corpus is what exports
                print(f"{path.name}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                      flush=True)
                traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    main()
