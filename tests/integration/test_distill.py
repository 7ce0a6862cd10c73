"""Few-step distillation (`medim distill`, medim.training.distill): the sampler window the targets come
from, the loss, the exported student, bad settings, and a kill + resume to the same bits."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from medim.cli import main
from medim.data.cache import TokenCacheDataset, first_sentence_length, state_sha256
from medim.diffusion import SamplerConfig, masked_before, rollout, sample, tasks, text_to_image, unconditional
from medim.diffusion.schedule import get_schedule
from medim.models.denoiser import ModelDenoiser
from medim.pipelines.pipeline import MeDiMPipeline
from medim.training import load_config
from medim.training.config import DistillSection, resume_differences
from medim.training.distill import METHODS, Distiller, distill_loss
from medim.training.resume import ResumeRefused
from medim.training.sequence import shared_noise, write_reports
from tests.helpers.training import REPO, assert_same_tensors, leave_worker, tiny_run
from tests.integration.test_training_faults import DRIVER


def _distill_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    base, cache = tiny_run(tmp_path)
    return ["--config", str(REPO / "configs/tiny.yaml"), f"distill.teacher={base}", f"data.cache={cache}",
            f"train.output_dir={tmp_path / out}", "distill.student_steps=2", "distill.teacher_steps=4",
            "log.every=1", "eval.every=0", *extra]


def _report_task(pipe, n: int = 3):
    reports = ["A large dense nodule in the right upper zone.", "No focal lesion.", "A small lucent lesion."][:n]
    return text_to_image(pipe.layout, pipe.layout.encode_reports(pipe.tokenizer, reports))


# ---------------------------------------------------------------- the targets: a window of the sampler
@pytest.mark.parametrize("layout, guidance", [("native", 0.0), ("native", 3.0), ("v1", 3.0)])
def test_rollout_continues_the_samplers_run_exactly(request, layout, guidance):
    """From the state `sample` holds before step k, steps [k, 2k) give `sample`'s tokens after step 2k - 1
    (medim-v1: with its per-row size condition, repeated for the guided batch)."""
    pipe = request.getfixturevalue(layout)
    task = _report_task(pipe)
    condition = pipe.layout.condition(pipe.tokenizer, [(pipe.image_resolution,) * 2] * task.x.shape[0])
    config = SamplerConfig(num_inference_steps=8, guidance_scale=guidance)
    common = dict(segments=pipe.layout.segments, mask_id=pipe.layout.mask_id, config=config, model_kwargs=condition)
    states = {}
    sample(ModelDenoiser(pipe.model), task.x, task.known, generator=torch.Generator().manual_seed(3),
           callback=lambda i, t, x: states.__setitem__(i, x.clone()), **common)
    for start, stop in ((0, 2), (2, 4), (5, 8)):
        before = states[start - 1] if start else torch.where(task.known, task.x, pipe.layout.mask_id)
        masked = (before == pipe.layout.mask_id).sum(-1)
        assert torch.equal(masked, masked_before(task.known, config, start))
        out = rollout(ModelDenoiser(pipe.model), before, task.known, start=start, stop=stop,
                      generator=torch.Generator().manual_seed(3), **common)
        assert torch.equal(out.tokens, states[stop - 1]), (start, stop)


def test_masked_before_follows_each_strategy():
    known = torch.zeros(2, 10, dtype=torch.bool)
    known[1, :4] = True
    maskgit = SamplerConfig(num_inference_steps=4, schedule="linear")
    counts = [masked_before(known, maskgit, s).tolist() for s in range(5)]
    assert counts[0] == [10, 6] and counts[-1] == [0, 0] and all(a >= b for a, b in zip(counts, counts[1:]))
    ddpm = maskgit.replace(strategy="ddpm")
    assert masked_before(known, ddpm, 0).tolist() == [10, 6] and masked_before(known, ddpm, 2).tolist() == [5, 3]
    with pytest.raises(ValueError, match="threshold"):
        masked_before(known, maskgit.replace(strategy="threshold"), 1)
    with pytest.raises(ValueError, match="step"):
        masked_before(known, maskgit, 5)
    for order in ("halton", "text_first"):  # each modality on its own counts: not what it computes
        with pytest.raises(ValueError, match=f"order='{order}' commits each modality on its own counts"):
            masked_before(known, maskgit.replace(order=order), 1)


class _StepDenoiser:
    """Logits that depend on the position and on sigma only (not on the tokens): a fixed table
    plus sigma times another."""

    def __init__(self, layout, scale: float):
        g = torch.Generator().manual_seed(0)
        self.tables = {s.name: (torch.randn(s.length, s.vocab_size, generator=g),
                                scale * torch.randn(s.length, s.vocab_size, generator=g)) for s in layout.segments}
        self.segments = {s.name: s for s in layout.segments}

    def logits(self, name: str, sigma: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        a, b = self.tables[name]
        idx = slice(None) if pos is None else pos - self.segments[name].start
        return a[idx] + sigma.reshape(-1, 1, 1) * b[idx]

    def __call__(self, x, sigma, positions, **kwargs):
        return {name: self.logits(name, sigma, pos) for name, pos in positions.items()}


def test_targets_are_the_distribution_each_token_was_drawn_from(native):
    """Each masked column's target is the teacher's distribution at the step that committed it
    (found independently, by running the window one step at a time), or the last step's."""
    layout = native.layout
    teacher = _StepDenoiser(layout, scale=1.0)
    task = unconditional(layout, 2)
    config = SamplerConfig(num_inference_steps=12)
    start, stop = 3, 7
    clean = torch.cat([torch.full((2, s.length), s.vocab_start) for s in layout.segments], -1)
    order = torch.rand(task.x.shape, generator=torch.Generator().manual_seed(1)).argsort(-1).argsort(-1)
    x = torch.where(order < masked_before(task.known, config, start)[:, None], layout.mask_id, clean)
    kwargs = dict(segments=layout.segments, mask_id=layout.mask_id, config=config, start=start)
    out = rollout(teacher, x, task.known, stop=stop, generator=torch.Generator().manual_seed(2), **kwargs)
    committed_at = torch.full(x.shape, stop - 1)  # still masked at the end: the last step's distribution
    for i in reversed(range(start, stop)):
        after = rollout(teacher, x, task.known, stop=i + 1, generator=torch.Generator().manual_seed(2), **kwargs)
        committed_at[(x == layout.mask_id) & (after.tokens != layout.mask_id)] = i
    grid = torch.linspace(1, config.time_eps, config.num_inference_steps + 1)
    sigma = get_schedule(config.noise_schedule).sigma(grid)
    for seg in layout.segments:
        pos = out.positions[seg.name]
        for r in range(x.shape[0]):
            for c, p in enumerate(pos.tolist()):
                expected = (teacher.logits(seg.name, sigma[committed_at[r, p]], pos)[0, c].log_softmax(-1)
                            if x[r, p] == layout.mask_id else torch.zeros(seg.vocab_size))
                torch.testing.assert_close(out.logprobs[seg.name][r, c], expected)


def test_loss_is_zero_for_a_student_equal_to_a_step_consistent_teacher(native):
    """A teacher whose outputs do not depend on the state or the time takes k steps as it takes one:
    the student equal to it has loss 0, any other a positive one (kl and mse)."""
    layout = native.layout
    teacher = _StepDenoiser(layout, scale=0.0)
    task = _report_task(native)
    config = SamplerConfig(num_inference_steps=8, guidance_scale=2.0)
    x = torch.where(task.known, task.x, layout.mask_id)
    out = rollout(teacher, x, task.known, segments=layout.segments, mask_id=layout.mask_id, config=config,
                  start=0, stop=4, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(1)
    equal = {s.name: teacher.logits(s.name, zero).expand(3, -1, -1).log_softmax(-1) for s in layout.segments}
    other = {k: (v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))).log_softmax(-1)
             for k, v in equal.items()}
    masked = x == layout.mask_id
    for divergence in ("kl", "mse"):
        # Guidance mixes two equal halves: (1 + w) a - w a = a.
        same = distill_loss([(equal, out.logprobs, out.positions, masked)], layout.segments, divergence)
        assert same.loss.abs() < 1e-5 and int(same.num_tokens) == int(masked.sum())
        assert distill_loss([(other, out.logprobs, out.positions, masked)], layout.segments, divergence).loss > 1e-3


# ---------------------------------------------------------------- the command and its result
@pytest.mark.usefixtures("tiny_run_copy")
def test_distill_writes_a_few_step_pipeline_that_generates(tmp_path, capsys):
    assert main(["distill", *_distill_args(tmp_path, "run", "train.max_steps=3")]) == 0
    final = tmp_path / "run" / "final"
    assert f"student pipeline (2 steps) in {final}" in capsys.readouterr().out
    pipe = MeDiMPipeline.from_pretrained(final)
    teacher = MeDiMPipeline.from_pretrained(tmp_path / "base")
    # The teacher's settings at 2 steps; its guidance (the release's 5) folded in: unguided.
    assert pipe.sampler_config == teacher.sampler_config.replace(num_inference_steps=2, guidance_scale=0.0)
    assert any(not torch.equal(a, b) for a, b in zip(pipe.model.state_dict().values(),
                                                     teacher.model.state_dict().values()))
    out = pipe.text_to_image(["No focal lesion."], generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2 and len(out.images) == 1
    cached = pipe.generate_pairs(["Frontal chest radiograph."], cache_interval=1,
                                 generator=torch.Generator().manual_seed(0))
    plain = pipe.generate_pairs(["Frontal chest radiograph."], generator=torch.Generator().manual_seed(0))
    assert cached.reports == plain.reports
    # `medim generate` runs it as any pipeline, with its saved settings (None: not overridden).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("No focal lesion.\n")
    assert main(["generate", "pairs", "--model", str(final), "--out", str(tmp_path / "gen"), "--prompts", str(prompts),
                 "--device", "cpu"]) == 0
    entry = json.loads((tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()[-1])
    assert entry["settings"]["num_inference_steps"] is None and (tmp_path / "gen" / entry["image"]).is_file()
    card = ModelCard.load(final / "README.md").text
    for row in (f"| distilled from (teacher) | {tmp_path / 'base'} |", f"| distillation method | {METHODS['sdtt']} |",
                "| student sampler steps | 2 |", "| teacher sampler steps | 4 |", "(`medim distill`)"):
        assert row in card, row


def test_help_explains_every_distill_option(capsys):
    from medim.commands.distill import DISTILL_OPTIONS

    with pytest.raises(SystemExit) as stop:
        main(["distill", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = [f.name for f in DistillSection.__dataclass_fields__.values()]
    assert list(DISTILL_OPTIONS) == names
    assert all(f"distill.{name}:" in text for name in names)


@pytest.mark.parametrize("override, key", [
    ("distill.student_steps=0", "distill.student_steps"),
    ("distill.teacher_steps=6", "distill.teacher_steps"),  # not a multiple of 4
    ("distill.teacher_steps=4", "distill.teacher_steps"),  # not at least twice 4
    ("distill.divergence=l1", "distill.divergence"),
    ("distill.task_mix=[0,0,0]", "distill.task_mix"),
    ("distill.task_mix=[1,-1,1]", "distill.task_mix"),
    ("distill.guidance_scale=-1", "distill.guidance_scale"),
    ("distill.method=dmd", "distill.method"),
    ("distill.noise_scale=-0.5", "distill.noise_scale"),
    ("distill.noise_seed=-1", "distill.noise_seed"),
    ("distill.student_sampler.steps=3", "distill.student_sampler"),
    ("distill.student_sampler.num_inference_steps=8", "distill.student_sampler"),  # that is student_steps
    ("distill.student_sampler.temperature=-1", "distill.student_sampler"),
    ("distill.guidance_scale=nan", "distill.guidance_scale"),
    ("lora.r=4", "lora.r"),
    ("distill.teachr=x", "distill.teachr"),
])
def test_bad_settings_are_refused_before_anything_loads(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/distill_demo.yaml", ["data.cache=unused", override])


def test_command_refuses_a_missing_teacher_and_a_threshold_teacher():
    with pytest.raises(SystemExit, match=r"distill\.teacher"):
        main(["distill", "--config", str(REPO / "configs/tiny.yaml"), "model.init=x", "data.cache=y"])
    from medim.training.distill import sampler_configs

    config = load_config(REPO / "configs/distill_demo.yaml", ["data.cache=y"])
    assert config.model.init == "medim-demo"  # the student starts from the teacher
    with pytest.raises(ValueError, match="threshold"):
        sampler_configs(SamplerConfig(strategy="threshold"), config)
    sdtt = load_config(REPO / "configs/distill_demo.yaml", ["data.cache=y", "distill.method=sdtt"])
    for teacher, student in ((SamplerConfig(order="halton"), {}), (SamplerConfig(), {"order": "text_first"})):
        sdtt.distill.student_sampler = student
        with pytest.raises(ValueError, match="distill.method=sdtt: .* has order=.*use order='confidence'"):
            sampler_configs(teacher, sdtt)
    from medim.training import Trainer

    with pytest.raises(ValueError, match=r"distill\.teacher is set"):  # plain training would ignore the section
        Trainer(config)


# ---------------------------------------------------------------- distill.method=sequence
@pytest.mark.parametrize("name", ["native", "v1"])
def test_reports_are_written_left_to_right_under_the_shared_noise(request, name):
    pipe = request.getfixturevalue(name)
    model, layout = pipe.model.eval(), pipe.layout
    text, image = layout.text_segment, layout.image_segment
    codes = torch.randint(0, image.vocab_size, (3, layout.image_len), generator=torch.Generator().manual_seed(0))
    noise = shared_noise(layout.text_len, text.vocab_size, seed=4)
    condition = layout.condition(pipe.tokenizer, [(512, 640)] * 3)  # medim-v1's size prompt; none for native
    written = write_reports(model, codes, noise, 0.5, **condition)
    assert torch.equal(written, write_reports(model, codes, noise, 0.5, **condition))
    state = tasks.image_to_report(layout, codes).x
    state[:, text.start : text.stop] = written
    schedule = get_schedule("loglinear")
    for i in (0, 1, 5):  # each token: the argmax at its position with the report masked from there on
        x = state.clone()
        x[:, text.start + i : text.stop] = layout.mask_id
        t = torch.full((3,), (text.length - i) / text.length)
        logits = ModelDenoiser(model)(x, schedule.sigma(t), {"text": torch.tensor([text.start + i])},
                                      **condition)["text"][:, 0]
        expected = (logits.float().log_softmax(-1) + 0.5 * noise[i]).argmax(-1) + text.vocab_start
        assert torch.equal(written[:, i], expected)
    # The noise is shared: where it outweighs the model, every image gets the same report.
    loud = write_reports(model, codes, noise, 1e6, **condition)
    assert (loud == loud[0]).all()
    # Guided: the argmax of the sampler's guided mix, the image hidden in the unconditional half.
    for schedule_name, w in (("linear", 3.0), ("constant", 2.0)):
        guided = write_reports(model, codes, noise, 0.5, guidance_scale=w, guidance_schedule=schedule_name,
                               **condition)
        state[:, text.start : text.stop] = guided
        for i in (0, 3):
            x = state.clone()
            x[:, text.start + i : text.stop] = layout.mask_id
            hidden = x.clone()
            hidden[:, image.start : image.stop] = layout.mask_id
            t = (text.length - i) / text.length
            sigma = schedule.sigma(torch.full((3,), t))
            lp = [ModelDenoiser(model)(s, sigma, {"text": torch.tensor([text.start + i])}, **condition)["text"][:, 0]
                  .float().log_softmax(-1) for s in (x, hidden)]
            wt = w * (1 - t) if schedule_name == "linear" else w
            mix = ((1 + wt) * lp[0] - wt * lp[1]).log_softmax(-1)
            assert torch.equal(guided[:, i], (mix + 0.5 * noise[i]).argmax(-1) + text.vocab_start), (schedule_name, i)
    # Strong guidance changes what is written (the checks above would also hold for a writer that ignores it
    # on a model where guidance changes no argmax).
    plain = write_reports(model, codes, noise, 0.0, **condition)
    assert not torch.equal(write_reports(model, codes, noise, 0.0, guidance_scale=50.0, guidance_schedule="constant",
                                         **condition), plain)


@pytest.mark.usefixtures("tiny_run_copy")
def test_sequence_distillation_trains_on_the_teachers_reports(tmp_path):
    args = _distill_args(tmp_path, "run", "distill.method=sequence", "distill.guidance_scale=0", "train.max_steps=2",
                         "checkpoint.every=1", "checkpoint.resume=latest",
                         "distill.student_sampler.confidence_temperature=1.5")
    assert main(["distill", *args]) == 0
    targets, cache = TokenCacheDataset(tmp_path / "run/targets"), TokenCacheDataset(tmp_path / "cache")
    teacher = MeDiMPipeline.from_pretrained(tmp_path / "base")
    layout = teacher.layout
    # The cache's images, with the reports the teacher writes for them.
    assert targets.ids == cache.ids and torch.equal(targets.tensors["image_codes"], cache.tensors["image_codes"])
    codes = cache.tensors["image_codes"][:4].long()
    noise = shared_noise(layout.text_len, layout.text_segment.vocab_size, seed=0)
    assert torch.equal(targets.tensors["text_ids"][:4].long(), write_reports(teacher.model, codes, noise, 0.5))
    reports = layout.decode_reports(teacher.tokenizer, targets.tensors["text_ids"][:4].long())
    assert torch.equal(targets.tensors["prefix_len"][:4].long(),
                       first_sentence_length(layout, teacher.tokenizer, reports).long())
    card = ModelCard.load(tmp_path / "run/final/README.md").text
    assert f"| distillation method | {METHODS['sequence']} |" in card and "teacher sampler steps" not in card
    # The student's saved settings: the teacher's at 2 steps, with distill.student_sampler over them.
    assert MeDiMPipeline.from_pretrained(tmp_path / "run/final").sampler_config == teacher.sampler_config.replace(
        num_inference_steps=2, guidance_scale=0.0, confidence_temperature=1.5)
    # A resume reuses them; reports written under other settings are refused, not mixed in.
    shard = tmp_path / "run/targets/shard_00000.safetensors"
    before = shard.stat().st_mtime_ns
    config = load_config(REPO / "configs/tiny.yaml", args[2:])
    assert Distiller(config).step == 2 and shard.stat().st_mtime_ns == before
    index = json.loads((tmp_path / "run/targets/index.json").read_text())
    index["source"]["noise_seed"] = 1
    (tmp_path / "run/targets/index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="delete the folder to write them again"):
        Distiller(config)


@pytest.mark.usefixtures("tiny_run_copy")
def test_a_text_first_student_learns_pair_reports_with_the_image_hidden(tmp_path, monkeypatch):
    import medim.training.trainer as trainer_module

    seen, real = [], trainer_module.diffusion_loss
    monkeypatch.setattr(trainer_module, "diffusion_loss", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    for out, order in (("joint", "confidence"), ("text-first", "text_first")):
        args = _distill_args(tmp_path, out, "distill.method=sequence", "distill.guidance_scale=0",
                             "distill.task_mix=[1,1,2]", f"distill.student_sampler.order={order}")
        distiller = Distiller(load_config(REPO / "configs/tiny.yaml", args[2:]))
        assert distiller.student_config.order == order
        seen.clear()
        distiller.train_step()
        known, hidden = seen[0]["known"], seen[0]["hidden"]
        if order == "confidence":
            assert hidden is None
            continue
        text, image = distiller.layout.text_segment, distiller.layout.image_segment
        pairs = ~known[:, text.stop - 1] & ~known[:, image.start]  # rows where both modalities are unknown
        assert pairs.any() and (~pairs).any()
        assert torch.equal(hidden[:, image.start : image.stop], pairs[:, None].expand(-1, image.length))
        assert not hidden[:, text.start : text.stop].any()
    # The order decides the pair rows, so a resume may not change it (the rest of the sampler may).
    saved = load_config(REPO / "configs/tiny.yaml", args[2:]).to_dict()
    saved["distill"]["student_sampler"] = {"order": "confidence", "confidence_temperature": 2.0}
    changed = resume_differences(saved, load_config(REPO / "configs/tiny.yaml", args[2:]))
    assert changed == [("distill.student_sampler.order", "confidence", "text_first")]


@pytest.mark.usefixtures("tiny_run_copy")
def test_a_guided_teacher_writes_guided_reports_for_an_unguided_student(tmp_path):
    args = _distill_args(tmp_path, "run", "distill.method=sequence", "distill.guidance_scale=2", "train.max_steps=1",
                         "checkpoint.every=0")
    assert main(["distill", *args]) == 0
    teacher, cache = MeDiMPipeline.from_pretrained(tmp_path / "base"), TokenCacheDataset(tmp_path / "cache")
    layout = teacher.layout
    noise = shared_noise(layout.text_len, layout.text_segment.vocab_size, seed=0)
    codes = cache.tensors["image_codes"][:4].long()
    targets = TokenCacheDataset(tmp_path / "run/targets")
    expected = write_reports(teacher.model, codes, noise, 0.5, guidance_scale=2.0,
                             guidance_schedule=teacher.sampler_config.guidance_schedule)
    assert torch.equal(targets.tensors["text_ids"][:4].long(), expected)
    assert targets.index["source"]["guidance_scale"] == 2.0
    student = MeDiMPipeline.from_pretrained(tmp_path / "run/final")
    assert student.sampler_config.guidance_scale == 0.0  # folded in: one forward row per step
    card = ModelCard.load(tmp_path / "run/final/README.md").text
    assert "| teacher guidance in the targets (folded in when > 0) | 2 |" in card


# ---------------------------------------------------------------- killed, resumed: the same bits
@pytest.mark.slow
@pytest.mark.usefixtures("tiny_run_copy")
@pytest.mark.parametrize("method", [[], ["distill.method=sequence", "distill.guidance_scale=0"]],
                         ids=["sdtt", "sequence"])
def test_sigkill_between_steps_resumes_to_the_same_bits(tmp_path, method):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.replace('main(["train", *args])', 'main(["distill", *args])'))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def run(out: str, point: str = "none", at: int = 0) -> int:
        args = _distill_args(tmp_path, out, "train.max_steps=6", "checkpoint.every=2", "optim.ema_decay=0.9",
                             "checkpoint.resume=latest", *method)
        done = subprocess.run([sys.executable, str(driver), point, str(at), *args], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
        return done.returncode

    assert run("straight") == 0
    assert run("killed", "step", 3) == -signal.SIGKILL  # 3 steps done, the step-2 checkpoint is the newest
    assert not (tmp_path / "killed" / "final").exists()
    assert run("killed") == 0
    a, b = tmp_path / "straight", tmp_path / "killed"
    assert_same_tensors(a, b, [f"checkpoints/checkpoint_00000006/{name}.safetensors"
                               for name in ("model", "ema", "optimizer")] + ["final/model/model.safetensors"])
    strip = [[{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
              for line in (p / "log.jsonl").read_text().splitlines()] for p in (a, b)]
    assert strip[0] == strip[1] and all(math.isfinite(r["loss"]) for r in strip[0] if "loss" in r)


@pytest.mark.usefixtures("tiny_run_copy")
def test_resume_with_a_changed_teacher_is_refused(tmp_path):
    args = _distill_args(tmp_path, "run", "train.max_steps=2", "checkpoint.every=1", "checkpoint.resume=latest")
    assert main(["distill", *args]) == 0
    state = json.loads((tmp_path / "run/checkpoints/checkpoint_00000002/trainer_state.json").read_text())
    teacher = MeDiMPipeline.from_pretrained(tmp_path / "base")
    assert state["teacher"] == {"weights_sha256": state_sha256(teacher.model)}
    # The same folder, other weights (a teacher retrained in place): a resume would not continue the run.
    with torch.no_grad():
        next(teacher.model.parameters()).add_(1e-3)
    teacher.save_pretrained(tmp_path / "base", overwrite=True)
    config = load_config(REPO / "configs/tiny.yaml", args[2:])  # args: --config FILE overrides...
    with pytest.raises(ResumeRefused, match=r"distill.teacher \(weights\)"):
        Distiller(config)
    config.checkpoint.allow_changed = ["distill.teacher"]
    assert Distiller(config).step == 2


# ---------------------------------------------------------------- two processes: DDP and FSDP2, bf16
def _distill_worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from medim.training import Distiller

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for mode in ("ddp", "fsdp"):
        args = _distill_args(Path(tmp), mode, "train.max_steps=2", f"train.parallel={mode}", "train.precision=bf16",
                             "train.micro_batch_size=2", "checkpoint.every=0")
        config = load_config(args[1], args[2:])
        distiller = Distiller(config)
        out = distiller.fit()
        full = get_model_state_dict(distiller.model, options=StateDictOptions(full_state_dict=True))
        flat = torch.cat([v.float().flatten() for _, v in sorted(full.items())])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        result = {"same_as_rank0": bool(torch.equal(flat, ref)), "final": str(out.final_dir),
                  "losses": [r["loss"] for r in out.history if "loss" in r]}
        (Path(tmp) / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    leave_worker()


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_run_copy")
def test_two_process_distillation_ddp_and_fsdp_in_bf16(tmp_path):
    import torch.multiprocessing as mp

    from tests.integration.test_distributed import _free_port

    tiny_run(tmp_path)
    mp.spawn(_distill_worker, args=(str(tmp_path), _free_port()), nprocs=2, join=True)
    for mode in ("ddp", "fsdp"):
        ranks = [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
        assert all(r["same_as_rank0"] for r in ranks), mode
        losses = ranks[0]["losses"]  # logged on the main rank (averaged over both)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), mode
        assert MeDiMPipeline.from_pretrained(ranks[0]["final"]).sampler_config.num_inference_steps == 2
