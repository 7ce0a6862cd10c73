"""`medim distill --config cfg.yaml [section.key=value ...]`: a few-step student of a MeDiM pipeline.

Self-distillation through time or sequence-level distillation (docs/training.md, "Distillation")
on medim's trainer: the same config file and dotted overrides as `medim train` plus the `distill`
section, one process or torchrun (`torchrun -m medim.training --config cfg.yaml` with
`distill.teacher` set is the same run). The result, `train.output_dir/final`, is a normal pipeline
that samples in `distill.student_steps` steps.
"""

from __future__ import annotations

import argparse
import textwrap

HELP = "distil a pipeline into a student that samples in a few steps (same config and runs as train)"

# The `distill` section, as `medim.training.config.DistillSection` documents it (kept torch-free
# here for --help; tests/integration/test_distill.py checks that every option is listed).
DISTILL_OPTIONS = {
    "teacher": "the pipeline to distil: a folder, a bundled name (medim-demo) or a Hub id (required); the "
               "student starts from its weights (model.init defaults to it)",
    "teacher_revision": "Hub revision of the teacher (default: null)",
    "method": "sdtt (the student matches the teacher's step distributions, self-distillation through time) or "
              "sequence (the teacher writes every training image's report once, under shared noise, and the "
              "student learns them with the diffusion loss) (default: sdtt)",
    "student_steps": "sampler steps of the student, saved as its num_inference_steps (default: 4)",
    "teacher_steps": "teacher steps the student's run replaces: a multiple of student_steps, at least twice it; "
                     "each student step learns teacher_steps / student_steps teacher steps (default: 32)",
    "guidance_scale": "the teacher's classifier-free guidance in the targets (default: null = its saved value); "
                      "when > 0 it is folded in: the student samples unguided, one forward row per step",
    "divergence": "kl (KL(teacher || student) over the masked positions, as SDTT) or mse (squared log-prob "
                  "error) (default: kl)",
    "task_mix": "relative weights of text-to-image, image-to-report and pair rows (default: [1, 1, 1])",
    "noise_scale": "sequence: weight of the shared Gumbel noise the teacher's reports are written under; 0 "
                   "writes greedily (default: 0.5)",
    "noise_seed": "sequence: seed of that noise, which picks the phrasing the student learns (default: 0)",
    "student_sampler": "sampler settings the student saves over the teacher's at student_steps, e.g. "
                       "distill.student_sampler.confidence_temperature=1.0; may change on resume (default: {})",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def wrap(text: str, indent: str = "") -> str:
        return textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent + ("    " if indent else ""))

    parser.epilog = "\n".join([
        wrap("The config holds every training section (model, data, optim, train, log, eval, checkpoint: see "
             "`medim train --help` and docs/training.md, \"Distillation\") and the distill section:"),
        *(wrap(f"distill.{name}: {what}", "  ") for name, what in DISTILL_OPTIONS.items()),
        "",
        wrap("data.cache is a token cache built with the teacher (`medim cache`): its reports and images are the "
             "conditions and the states the student learns from. Example:"),
        "  medim distill --config configs/distill_demo.yaml data.cache=cache/demo-phantoms --evaluate-demo 200",
    ])
    parser.add_argument("--config", default=None, help="YAML config file (omit to start from the defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="config overrides, e.g. distill.teacher=medim-demo data.cache=cache/demo distill.student_steps=8",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--evaluate-demo", type=int, default=0, metavar="N",
                        help="for a student of a phantom model (the demo): score it on N held-out phantoms "
                             "(`medim demo --evaluate`'s measures) before it is saved and put the scores in its "
                             "model card (default: 0, off)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from medim.commands.common import finish_training_run
    from medim.training import TrainingDiverged, load_config
    from medim.training.checkpoint import CheckpointError
    from medim.training.distill import distill
    from medim.training.resume import ResumeRefused

    if args.evaluate_demo < 0:
        raise SystemExit(f"medim distill: --evaluate-demo must be >= 0, got {args.evaluate_demo}")
    config = load_config(args.config, args.overrides)
    if not config.distill.teacher:
        raise SystemExit("medim distill: config option distill.teacher: expected the pipeline to distil "
                         "(a folder, a bundled name such as medim-demo, or a Hub id)")
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    try:
        out = distill(config, evaluate=_demo_scores(args.evaluate_demo) if args.evaluate_demo else None)
    except (TrainingDiverged, ResumeRefused, CheckpointError) as e:  # expected stops: the message, no traceback
        raise SystemExit(f"medim distill: {e}") from None
    last = next((r for r in reversed(out.history) if "loss" in r), {})
    loss = f" (last logged loss {last['loss']:.4g})" if "loss" in last else ""
    return finish_training_run("medim distill", config, out, f"student pipeline ({config.distill.student_steps} "
                               f"steps) in {out.final_dir}{loss}")


def _demo_scores(n: int):
    """`evaluate` for the distiller: the three demo accuracies and the lesion share of pairs."""
    def scores(pipe) -> dict[str, float]:
        from medim.demo import evaluate_demo

        s = evaluate_demo(pipe, n=n)
        return {f"image -> report (n={n})": s.image_to_report, f"text -> image (n={n})": s.text_to_image,
                f"pairs consistent (n={n})": s.pairs, f"pairs describing a lesion (n={n})": s.pairs_with_lesions}
    return scores
