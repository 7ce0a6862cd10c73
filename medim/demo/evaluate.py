"""Scoring the demo: the three tasks on held-out phantoms, read back by the phantom readers of
`medim.data.synthetic` and scored by its `compare`; on a phantom variant (e.g. "effusion", a finding
the shipped model has never seen) too, for models fine-tuned on it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from medim.data import synthetic
from medim.demo.settings import DEMO_NAME, EVAL_SEED, IMAGE_SIZE, PAIR_PROMPTS
from medim.utils.checks import check_choice, check_int

__all__ = ["DemoScores", "evaluate_demo", "scores_table"]

TASKS = ("image_to_report", "text_to_image", "pairs")


@dataclass
class DemoScores:
    """Accuracies of the three tasks on held-out phantoms, measured by the phantom readers.

    Attribute accuracy (`synthetic.PhantomScores.attributes`) is the fraction of the 4 quadrants
    x n images whose whole description (no lesion, or a lesion of the right size and density)
    matches.
    """

    n: int
    num_inference_steps: int  # as run: the pipeline's saved default when none was given
    image_to_report: float  # report written for a phantom vs the phantom's truth
    text_to_image: float  # image generated from a held-out report vs that report's truth
    pairs: float  # generated image vs its generated report
    pairs_with_lesions: float  # generated reports that describe a lesion (phantoms: 2/3); a model
    # that always answers "no lesion" has fully consistent pairs, this shows it
    exact: dict[str, float]  # per task: fraction of images whose every quadrant matches
    nfe: dict[str, int]  # per task: backbone forwards, as the pipeline counts them
    seconds: dict[str, float]  # per task: wall-clock time
    variant: str | None = None  # the phantom variant scored (None: the demo's own phantoms)
    effusion: dict[str, float] | None = None  # variant "effusion", per task: fraction of images whose
    # effusion (none, or its side and size) matches


def evaluate_demo(pipe=None, n: int = 200, num_inference_steps: int | None = None, seed: int = 0,
                  batch_size: int = 50, *, variant: str | None = None) -> DemoScores:
    """Score the demo (or any phantom-trained pipeline) on `n` held-out phantoms (fixed seed), with
    the pipeline's saved sampler settings (`num_inference_steps` overrides their step count).

    `variant` (one of `synthetic.VARIANTS`) scores on that phantom variant instead, read by the
    variant's readers; "effusion" adds each task's effusion accuracy to the three numbers;
    "structured" reads generated reports by their lobe abbreviations only.

    Example:
        >>> scores = evaluate_demo(n=50)   # the shipped model
        >>> scores.image_to_report, scores.exact["image_to_report"]
        >>> evaluate_demo(MeDiMPipeline.from_pretrained("my-effusion-lora"), variant="effusion").effusion
    """
    from medim.pipelines.pipeline import MeDiMPipeline

    check_int(n, "n", minimum=1)
    if variant is not None:
        check_choice(variant, "variant", synthetic.VARIANTS)
    if pipe is None:
        pipe = MeDiMPipeline.from_pretrained(DEMO_NAME)
    if num_inference_steps is None:
        num_inference_steps = pipe.sampler_config.num_inference_steps
    images, reports, truth = zip(*synthetic.make_dataset(n, seed=EVAL_SEED, size=IMAGE_SIZE, variant=variant))
    seconds, nfe = {}, {}

    def timed(task, method, inputs):
        start = time.perf_counter()
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(n)]
        out = method(list(inputs), generator=generators, num_inference_steps=num_inference_steps,
                     batch_size=batch_size)
        seconds[task], nfe[task] = round(time.perf_counter() - start, 2), out.nfe
        return out

    written = timed("image_to_report", pipe.image_to_report, images)
    drawn = timed("text_to_image", pipe.text_to_image, reports)
    pairs = timed("pairs", pipe.generate_pairs, [PAIR_PROMPTS[i % len(PAIR_PROMPTS)] for i in range(n)])
    # Generated text is read leniently: a sentence naming no quadrant describes no lesion.
    said = [synthetic.parse_report(r, strict=False, variant=variant) for r in pairs.reports]
    scores = {
        "image_to_report": synthetic.compare(
            [synthetic.parse_report(r, strict=False, variant=variant) for r in written.reports], truth),
        "text_to_image": synthetic.compare([synthetic.read_image(im, variant=variant) for im in drawn.images], truth),
        "pairs": synthetic.compare([synthetic.read_image(im, variant=variant) for im in pairs.images], said),
    }
    return DemoScores(
        n=n, num_inference_steps=num_inference_steps,
        image_to_report=scores["image_to_report"].attributes, text_to_image=scores["text_to_image"].attributes,
        pairs=scores["pairs"].attributes, pairs_with_lesions=sum(bool(spec.lesions) for spec in said) / n,
        exact={task: s.exact for task, s in scores.items()}, nfe=nfe, seconds=seconds, variant=variant,
        effusion={task: s.effusion for task, s in scores.items()} if variant == "effusion" else None,
    )


def scores_table(scores: DemoScores) -> str:
    """A small text table of `evaluate_demo` results, with the targets the shipped model meets.

    Example:
        >>> print(scores_table(evaluate_demo(n=50)))
    """
    rows = [("image -> report", scores.image_to_report, 0.90), ("text -> image", scores.text_to_image, 0.80),
            ("pairs consistent", scores.pairs, 0.80)]
    lines = [f"{'task':<18}{'attribute acc.':>15}{'target':>8}{'all 4 right':>13}", "-" * 54]
    lines += [f"{name:<18}{v:>15.3f}{t:>8.2f}{scores.exact[k]:>13.3f}" for (name, v, t), k in zip(rows, TASKS)]
    share = "" if scores.variant else " (phantoms: 0.667)"
    lines.append(f"generated pairs describing a lesion: {scores.pairs_with_lesions:.3f}{share}")
    if scores.effusion is not None:
        lines.append("effusion (none, or side and size) acc.: "
                     + ", ".join(f"{name} {scores.effusion[k]:.3f}" for (name, _, _), k in zip(rows, TASKS)))
    held_out = f"held-out {scores.variant} phantoms" if scores.variant else "held-out phantoms"
    lines.append(f"n={scores.n} {held_out}, {scores.num_inference_steps} steps")
    lines.append("network evaluations (backbone forward passes, all batches) and seconds: " + ", ".join(
        f"{name} {scores.nfe[k]} in {scores.seconds[k]:.1f} s" for (name, _, _), k in zip(rows, TASKS)))
    return "\n".join(lines)
