"""A data-free image prior: procedural images in a model's input space (numpy only, no torch).

Models folded without their BatchNormalization statistics still need per-channel statistics
(activation ranges, bias correction, DF-MPC's re-estimation). Natural images share a few
properties that simple procedures reproduce without any data: a 1/f amplitude spectrum,
occlusion (opaque objects with sharp edges over each other) and correlated colour channels.

- ``dead_leaves``: opaque discs with radii drawn from a power law (density ~ r^-3, the scale-
  invariant choice of Lee, Mumford and Huang 2001) painted over each other in random colours;
  each leaf carries a faint 1/f texture so that no region is perfectly flat.
- ``pink``: Gaussian noise shaped to a 1/f^alpha amplitude spectrum per image, the three
  channels mixed to correlate like RGB, stretched to (nearly) [0, 1] per image.
- ``mixed``: half of each.

``pink`` is the default, chosen by measurement on a BN-folded ResNet-56 (DF-MPC 2/6 on 2000 test
images, the method most sensitive to its statistics; 256 images each): pink alpha 1.5 over the
full range 89.60, alpha 1.0 88.25, alpha 2.0 89.95 (its std error is worse), mixed 88.05, dead
leaves 83.85, and 256 real training images 90.45. Its per-layer statistics are also the closest
to the true BN ones (mean error 0.21 std vs 0.28 mixed and 0.45 dead leaves). Dead leaves' flat
discs give too many exactly constant regions: deep channels see too little variance. The 224-pixel
MobileNet-V1 is the exception measured so far: there dead leaves and the mix describe the layers
better (log-std error 0.36 / 0.32 against pink's 0.59) and its DF-MPC 4/8 scores 67.69 / 66.77
against 60.54 (``tools/bench_folded.py --study mobilenet``).

Images are generated in [0, 1] RGB (H x W at the model's size) and then mapped into the model's
input space with its preprocessing (``(x - mean) / std``, or linearly onto ``input_range``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxdfq.config import PRIOR_GENERATORS

__all__ = ["PRIOR_GENERATORS", "DEFAULT_PRIOR", "DEFAULT_PRIOR_SAMPLES", "LARGE_INPUT", "LARGE_INPUT_SAMPLES",
           "InputSpace", "dead_leaves", "pink_noise", "prior_images", "prior_image_set", "resolve_generator",
           "default_prior_count"]

logger = logging.getLogger(__name__)

DEFAULT_PRIOR = "pink"  # the probe's and compare's images; statistics runs take "auto" (resolve_generator)
DEFAULT_PRIOR_SAMPLES = 256  # images below LARGE_INPUT px; see the calibration table for the count/accuracy trade-off
# from this image side up, statistics come from the pink/dead-leaves ensemble, LARGE_INPUT_SAMPLES images in all
LARGE_INPUT = 128
LARGE_INPUT_SAMPLES = 128
LEAVES_PER_IMAGE = 160  # discs painted per image (the largest first, so small ones stay visible)
MIN_RADIUS_FRACTION = 1 / 64  # smallest radius, of the image side (at least MIN_RADIUS pixels)
MIN_RADIUS = 1.0
PINK_ALPHA = 1.5  # amplitude ~ 1/f^alpha; natural images sit near 1, 1.5 measured best (module doc)
TEXTURE_ALPHA = 1.0  # the leaves' texture
TEXTURE_AMPLITUDE = 0.08  # per-leaf texture, in [0, 1] units
CHUNK = 32  # images transformed at a time (memory: one chunk of spectra, not the whole set)


@dataclass(frozen=True)
class InputSpace:
    """How [0, 1] RGB images become model inputs: ``(x - mean) / std`` per channel.

    ``from_range(lo, hi)`` gives the linear map of [0, 1] onto [lo, hi] (mean = -lo/(hi-lo),
    std = 1/(hi-lo)); ``source`` says where the numbers came from (for the report).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = "default"

    @classmethod
    def from_range(cls, lo: float, hi: float, source: str = "input_range") -> InputSpace:
        if not hi > lo:
            raise ValueError(f"input range needs LO < HI, got ({lo}, {hi})")
        return cls((-lo / (hi - lo),), (1.0 / (hi - lo),), source)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """[N, C, H, W] in [0, 1] -> model inputs, float32."""
        channels = images.shape[1]
        mean = np.resize(np.asarray(self.mean, np.float32), channels).reshape(1, channels, 1, 1)
        std = np.resize(np.asarray(self.std, np.float32), channels).reshape(1, channels, 1, 1)
        return ((images - mean) / std).astype(np.float32)


def _spectrum_filter(height: int, width: int, alpha: float) -> np.ndarray:
    """1/f^alpha amplitude over the rfft2 grid (the DC term set to 0)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx * fx + fy * fy)
    radius[0, 0] = np.inf
    return (1.0 / radius**alpha).astype(np.float64)


def _shaped_noise(rng: np.random.Generator, shape: tuple[int, ...], alpha: float) -> np.ndarray:
    """Zero-mean float32 noise with a 1/f^alpha spectrum over the last two axes, unit std per image plane.

    White noise is drawn directly in the frequency domain (complex Gaussian over the half spectrum
    that irfft2 reads), which saves the forward transform. Single precision and CHUNK images at a
    time: 256 images at 224 px took 6.5 s and over 2 GB in double precision at once."""
    height, width = shape[-2:]
    spectrum = _spectrum_filter(height, width, alpha).astype(np.float32)
    out = np.empty(shape, np.float32)
    for start in range(0, shape[0], CHUNK):
        half = (min(CHUNK, shape[0] - start),) + tuple(shape[1:-1]) + (width // 2 + 1,)
        white = rng.standard_normal(half, np.float32) + 1j * rng.standard_normal(half, np.float32)
        noise = np.fft.irfft2(white.astype(np.complex64) * spectrum, s=(height, width)).astype(np.float32)
        noise -= noise.mean(axis=(-2, -1), keepdims=True)
        noise /= noise.std(axis=(-2, -1), keepdims=True) + 1e-12
        out[start:start + len(noise)] = noise
    return out


def _colour_mix(rng: np.random.Generator, count: int, channels: int) -> np.ndarray:
    """[count, C, C] mixing matrices: a shared luminance plus weaker chroma, like RGB statistics."""
    luminance = np.ones((count, channels, 1))
    chroma = 0.6 * rng.standard_normal((count, channels, channels))
    return luminance * 0.8 + chroma


def pink_noise(count: int, channels: int, height: int, width: int, *, seed: int = 0,
               alpha: float = PINK_ALPHA) -> np.ndarray:
    """[count, C, H, W] colour 1/f^alpha noise in [0, 1] (each image stretched to a random sub-range)."""
    rng = np.random.default_rng(seed)
    noise = _shaped_noise(rng, (count, channels, height, width), alpha)
    mixed = np.einsum("ncd,ndhw->nchw", _colour_mix(rng, count, channels).astype(np.float32), noise)
    lo = mixed.min(axis=(1, 2, 3), keepdims=True)
    hi = mixed.max(axis=(1, 2, 3), keepdims=True)
    mixed -= lo
    mixed /= np.maximum(hi - lo, 1e-12)
    # nearly the full range: narrower contrast (e.g. [0.3, 0.7]) starved deep channels of variance
    low = rng.uniform(0.0, 0.05, (count, 1, 1, 1)).astype(np.float32)
    high = rng.uniform(0.95, 1.0, (count, 1, 1, 1)).astype(np.float32)
    mixed *= high - low
    mixed += low
    return mixed


def _radii(rng: np.random.Generator, count: int, r_min: float, r_max: float) -> np.ndarray:
    """Radii with density ~ r^-3 on [r_min, r_max] (inverse CDF of the truncated power law)."""
    u = rng.uniform(size=count)
    inv_min, inv_max = r_min**-2, r_max**-2
    return (inv_min - u * (inv_min - inv_max)) ** -0.5


def dead_leaves(count: int, channels: int, height: int, width: int, *, seed: int = 0,
                leaves: int = LEAVES_PER_IMAGE) -> np.ndarray:
    """[count, C, H, W] dead-leaves images in [0, 1]: occluding discs of power-law radii, random colours."""
    rng = np.random.default_rng(seed)
    r_min = max(MIN_RADIUS, MIN_RADIUS_FRACTION * max(height, width))
    r_max = max(0.5 * max(height, width), 2.0 * r_min)
    images = np.empty((count, channels, height, width), np.float32)
    background = rng.uniform(0.0, 1.0, (count, channels))
    images[:] = background[:, :, None, None]
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    texture = _shaped_noise(rng, (count, 1, height, width), TEXTURE_ALPHA).astype(np.float32) * TEXTURE_AMPLITUDE
    for index in range(count):  # a loop over images and leaves, each leaf painted in its bounding box
        radii = np.sort(_radii(rng, leaves, r_min, r_max))[::-1]  # large first: small ones stay on top
        centres_y = rng.uniform(-0.1 * height, 1.1 * height, leaves)
        centres_x = rng.uniform(-0.1 * width, 1.1 * width, leaves)
        colours = rng.uniform(0.0, 1.0, (leaves, channels)).astype(np.float32)
        image = images[index]
        for radius, cy, cx, colour in zip(radii, centres_y, centres_x, colours, strict=True):
            y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 1, height)
            x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 1, width)
            if y0 >= y1 or x0 >= x1:
                continue
            inside = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= radius * radius
            image[:, y0:y1, x0:x1][:, inside] = colour[:, None]
    return np.clip(images + texture, 0.0, 1.0)


def resolve_generator(generator: str, height: int, width: int) -> str:
    """``auto`` -> ``ensemble`` for images of LARGE_INPUT px and more, ``pink`` below; others as they are."""
    if generator != "auto":
        return generator
    return "ensemble" if min(height, width) >= LARGE_INPUT else "pink"


def default_prior_count(height: int, width: int) -> int:
    """Images a statistics run takes by default: 256 small ones, LARGE_INPUT_SAMPLES at LARGE_INPUT px and up
    (moments over 224 x 224 positions settle with far fewer images: EfficientNet-Lite0 W8A8 81.23 % with 64 pink
    images and with 256)."""
    return LARGE_INPUT_SAMPLES if min(height, width) >= LARGE_INPUT else DEFAULT_PRIOR_SAMPLES


def prior_image_set(count: int, shape: tuple[int, ...], space: InputSpace, *, generator: str = DEFAULT_PRIOR,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """``count`` model inputs of ``shape`` (C, H, W) from the named generator, preprocessed by ``space``, and for
    ``ensemble`` the generator of each image (0 pink, 1 dead leaves; None otherwise), whose statistics the
    statistics engine combines (`passes.channel_stats.ensemble_statistics`)."""
    if generator not in PRIOR_GENERATORS:
        raise ValueError(f"prior generator must be one of {', '.join(PRIOR_GENERATORS)}, got {generator!r}")
    if len(shape) != 3:
        raise ValueError(f"the image prior needs an input of shape [N, C, H, W], got [N, {', '.join(map(str, shape))}]")
    channels, height, width = (int(d) for d in shape)
    generator = resolve_generator(generator, height, width)
    groups = None
    if generator == "pink":
        images = pink_noise(count, channels, height, width, seed=seed)
    elif generator == "dead_leaves":
        images = dead_leaves(count, channels, height, width, seed=seed)
    elif generator == "ensemble":
        half = count // 2
        images = np.concatenate([pink_noise(count - half, channels, height, width, seed=seed),
                                 dead_leaves(half, channels, height, width, seed=seed + 1)])
        groups = np.repeat(np.arange(2), (count - half, half))
    else:
        half = count // 2
        images = np.concatenate([dead_leaves(count - half, channels, height, width, seed=seed),
                                 pink_noise(half, channels, height, width, seed=seed + 1)])
        images = images[np.random.default_rng(seed).permutation(count)]
    return space.apply(images), groups


def prior_images(count: int, shape: tuple[int, ...], space: InputSpace, *, generator: str = DEFAULT_PRIOR,
                 seed: int = 0) -> np.ndarray:
    """``count`` model inputs of ``shape`` (C, H, W) from the named generator, preprocessed by ``space``."""
    return prior_image_set(count, shape, space, generator=generator, seed=seed)[0]
