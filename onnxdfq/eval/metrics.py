"""Accuracy and fidelity metrics on numpy arrays."""

from __future__ import annotations

import numpy as np

from onnxdfq.quant.fake import sqnr_db

__all__ = ["topk_correct", "sqnr_db", "cosine", "centered_cosine", "top1_agreement"]


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many rows have their label among the k largest logits, equal logits ranked by index.

    Quantized logits tie often (an 8-bit output grid gives MobileNet 40 tied maxima on val1300),
    so ties need a rule: the one of argmax and of a stable sort, the lower index first. The
    label's rank is the number of logits above it plus the equal ones at a lower index.
    """
    rows = np.arange(len(labels))
    label_logit = logits[rows, labels][:, None]
    index = np.arange(logits.shape[1])
    ahead = (logits > label_logit) | ((logits == label_logit) & (index < labels[:, None]))
    return int((ahead.sum(axis=1) < k).sum())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    denom = np.linalg.norm(a64) * np.linalg.norm(b64)
    return float(a64 @ b64 / denom) if denom > 0 else float("nan")


def centered_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of the two outputs' deviations from their own mean over the samples (axis 0).

    It asks whether the candidate's output moves with the input as the reference's does. A quantized
    model that has collapsed keeps a large common part (a bias, the same class everywhere), which plain
    cosine counts as agreement; its input-dependent part is noise, and this is ~0. Measured on 64 prior
    images (MobileNet-V1, ResNet-20/56, EfficientNet-Lite0): 0.28-0.93 for every run that keeps 57-90 %
    top-1 on real data, 0.00-0.08 for every run under 36 %.
    """
    n = len(reference)
    a = np.asarray(reference, np.float64).reshape(n, -1)
    b = np.asarray(candidate, np.float64).reshape(n, -1)
    return cosine(a - a.mean(axis=0), b - b.mean(axis=0)) if n > 1 else float("nan")


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return float((a2.argmax(1) == b2.argmax(1)).mean())
