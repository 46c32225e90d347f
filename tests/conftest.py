"""Shared fixtures: paths of the real assets (../shared/assets or $ONNXDFQ_ASSETS) and tiny models.

The one place tests find the shared assets: take a fixture (resnet20, cifar_test, ...) or, in a
parametrised test, pass the path relative to the assets folder and call ``asset()`` inside the test.
A missing asset skips the test, or fails it where ONNXDFQ_REQUIRE_ASSETS is set (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("ONNXDFQ_ASSETS", ROOT.parent / "shared" / "assets"))
CIFAR_MEAN = [0.485, 0.456, 0.406]
CIFAR_STD = [0.229, 0.224, 0.225]


def asset(relative: str) -> Path:
    path = ASSETS / relative
    if not path.exists():
        if os.environ.get("ONNXDFQ_REQUIRE_ASSETS"):  # CI: a missing asset is a failure, not a skip
            pytest.fail(f"shared asset {path} not present (ONNXDFQ_REQUIRE_ASSETS is set)")
        pytest.skip(f"shared asset {path} not present")
    return path


def shared_tool(name: str) -> Path:
    """A script of ../shared/tools: beside $ONNXDFQ_ASSETS if it is there, else beside the checkout;
    skipped (failed under ONNXDFQ_REQUIRE_ASSETS) when neither has it."""
    for folder in (ASSETS.parent / "tools", ROOT.parent / "shared" / "tools"):
        if (folder / name).exists():
            return folder / name
    if os.environ.get("ONNXDFQ_REQUIRE_ASSETS"):
        pytest.fail(f"shared tool {name} not present beside {ASSETS} (ONNXDFQ_REQUIRE_ASSETS is set)")
    pytest.skip(f"shared tool {name} not present beside {ASSETS}")


@pytest.fixture(scope="session")
def resnet20() -> Path:
    return asset("cifar10/resnet20.onnx")


@pytest.fixture(scope="session")
def resnet32() -> Path:
    return asset("cifar10/resnet32.onnx")


@pytest.fixture(scope="session")
def resnet44() -> Path:
    return asset("cifar10/resnet44.onnx")


@pytest.fixture(scope="session")
def resnet56() -> Path:
    return asset("cifar10/resnet56.onnx")


@pytest.fixture(scope="session")
def mobilenet() -> Path:
    return asset("imagenet/mobilenet_v1_0.75.onnx")


@pytest.fixture(scope="session")
def cifar_test() -> Path:
    return asset("cifar10/test.npz")


@pytest.fixture(scope="session")
def cifar_train() -> Path:
    return asset("cifar10/train5000.npz")


@pytest.fixture(scope="session")
def val1300() -> Path:
    return asset("imagenet/val1300")


@pytest.fixture(scope="session")
def ref_eval() -> Path:
    """The independent reference evaluator, ../shared/tools/ref_eval.py (next to the assets)."""
    return shared_tool("ref_eval.py")


SHARED_MODELS = ["cifar10/resnet20.onnx", "cifar10/resnet32.onnx", "cifar10/resnet44.onnx",
                 "cifar10/resnet56.onnx", "imagenet/mobilenet_v1_0.75.onnx"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """With ONNXDFQ_REQUIRE_ASSETS set (CI does), every shared asset must be there: no silent skips."""
    if not os.environ.get("ONNXDFQ_REQUIRE_ASSETS"):
        return
    needed = SHARED_MODELS + ["cifar10/test.npz", "cifar10/train5000.npz", "imagenet/val1300/labels.txt"]
    missing = [rel for rel in needed if not (ASSETS / rel).exists()]
    if missing:
        raise pytest.UsageError(f"ONNXDFQ_REQUIRE_ASSETS is set but {ASSETS} lacks: {', '.join(missing)}")


def cli_without_torch(*args: str):
    """``onnxdfq ARGS`` in a fresh interpreter where ``import torch`` fails (the synth extra missing)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['onnxdfq'] + sys.argv[1:]; "
            "from onnxdfq.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
