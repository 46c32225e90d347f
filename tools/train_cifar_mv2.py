#!/usr/bin/env python3
"""A held-out inverted-residual model: a small MobileNetV2-style CIFAR-10 net trained here on ../shared's train5000.

Nothing in onnxdfq was tuned on it. It has what the BN-folded ImageNet models have (inverted residuals, ReLU6,
linear bottlenecks and residual sums, BatchNorm everywhere) at 32 px, so a folded copy checks a change to the
data-free path on real accuracy (CIFAR-10 test, 10 000 images) in seconds. 30 epochs take 16-20 min on 2 cores
with the synth extra's torch. The copy BENCHMARKS measured scored FP32 74.17 %; its draft drew the crop shifts from
NumPy's unseeded global generator, which this script seeds, so a retrain lands near that figure, not on it.

    python tools/train_cifar_mv2.py -o mv2_bn.onnx            # BN kept (TorchScript export, no constant folding)
    python -c "from onnxdfq.eval.session import fold_batchnorm_copy as f; f('mv2_bn.onnx', 'mv2_folded.onnx')"
    onnxdfq quantize mv2_folded.onnx -o q.onnx --bits 4 --preprocess imagenet
    onnxdfq eval q.onnx --data ../shared/assets/cifar10/test.npz --preprocess imagenet
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # --preprocess imagenet, as the shared CIFAR ResNets
STD = np.array([0.229, 0.224, 0.225], np.float32)
# (out channels, repeats, first stride, expansion)
STAGES = [(16, 1, 1, 1), (24, 2, 1, 4), (24, 1, 1, 4), (32, 2, 2, 4), (32, 1, 1, 4), (64, 1, 2, 4), (64, 1, 1, 4),
          (96, 1, 1, 4)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = (nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
                       if expand != 1 else nn.Identity())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


def build() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())]
    cin = 32
    for cout, repeats, stride, expand in STAGES:
        for index in range(repeats):
            layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
            cin = cout
    layers += [nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(320, 10)]
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="mv2_bn.onnx")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = np.load(ASSETS / "cifar10" / "train5000.npz")
    x = torch.tensor(((data["x"] / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).astype(np.float32))
    y = torch.tensor(data["y"])
    net, batch = build(), 64
    steps = len(x) // batch
    optimiser = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=4e-5, nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 0.1, total_steps=args.epochs * steps)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        order, total = torch.randperm(len(x)), 0.0
        for step in range(steps):
            pick = order[step * batch:(step + 1) * batch]
            xb = x[pick]
            xb = torch.where((torch.rand(len(xb)) < 0.5)[:, None, None, None], xb.flip(3), xb)  # flips
            i, j = rng.integers(0, 9, 2)  # 4-pixel shifts
            xb = F.pad(xb, (4, 4, 4, 4))[:, :, i:i + 32, j:j + 32]
            loss = F.cross_entropy(net(xb), y[pick])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / steps:.3f}, {time.time() - start:.0f} s", flush=True)
    net.eval()
    torch.onnx.export(net, torch.zeros(1, 3, 32, 32), args.output, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, do_constant_folding=False, dynamo=False)
    print(f"wrote {args.output} (BN kept)")


if __name__ == "__main__":
    main()
