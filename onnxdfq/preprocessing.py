"""A model's input preprocessing: how [0, 1] pixels become what the model eats, and where that came from.

Preprocessing is the first thing users get wrong, and it fails silently: a CIFAR ResNet fed x/255
instead of (x/255 - mean)/std still scores 40 % and looks plausible. So it is never guessed:
it comes from ``--mean/--std`` (both, on the 0-1 scale), ``--input-range LO,HI`` (pixel 0 -> LO,
1 -> HI), a named ``--preprocess`` preset, or the model's metadata (``quantize`` writes the
preprocessing it used into every file it writes). Each of these is validated here, once, for every
command and the Python API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnxdfq.errors import OptionError

__all__ = ["PRESETS", "Preprocessing", "resolve_preprocessing", "from_metadata", "METADATA_MEAN", "METADATA_STD",
           "PREPROCESS_HELP"]

# (mean, std) on the 0-1 scale; x_model = (x / 255 - mean) / std
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision, timm, most PyTorch classifiers
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # the CIFAR-10 training set's own statistics
    "inception": ((0.5,), (0.5,)),  # [-1, 1]: Inception, MobileNet and EfficientNet-Lite from TensorFlow
    "unit": ((0.0,), (1.0,)),  # x / 255 only: [0, 1]
    "raw255": ((0.0,), (1.0 / 255.0,)),  # plain 0..255 pixel values
}
PREPROCESS_HELP = ("imagenet (mean 0.485,0.456,0.406 std 0.229,0.224,0.225), cifar (0.4914,0.4822,0.4465 / "
                   "0.2470,0.2435,0.2616), inception ([-1, 1]), unit ([0, 1]) or raw255 (0..255)")
# what quantize writes into its output and eval / compare read back (0-1 scale, comma-separated)
METADATA_MEAN = "onnxdfq.mean"
METADATA_STD = "onnxdfq.std"
# keys other tools use for the same thing (read only); values > 1 are on the 0-255 scale there
FOREIGN_KEYS = {"mean": ("mean", "norm_mean", "image_mean"), "std": ("std", "norm_std", "image_std")}
# a mean or std this large is on the 0-255 scale (pixel means lie in [0, 1]; a std > 2 would squeeze the
# whole pixel range into less than half a unit, which no model does)
SCALE_255_LIMIT = 2.0


@dataclass(frozen=True)
class Preprocessing:
    """x_model = (pixel / 255 - mean) / std per channel; ``source`` says where it came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def input_range(self) -> tuple[float, float]:
        """The model input's range over all channels for pixels in [0, 1]."""
        lows, highs = pixel_box(self.mean, self.std)
        return float(lows.min()), float(highs.max())

    def check_channels(self, channels: int | None, what: str = "the model") -> None:
        """A mean/std of length 1 or ``channels``; anything else is one clear error."""
        if channels is None:
            return
        for values, flag in ((self.mean, "mean"), (self.std, "std")):
            if len(values) not in (1, channels):
                raise OptionError(f"{self._flag(flag)} has {len(values)} values but {what} takes {channels} input "
                                  f"channel{'s' if channels != 1 else ''} (give 1 or {channels})")

    def _flag(self, name: str) -> str:
        return f"--{name}" if self.source.startswith("--mean") else f"the {name} from {self.source}"

    def metadata(self) -> dict[str, str]:
        return {METADATA_MEAN: ",".join(f"{v:.6g}" for v in self.mean),
                METADATA_STD: ",".join(f"{v:.6g}" for v in self.std)}

    def describe(self) -> str:
        return f"mean {_fmt(self.mean)} std {_fmt(self.std)} ({self.source})"


def pixel_box(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lowest and highest model input pixels in [0, 1] can give: (0 - mean) / std, (1 - mean) / std."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    lows, highs = (0.0 - mean) / std, (1.0 - mean) / std
    return np.minimum(lows, highs), np.maximum(lows, highs)


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _floats(values: Sequence[float] | np.ndarray | None) -> tuple[float, ...] | None:
    if values is None:
        return None
    return tuple(float(v) for v in np.ravel(np.asarray(values, np.float64)))


def _validated(mean: tuple[float, ...], std: tuple[float, ...], source: str) -> Preprocessing:
    if not mean or not std:
        raise OptionError(f"{source}: mean and std need at least one value each")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise OptionError(f"{source}: {len(mean)} mean values but {len(std)} std values; give one per input channel")
    if not all(np.isfinite(mean + std)):
        raise OptionError(f"{source}: mean and std must be finite numbers")
    if any(v <= 0 for v in std):
        raise OptionError(f"--std must be positive, got {list(std)}")
    if max(abs(v) for v in mean) > SCALE_255_LIMIT or max(std) > SCALE_255_LIMIT:
        scaled_mean, scaled_std = (v / 255.0 for v in mean), (v / 255.0 for v in std)
        raise OptionError(f"{source}: mean {_fmt(mean)} / std {_fmt(std)} look like the 0-255 scale; onnxdfq takes "
                          f"them on the 0-1 scale: --mean {_fmt(tuple(scaled_mean))} --std {_fmt(tuple(scaled_std))}")
    return Preprocessing(mean, std, source)


def resolve_preprocessing(mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                          input_range: Sequence[float] | None = None, preset: str | None = None,
                          channels: int | None = None) -> Preprocessing | None:
    """The preprocessing a user gave, validated; None when they gave none.

    ``mean`` and ``std`` go together; ``preset`` is a name of PRESETS; ``input_range`` (LO, HI) maps
    pixel 0 to LO and 1 to HI. Giving two of these, one of mean/std alone, a length that fits neither
    the other nor ``channels``, or values on the 0-255 scale is an OptionError that says what to give.
    ``input_range`` is the preprocessing only when neither of the others is given (for ``quantize`` it is
    also the input tensor's range, which may differ from the pixels' image under mean/std).
    """
    mean, std, lohi = _floats(mean), _floats(std), _floats(input_range)
    if preset is not None and (mean is not None or std is not None):
        raise OptionError("give the preprocessing once: --preprocess and --mean/--std both say it")
    if (mean is None) != (std is None):
        have, missing = ("--mean", "--std") if std is None else ("--std", "--mean")
        raise OptionError(f"{have} without {missing}: give both (on the 0-1 scale), or --preprocess "
                          f"{'|'.join(PRESETS)}")
    result = None
    if mean is not None:
        result = _validated(mean, std, "--mean/--std")
    elif lohi is not None:
        if len(lohi) != 2 or not lohi[0] < lohi[1]:
            raise OptionError(f"--input-range takes LO,HI with LO < HI, got {list(lohi)}")
        span = lohi[1] - lohi[0]
        result = Preprocessing((-lohi[0] / span,), (1.0 / span,), "--input-range")
    elif preset is not None:
        key = str(preset).strip().lower()
        if key not in PRESETS:
            raise OptionError(f"--preprocess takes {'|'.join(PRESETS)}, got {preset!r}")
        result = Preprocessing(*PRESETS[key], f"--preprocess {key}")
    if result is not None:
        result.check_channels(channels)
    return result


def from_metadata(props: Mapping[str, str]) -> Preprocessing | None:
    """The preprocessing stored in a model's metadata (onnxdfq's keys, or the common mean/std keys of other
    tools, 0-255 values rescaled), or None; a malformed entry is ignored, never guessed around."""
    lowered = {str(k).lower(): str(v) for k, v in props.items()}
    for mean_key, std_key in ((METADATA_MEAN, METADATA_STD), *zip(FOREIGN_KEYS["mean"], FOREIGN_KEYS["std"],
                                                                      strict=True)):
        if mean_key in lowered and std_key in lowered:
            mean, std = _parse(lowered[mean_key]), _parse(lowered[std_key])
            if not mean or not std:
                continue
            if mean_key != METADATA_MEAN and (max(abs(v) for v in mean) > 1.0 or max(std) > 1.0):
                mean, std = tuple(v / 255.0 for v in mean), tuple(v / 255.0 for v in std)
            try:
                return _validated(mean, std, "model metadata")
            except OptionError:
                continue
    return None


def _parse(text: str) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in text.replace(",", " ").replace("[", " ").replace("]", " ").split())
    except ValueError:
        return None
