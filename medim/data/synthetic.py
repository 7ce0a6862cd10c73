"""Synthetic phantom image-report pairs whose truth is known.

A phantom is a grayscale "chest" (a mid-grey ellipse on a dark background) with 0-2 round lesions.
Each lesion sits in one of four quadrants (at most one per quadrant), is small or large, and is
brighter ("dense") or darker ("lucent") than the tissue around it. The report says exactly what is
drawn, in short radiology-style English with phrasing drawn by the RNG.

Two deterministic readers close the loop: `parse_report` reads the attributes back from text and
`read_image` reads them back from pixels (thresholds on quadrant windows relative to the tissue
level, robust to the blur and quantisation of a small VQGAN). `compare` scores predictions against
the truth, so a model trained on phantoms can be measured end to end.

Side convention: reports use the **patient's** side, as radiology does. The patient faces the
viewer, so the patient's right is on the **image's left** (small x).

Example:
    >>> from medim.data.synthetic import make_pair, read_image, parse_report
    >>> image, report, spec = make_pair(0)
    >>> read_image(image) == spec == parse_report(report)
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from medim.utils.checks import check_int

__all__ = [
    "SIDES",
    "LEVELS",
    "SIZES",
    "DENSITIES",
    "Lesion",
    "PhantomSpec",
    "PhantomScores",
    "random_spec",
    "render",
    "write_report",
    "make_pair",
    "make_dataset",
    "parse_report",
    "read_image",
    "compare",
]

SIDES = ("right", "left")  # the patient's side: "right" is drawn on the image's left half
LEVELS = ("upper", "lower")
SIZES = ("small", "large")
DENSITIES = ("bright", "dark")

# Geometry in units of the image side, origin at the image centre, y pointing down.
_BODY_AXES = (0.47, 0.46)  # ellipse semi-axes (x, y) of the "thorax"
_OFFSET = 0.19  # lesion centres sit at (+-0.19, +-0.19)
_RADIUS = {"small": 0.06, "large": 0.12}
_JITTER = 0.015  # max shift of a lesion centre
_WINDOW = 0.155  # the detector looks inside this radius around each lesion centre
# Tissue around 128, lesions 75-90 grey levels away from it, noise sigma 3: a fixed 35-level
# threshold separates them with a wide margin even after blur and 8-bit rounding.
_CONTRAST = (75.0, 90.0)
_THRESHOLD = 35.0
# Fraction of the detector window covered by a lesion: small ~0.15, large ~0.60 (+-17% jitter).
_PRESENT_FRACTION = 0.05
_LARGE_FRACTION = 0.33

_MIN_SIZE, _MAX_SIZE = 32, 2048


def _check(name: str, value: object, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}, got {value!r}")


@dataclass(frozen=True)
class Lesion:
    """One lesion: `side` (patient's) and `level` give the quadrant; `size`; `density`.

    `size` and `density` may be None only in what `parse_report(strict=False)` returns for a
    sentence that names a place but not these attributes.
    """

    side: str
    level: str
    size: str | None
    density: str | None

    def __post_init__(self) -> None:
        _check("side", self.side, SIDES)
        _check("level", self.level, LEVELS)
        _check("size", self.size, (*SIZES, None))
        _check("density", self.density, (*DENSITIES, None))

    @property
    def quadrant(self) -> tuple[str, str]:
        return (self.side, self.level)


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom shows: up to four lesions, at most one per quadrant (kept sorted)."""

    lesions: tuple[Lesion, ...] = ()

    def __post_init__(self) -> None:
        lesions = tuple(sorted(self.lesions, key=lambda x: (SIDES.index(x.side), LEVELS.index(x.level))))
        quadrants = [lesion.quadrant for lesion in lesions]
        if len(set(quadrants)) != len(quadrants):
            raise ValueError(f"lesions: at most one lesion per quadrant, got {quadrants}")
        object.__setattr__(self, "lesions", lesions)

    def at(self, side: str, level: str) -> Lesion | None:
        """The lesion in a quadrant, or None."""
        return next((x for x in self.lesions if x.quadrant == (side, level)), None)

    def to_dict(self) -> dict:
        """JSON-friendly form (used as dataset metadata)."""
        return {"lesions": [vars(lesion).copy() for lesion in self.lesions]}

    @classmethod
    def from_dict(cls, data: dict) -> PhantomSpec:
        return cls(tuple(Lesion(**lesion) for lesion in data["lesions"]))


def _rng(rng_or_seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.default_rng(int(rng_or_seed))
    raise TypeError(f"rng_or_seed must be an int seed or a numpy Generator, got {type(rng_or_seed).__name__}")


def _check_int(value: int, name: str, **bounds: int) -> None:
    # numpy integers count as ints: seeds and sizes often come out of numpy arrays.
    check_int(int(value) if isinstance(value, np.integer) else value, name, **bounds)


def _check_size(size: int) -> None:
    _check_int(size, "size", minimum=_MIN_SIZE, maximum=_MAX_SIZE)


def random_spec(rng: np.random.Generator) -> PhantomSpec:
    """Draw 0, 1 or 2 lesions (equally likely) in distinct quadrants with random attributes."""
    count = int(rng.integers(0, 3))
    quadrants = [(s, lv) for s in SIDES for lv in LEVELS]
    chosen = rng.choice(len(quadrants), size=count, replace=False)
    return PhantomSpec(
        tuple(
            Lesion(*quadrants[q], size=SIZES[rng.integers(2)], density=DENSITIES[rng.integers(2)])
            for q in chosen
        )
    )


def _centre(side: str, level: str) -> tuple[float, float]:
    # Patient's right is the image's left (negative x); upper is negative y.
    return (-_OFFSET if side == "right" else _OFFSET, -_OFFSET if level == "upper" else _OFFSET)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the image side, origin at the centre."""
    y = (np.arange(height, dtype=np.float64) + 0.5) / height - 0.5
    x = (np.arange(width, dtype=np.float64) + 0.5) / width - 0.5
    return np.meshgrid(x, y)


def render(spec: PhantomSpec, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw `spec` as a `size` x `size` grayscale ("L") PIL image.

    Small random jitter (body outline, tissue level and gradient, lesion position/radius/contrast,
    pixel noise) keeps images varied while leaving the attributes unambiguous.
    """
    _check_size(size)
    x, y = _grid(size, size)
    background = rng.uniform(10.0, 22.0)
    tissue = rng.uniform(118.0, 138.0)
    cx, cy = rng.uniform(-0.01, 0.01, size=2)
    ax, ay = np.array(_BODY_AXES) + rng.uniform(-0.01, 0.0, size=2)
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    level = tissue + rng.uniform(-4.0, 4.0) * y * 2  # a gentle top-to-bottom exposure gradient
    img = np.where(body, level, background)
    for lesion in spec.lesions:
        ex, ey = np.array(_centre(lesion.side, lesion.level)) + rng.uniform(-_JITTER, _JITTER, size=2)
        radius = _RADIUS[lesion.size] * rng.uniform(0.92, 1.08)
        contrast = rng.uniform(*_CONTRAST) * (1.0 if lesion.density == "bright" else -1.0)
        # Anti-aliased disc: coverage ramps over one pixel at the rim.
        dist = np.hypot(x - ex, y - ey)
        cover = np.clip((radius - dist) * size + 0.5, 0.0, 1.0)
        img = img + cover * contrast
    img = img + rng.normal(0.0, 3.0, size=img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="L")


# Report phrasing. Synonyms are few and regular: the demo trains a tiny tokenizer on them.
_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
_DENSITY_WORDS = {"bright": ("dense", "bright", "hyperdense"), "dark": ("lucent", "dark", "hypodense")}
_NOUNS = ("lesion", "nodule", "focus")
_OPENERS = ("Frontal chest radiograph.", "Frontal view of the chest.")
_NORMAL = ("No focal lesion.", "No focal lesion is seen.", "The lungs are clear.", "No focal abnormality.")
_TEMPLATES = (
    "A {size} {density} {noun} in the {side} {level} {zone}.",
    "There is a {size} {density} {noun} in the {side} {level} {zone}.",
    "{Size} {density} {noun} projecting over the {level} zone of the {side} lung.",
    "The {side} {level} zone shows a {size} {density} {noun}.",
)


def write_report(spec: PhantomSpec, rng: np.random.Generator) -> str:
    """A short report stating exactly the lesions of `spec` (sides are the patient's)."""
    sentences = [_OPENERS[rng.integers(len(_OPENERS))]] if rng.random() < 0.5 else []
    if not spec.lesions:
        sentences.append(_NORMAL[rng.integers(len(_NORMAL))])
    # Findings in a fixed reading order (right before left, upper before lower), as a systematic
    # report would list them: a small generative model then only has to bind each sentence to
    # its quadrant, not also guess the order.
    for lesion in spec.lesions:
        if lesion.size is None or lesion.density is None:
            raise ValueError(f"spec: lesion {lesion} has no size or density to report")
        size = _SIZE_WORDS[lesion.size][rng.integers(2)]
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        sentences.append(
            template.format(
                size=size,
                Size=size.capitalize(),
                density=_DENSITY_WORDS[lesion.density][rng.integers(3)],
                noun=_NOUNS[rng.integers(len(_NOUNS))],
                side=lesion.side,
                level=lesion.level,
                zone=("zone", "lung")[rng.integers(2)],
            )
        )
    return " ".join(sentences)


def make_pair(
    rng_or_seed: int | np.random.Generator, size: int = 64, spec: PhantomSpec | None = None
) -> tuple[Image.Image, str, PhantomSpec]:
    """One phantom pair: `(image, report, spec)`.

    `spec` is drawn with `random_spec` unless given. The same seed always gives the same pair.

    Example:
        >>> image, report, spec = make_pair(3, size=64)
        >>> image.size, image.mode
        ((64, 64), 'L')
    """
    _check_size(size)
    if spec is not None and not isinstance(spec, PhantomSpec):
        raise TypeError(f"spec must be a PhantomSpec or None, got {type(spec).__name__}")
    rng = _rng(rng_or_seed)
    spec = random_spec(rng) if spec is None else spec
    report = write_report(spec, rng)
    return render(spec, rng, size), report, spec


def make_dataset(n: int, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, str, PhantomSpec]]:
    """`n` pairs; pair `i` comes from the RNG seeded with `[seed, i]`, so it does not depend on `n`."""
    _check_int(n, "n", minimum=0)
    _check_int(seed, "seed", minimum=0)
    _check_size(size)
    return [make_pair(np.random.default_rng([int(seed), i]), size) for i in range(n)]


_WORD_TO_SIZE = {w: k for k, ws in _SIZE_WORDS.items() for w in ws}
_WORD_TO_DENSITY = {w: k for k, ws in _DENSITY_WORDS.items() for w in ws}


def _first(words: list[str], vocabulary: dict[str, str] | Sequence[str]) -> str | None:
    for w in words:
        if w in vocabulary:
            return vocabulary[w] if isinstance(vocabulary, dict) else w
    return None


def parse_report(text: str, strict: bool = True) -> PhantomSpec:
    """Read the lesions back from a report.

    A sentence naming a side (right/left) or a level (upper/lower) describes one lesion. With
    `strict=True` (for reports written by `write_report`) a lesion sentence missing any attribute,
    or a second lesion in one quadrant, raises ValueError. With `strict=False` (for generated text)
    such sentences keep what they can: a sentence without both side and level is dropped, a missing
    size/density becomes None, and only the first lesion per quadrant is kept.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lesions: dict[tuple[str, str], Lesion] = {}
    for sentence in re.split(r"[.\n;]+", text.lower()):
        words = re.findall(r"[a-z]+", sentence)
        side, level = _first(words, SIDES), _first(words, LEVELS)
        if side is None and level is None:
            continue
        size, density = _first(words, _WORD_TO_SIZE), _first(words, _WORD_TO_DENSITY)
        complete = None not in (side, level, size, density)
        if strict and (not complete or (side, level) in lesions):
            problem = "repeats a quadrant" if complete else "misses side, level, size or density"
            raise ValueError(f"text: sentence {sentence.strip()!r} {problem}")
        if side is None or level is None or (side, level) in lesions:
            continue
        lesions[(side, level)] = Lesion(side, level, size, density)
    return PhantomSpec(tuple(lesions.values()))


def read_image(image: Image.Image | np.ndarray) -> PhantomSpec:
    """Detect the lesions of a phantom image (any size and mode; RGB is converted to gray).

    For each quadrant, the pixels of a disc around the nominal lesion centre are compared with the
    tissue level (median of the body interior): a lesion is present when enough of them differ by
    more than a fixed threshold; its density is the sign of the difference and its size follows
    from the covered fraction of the disc.
    """
    if isinstance(image, Image.Image):
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    elif isinstance(image, np.ndarray) and image.ndim == 2:
        pixels = image.astype(np.float64)
    else:
        raise TypeError("image must be a PIL image or a 2-D numpy array of 0-255 gray levels")
    height, width = pixels.shape
    if min(height, width) < _MIN_SIZE // 2:
        raise ValueError(f"image must be at least {_MIN_SIZE // 2} pixels on each side, got {width}x{height}")
    x, y = _grid(height, width)
    # The body interior, well inside the outline so that blur at the rim does not leak in.
    inner = (x / (_BODY_AXES[0] - 0.08)) ** 2 + (y / (_BODY_AXES[1] - 0.08)) ** 2 <= 1.0
    tissue = float(np.median(pixels[inner]))
    lesions = []
    for side in SIDES:
        for level in LEVELS:
            ex, ey = _centre(side, level)
            window = pixels[np.hypot(x - ex, y - ey) <= _WINDOW] - tissue
            bright = float(np.mean(window > _THRESHOLD))
            dark = float(np.mean(window < -_THRESHOLD))
            covered = max(bright, dark)
            if covered < _PRESENT_FRACTION:
                continue
            size = "large" if covered > _LARGE_FRACTION else "small"
            lesions.append(Lesion(side, level, size, "bright" if bright >= dark else "dark"))
    return PhantomSpec(tuple(lesions))


@dataclass(frozen=True)
class PhantomScores:
    """Agreement of predicted phantoms with the truth.

    - `exact`: fraction of pairs whose attributes all match.
    - `count`: fraction with the right number of lesions.
    - `presence`: fraction of the 4 x n quadrants whose presence/absence matches.
    - `attributes`: fraction of the 4 x n quadrants whose whole description matches: no lesion in
      either, or a lesion of the same size and density in both (what `medim.demo` reports).
    - `size`, `density`: accuracy over quadrants where both hold a lesion (nan if there are none).
    """

    n: int
    exact: float
    count: float
    presence: float
    attributes: float
    size: float
    density: float
    matched: int = field(default=0)  # quadrants holding a lesion in both (the size/density denominator)


def compare(predicted: Sequence[PhantomSpec], reference: Sequence[PhantomSpec]) -> PhantomScores:
    """Score `predicted` specs (from `read_image` or `parse_report`) against `reference` specs.

    Example:
        >>> pairs = make_dataset(8, seed=1)
        >>> compare([read_image(im) for im, _, _ in pairs], [s for _, _, s in pairs]).exact
        1.0
    """
    if len(predicted) != len(reference):
        raise ValueError(
            f"predicted and reference must have the same length, got {len(predicted)} and {len(reference)}"
        )
    if not reference:
        raise ValueError("reference must hold at least one PhantomSpec")
    exact = count = presence = attributes = size = density = matched = 0
    for pred, ref in zip(predicted, reference):
        exact += pred == ref
        count += len(pred.lesions) == len(ref.lesions)
        for side in SIDES:
            for level in LEVELS:
                p, r = pred.at(side, level), ref.at(side, level)
                presence += (p is None) == (r is None)
                attributes += p == r
                if p is not None and r is not None:
                    matched += 1
                    size += p.size == r.size
                    density += p.density == r.density
    n = len(reference)
    return PhantomScores(
        n=n,
        exact=exact / n,
        count=count / n,
        presence=presence / (4 * n),
        attributes=attributes / (4 * n),
        size=size / matched if matched else math.nan,
        density=density / matched if matched else math.nan,
        matched=matched,
    )
