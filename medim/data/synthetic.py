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

The opt-in `variant="effusion"` adds a finding the shipped demo has never seen: in 2 of 3 phantoms a
small or large pleural effusion, bright fluid filling the base of one hemithorax under a meniscus
that rises towards the chest wall ("A small right pleural effusion."). It obscures the lower zone of
its side, so no lesion is drawn there, and comes with at most one lesion, so that every report fits
the demo's 40 report tokens (its tokenizer spells "pleural effusion" in letters). Without the
variant every draw, image and report is what it always was, seed for seed; `read_image(...,
variant="effusion")` reads the effusion back (the default reader does not look for one),
`parse_report` always reads effusion sentences.

The opt-in `variant="multiple"` draws 3 or 4 lesions, more than any base phantom holds, reported
in one list sentence ("Multiple nodules: right upper small dense, left lower big lucent, left upper
tiny dark."); the demo's VQGAN draws them like any lesion, so an adapter can learn it in both
directions. Both readers read it as they read any phantom.

The opt-in `variant="structured"` draws phantoms as the base does (0-2 lesions; seed for seed the
same specs, drawn alike) and writes their reports as another site would, in a structured form with
lobe abbreviations the demo has never seen: "Findings: RUL small dense nodule; LLL big lucent
focus." or "Findings: none.". `parse_report` reads the abbreviations in any report;
`parse_report(..., variant="structured")` reads only them, so a report in the base phantoms' prose
reads as describing no lesion (what a structured-report reader makes of it).

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
    "VARIANTS",
    "Lesion",
    "Effusion",
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

VARIANTS = ("effusion", "multiple", "structured")  # opt-in phantom variants (`variant=` of random_spec, make_pair, ...)
# An effusion fills its hemithorax below a surface at `top` (by size) medially that rises by
# _MENISCUS at the chest wall. A small one stays below every lesion but the obscured lower one; a
# large one reaches the middle of the lung, still clear of the upper zone's detector window.
_EFFUSION_TOP = {"small": (0.24, 0.27), "large": (0.04, 0.07)}
_MENISCUS, _WALL = 0.08, 0.4  # the rise, reached at this lateral distance
# Where the reader looks, as (lateral u, y) boxes on the effusion's side: the base (any effusion
# fills it, no other lesion reaches it) and a band only a large one reaches.
_EFFUSION_BASE = ((0.04, 0.20), (0.30, 0.39))
_EFFUSION_LARGE = ((0.08, 0.30), (0.10, 0.16))


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
class Effusion:
    """A pleural effusion (`variant="effusion"`): the patient's `side` and its `size`.

    `size` may be None only in what `parse_report(strict=False)` returns.
    """

    side: str
    size: str | None

    def __post_init__(self) -> None:
        _check("effusion side", self.side, SIDES)
        _check("effusion size", self.size, (*SIZES, None))


@dataclass(frozen=True)
class PhantomSpec:
    """What a phantom shows: up to four lesions, at most one per quadrant (kept sorted), and in the
    effusion variant at most one pleural effusion."""

    lesions: tuple[Lesion, ...] = ()
    effusion: Effusion | None = None

    def __post_init__(self) -> None:
        lesions = tuple(sorted(self.lesions, key=lambda x: (SIDES.index(x.side), LEVELS.index(x.level))))
        quadrants = [lesion.quadrant for lesion in lesions]
        if len(set(quadrants)) != len(quadrants):
            raise ValueError(f"lesions: at most one lesion per quadrant, got {quadrants}")
        if self.effusion is not None and not isinstance(self.effusion, Effusion):
            raise TypeError(f"effusion must be an Effusion or None, got {type(self.effusion).__name__}")
        object.__setattr__(self, "lesions", lesions)

    def at(self, side: str, level: str) -> Lesion | None:
        """The lesion in a quadrant, or None."""
        return next((x for x in self.lesions if x.quadrant == (side, level)), None)

    def to_dict(self) -> dict:
        """JSON-friendly form (used as dataset metadata); "effusion" only when there is one."""
        data = {"lesions": [vars(lesion).copy() for lesion in self.lesions]}
        if self.effusion is not None:
            data["effusion"] = vars(self.effusion).copy()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PhantomSpec:
        effusion = data.get("effusion")
        return cls(tuple(Lesion(**lesion) for lesion in data["lesions"]),
                   Effusion(**effusion) if effusion is not None else None)


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


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be None or one of {list(VARIANTS)}, got {variant!r}")


def random_spec(rng: np.random.Generator, variant: str | None = None) -> PhantomSpec:
    """Draw 0, 1 or 2 lesions (equally likely) in distinct quadrants with random attributes.

    `variant="effusion"` first draws an effusion (none, right or left, equally likely; small or
    large) and then the lesions among the quadrants it leaves visible; with an effusion, 0 or 1
    lesion. `variant="multiple"` draws 3 or 4 lesions (equally likely). Without a variant the draws
    are exactly the base phantoms'.
    """
    _check_variant(variant)
    effusion = None
    if variant == "effusion":
        side = (None, *SIDES)[rng.integers(3)]
        effusion = Effusion(side, SIZES[rng.integers(2)]) if side is not None else None
    if variant == "multiple":
        count = 3 + int(rng.integers(2))
    else:
        count = int(rng.integers(0, 3 if effusion is None else 2))
    quadrants = [(s, lv) for s in SIDES for lv in LEVELS if effusion is None or (s, lv) != (effusion.side, "lower")]
    chosen = rng.choice(len(quadrants), size=count, replace=False)
    return PhantomSpec(
        tuple(
            Lesion(*quadrants[q], size=SIZES[rng.integers(2)], density=DENSITIES[rng.integers(2)])
            for q in chosen
        ),
        effusion,
    )


def _centre(side: str, level: str) -> tuple[float, float]:
    # Patient's right is the image's left (negative x); upper is negative y.
    return (-_OFFSET if side == "right" else _OFFSET, -_OFFSET if level == "upper" else _OFFSET)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of the image side, origin at the centre."""
    y = (np.arange(height, dtype=np.float64) + 0.5) / height - 0.5
    x = (np.arange(width, dtype=np.float64) + 0.5) / width - 0.5
    return np.meshgrid(x, y)


def _lateral(x: np.ndarray, side: str) -> np.ndarray:
    """Distance from the midline towards the chest wall on the patient's `side` (negative beyond)."""
    return -x if side == "right" else x


def _effusion_cover(effusion: Effusion, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                    size: int) -> np.ndarray:
    """Coverage in [0, 1] of the fluid: below the meniscus, on its side of the midline (anti-aliased
    over one pixel, like the lesions)."""
    u = _lateral(x, effusion.side)
    surface = rng.uniform(*_EFFUSION_TOP[effusion.size]) - _MENISCUS * np.clip(u / _WALL, 0.0, 1.0) ** 2
    return np.clip((y - surface) * size + 0.5, 0.0, 1.0) * np.clip(u * size + 0.5, 0.0, 1.0)


def render(spec: PhantomSpec, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw `spec` as a `size` x `size` grayscale ("L") PIL image.

    Small random jitter (body outline, tissue level and gradient, lesion position/radius/contrast,
    effusion level and contrast, pixel noise) keeps images varied while leaving the attributes
    unambiguous. A spec without an effusion draws exactly what it always did.
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
    if spec.effusion is not None:  # fluid is dense: bright, inside the body only
        if spec.effusion.size is None:
            raise ValueError(f"spec: effusion {spec.effusion} has no size to draw")
        img = img + body * _effusion_cover(spec.effusion, x - cx, y, rng, size) * rng.uniform(*_CONTRAST)
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
# Three or four lesions ("multiple" variant) are listed in one sentence, a clause per lesion, so
# that four fit the demo's 40 report tokens.
_MULTIPLE_NOUNS = ("lesions", "nodules", "foci")
# The "structured" variant's lobe abbreviations (patient's side, level).
_LOBES = {("right", "upper"): "RUL", ("right", "lower"): "RLL", ("left", "upper"): "LUL", ("left", "lower"): "LLL"}
_LOBE_WORDS = {abbreviation.lower(): quadrant for quadrant, abbreviation in _LOBES.items()}
_EFFUSION_TEMPLATES = (  # short ones: with an opener and a lesion at most 39 tokens of the demo's tokenizer
    "A {size} {side} pleural effusion.",
    "There is a {size} {side} pleural effusion.",
    "{Size} {side} pleural effusion.",
)


def write_report(spec: PhantomSpec, rng: np.random.Generator, *, variant: str | None = None) -> str:
    """A short report stating exactly the lesions of `spec`, then its effusion (sides are the patient's);
    `variant="structured"` writes the structured form (see the module docstring)."""
    for lesion in spec.lesions:
        if lesion.size is None or lesion.density is None:
            raise ValueError(f"spec: lesion {lesion} has no size or density to report")
    if variant == "structured":
        return _structured_report(spec, rng)
    sentences = [_OPENERS[rng.integers(len(_OPENERS))]] if rng.random() < 0.5 else []
    if not spec.lesions and spec.effusion is None:
        sentences.append(_NORMAL[rng.integers(len(_NORMAL))])
    if len(spec.lesions) > 2:
        sentences.append(_multiple_sentence(spec.lesions, rng))
    else:
        # Findings in a fixed reading order (right before left, upper before lower), as a systematic
        # report would list them: a small generative model then only has to bind each sentence to
        # its quadrant, not also guess the order.
        sentences += [_lesion_sentence(lesion, rng) for lesion in spec.lesions]
    if spec.effusion is not None:
        if spec.effusion.size is None:
            raise ValueError(f"spec: effusion {spec.effusion} has no size to report")
        size = _SIZE_WORDS[spec.effusion.size][rng.integers(2)]
        template = _EFFUSION_TEMPLATES[rng.integers(len(_EFFUSION_TEMPLATES))]
        sentences.append(template.format(size=size, Size=size.capitalize(), side=spec.effusion.side))
    return " ".join(sentences)


def _lesion_sentence(lesion: Lesion, rng: np.random.Generator) -> str:
    size = _SIZE_WORDS[lesion.size][rng.integers(2)]
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return template.format(size=size, Size=size.capitalize(), density=_DENSITY_WORDS[lesion.density][rng.integers(3)],
                           noun=_NOUNS[rng.integers(len(_NOUNS))], side=lesion.side, level=lesion.level,
                           zone=("zone", "lung")[rng.integers(2)])


def _structured_report(spec: PhantomSpec, rng: np.random.Generator) -> str:
    """"Findings: RUL small dense nodule; LLL big lucent focus." (or "Findings: none.")."""
    if spec.effusion is not None:
        raise ValueError("spec: the structured report form has no effusion sentence")
    clauses = [f"{_LOBES[lesion.quadrant]} {_SIZE_WORDS[lesion.size][rng.integers(2)]} "
               f"{_DENSITY_WORDS[lesion.density][rng.integers(3)]} {_NOUNS[rng.integers(len(_NOUNS))]}"
               for lesion in spec.lesions]
    return "Findings: " + ("; ".join(clauses) if clauses else "none") + "."


def _multiple_sentence(lesions: Sequence[Lesion], rng: np.random.Generator) -> str:
    """"Multiple nodules: right upper small dense, left lower big lucent, ...": one clause per lesion."""
    clauses = [f"{lesion.side} {lesion.level} {_SIZE_WORDS[lesion.size][rng.integers(2)]} "
               f"{_DENSITY_WORDS[lesion.density][rng.integers(3)]}" for lesion in lesions]
    return f"Multiple {_MULTIPLE_NOUNS[rng.integers(len(_MULTIPLE_NOUNS))]}: " + ", ".join(clauses) + "."


def make_pair(
    rng_or_seed: int | np.random.Generator, size: int = 64, spec: PhantomSpec | None = None, *,
    variant: str | None = None,
) -> tuple[Image.Image, str, PhantomSpec]:
    """One phantom pair: `(image, report, spec)`.

    `spec` is drawn with `random_spec(rng, variant)` unless given. The same seed always gives the
    same pair.

    Example:
        >>> image, report, spec = make_pair(3, size=64)
        >>> image.size, image.mode
        ((64, 64), 'L')
    """
    _check_size(size)
    _check_variant(variant)
    if spec is not None and not isinstance(spec, PhantomSpec):
        raise TypeError(f"spec must be a PhantomSpec or None, got {type(spec).__name__}")
    rng = _rng(rng_or_seed)
    spec = random_spec(rng, variant) if spec is None else spec
    report = write_report(spec, rng, variant=variant)
    return render(spec, rng, size), report, spec


def make_dataset(n: int, seed: int = 0, size: int = 64, *,
                 variant: str | None = None) -> list[tuple[Image.Image, str, PhantomSpec]]:
    """`n` pairs; pair `i` comes from the RNG seeded with `[seed, i]`, so it does not depend on `n`.

    Example:
        >>> [spec.effusion for _, _, spec in make_dataset(3, seed=1, variant="effusion")]
    """
    _check_int(n, "n", minimum=0)
    _check_int(seed, "seed", minimum=0)
    _check_size(size)
    _check_variant(variant)
    return [make_pair(np.random.default_rng([int(seed), i]), size, variant=variant) for i in range(n)]


_WORD_TO_SIZE = {w: k for k, ws in _SIZE_WORDS.items() for w in ws}
_WORD_TO_DENSITY = {w: k for k, ws in _DENSITY_WORDS.items() for w in ws}


def _first(words: list[str], vocabulary: dict[str, str] | Sequence[str]) -> str | None:
    for w in words:
        if w in vocabulary:
            return vocabulary[w] if isinstance(vocabulary, dict) else w
    return None


def parse_report(text: str, strict: bool = True, *, variant: str | None = None) -> PhantomSpec:
    """Read the lesions (and an effusion) back from a report.

    A sentence naming an effusion describes the effusion (side and size); any other sentence naming
    a side (right/left) or a level (upper/lower), or a lobe abbreviation (RUL, RLL, LUL, LLL),
    describes one lesion. `variant="structured"` reads lesions only from lobe abbreviations. With `strict=True` (for
    reports written by `write_report`) a sentence missing any attribute, or a second lesion in one
    quadrant or a second effusion, raises ValueError. With `strict=False` (for generated text) such
    sentences keep what they can: a lesion without both side and level or an effusion without a
    side is dropped, a missing size/density becomes None, and only the first lesion per quadrant
    and the first effusion are kept.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _check_variant(variant)
    lesions: dict[tuple[str, str], Lesion] = {}
    effusions: list[Effusion] = []
    for sentence in re.split(r"[.\n;,]+", text.lower()):  # a comma ends a clause of the "multiple" list
        words = re.findall(r"[a-z]+", sentence)
        if "effusion" in words:
            _parse_effusion(sentence, words, effusions, strict)
            continue
        lobe = _first(words, _LOBE_WORDS)
        if lobe is not None:
            side, level = lobe
        elif variant == "structured":
            continue  # its reader knows the lobes by their abbreviations only
        else:
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
    return PhantomSpec(tuple(lesions.values()), effusions[0] if effusions else None)


def _parse_effusion(sentence: str, words: list[str], found: list[Effusion], strict: bool) -> None:
    side, size = _first(words, SIDES), _first(words, _WORD_TO_SIZE)
    if strict and (side is None or size is None or found):
        problem = "repeats the effusion" if found else "misses the effusion's side or size"
        raise ValueError(f"text: sentence {sentence.strip()!r} {problem}")
    if side is not None and not found:
        found.append(Effusion(side, size))


def _read_effusion(pixels: np.ndarray, x: np.ndarray, y: np.ndarray, tissue: float) -> Effusion | None:
    """The effusion whose base box is the most filled with bright pixels (at least half of it), large
    when its band higher up is filled too."""

    def filled(side: str, box: tuple) -> float:
        (u0, u1), (y0, y1) = box
        u = _lateral(x, side)
        return float(np.mean(pixels[(u > u0) & (u < u1) & (y > y0) & (y < y1)] - tissue > _THRESHOLD))

    base = {side: filled(side, _EFFUSION_BASE) for side in SIDES}
    side = max(SIDES, key=base.get)
    if base[side] < 0.5:
        return None
    return Effusion(side, "large" if filled(side, _EFFUSION_LARGE) > 0.5 else "small")


def read_image(image: Image.Image | np.ndarray, *, variant: str | None = None) -> PhantomSpec:
    """Detect the lesions of a phantom image (any size and mode; RGB is converted to gray).

    For each quadrant, the pixels of a disc around the nominal lesion centre are compared with the
    tissue level (median of the body interior): a lesion is present when enough of them differ by
    more than a fixed threshold; its density is the sign of the difference and its size follows
    from the covered fraction of the disc. `variant="effusion"` also looks for an effusion (bright
    fluid filling a box at one lung base; large when it also fills a band higher up) and reads no
    lesion in the lower zone it obscures.
    """
    _check_variant(variant)
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
    effusion = _read_effusion(pixels, x, y, tissue) if variant == "effusion" else None
    lesions = []
    for side in SIDES:
        for level in LEVELS:
            if effusion is not None and (side, level) == (effusion.side, "lower"):
                continue
            ex, ey = _centre(side, level)
            window = pixels[np.hypot(x - ex, y - ey) <= _WINDOW] - tissue
            bright = float(np.mean(window > _THRESHOLD))
            dark = float(np.mean(window < -_THRESHOLD))
            covered = max(bright, dark)
            if covered < _PRESENT_FRACTION:
                continue
            size = "large" if covered > _LARGE_FRACTION else "small"
            lesions.append(Lesion(side, level, size, "bright" if bright >= dark else "dark"))
    return PhantomSpec(tuple(lesions), effusion)


@dataclass(frozen=True)
class PhantomScores:
    """Agreement of predicted phantoms with the truth.

    - `exact`: fraction of pairs whose attributes all match.
    - `count`: fraction with the right number of lesions.
    - `presence`: fraction of the 4 x n quadrants whose presence/absence matches.
    - `attributes`: fraction of the 4 x n quadrants whose whole description matches: no lesion in
      either, or a lesion of the same size and density in both (what `medim.demo` reports).
    - `size`, `density`: accuracy over quadrants where both hold a lesion (nan if there are none).
    - `effusion`: fraction of pairs whose effusion matches: none in either, or the same side and
      size in both (1.0 on phantoms without the effusion variant).
    """

    n: int
    exact: float
    count: float
    presence: float
    attributes: float
    size: float
    density: float
    matched: int = field(default=0)  # quadrants holding a lesion in both (the size/density denominator)
    effusion: float = field(default=1.0)


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
    exact = count = presence = attributes = size = density = matched = effusion = 0
    for pred, ref in zip(predicted, reference):
        exact += pred == ref
        effusion += pred.effusion == ref.effusion
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
        effusion=effusion / n,
    )
