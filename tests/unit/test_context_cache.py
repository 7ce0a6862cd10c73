"""Context caching: refreshing every step gives the uncached tokens (both layouts, with and without
guidance, rows with different masked sets); a cached step computes what a whole forward computes
when nothing is stale; the sampler's refresh bookkeeping is exact; FLOPs are counted right."""

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from medim import MeDiMConfig, MeDiMModel
from medim.diffusion import sample
from medim.models.denoiser import ModelDenoiser
from tests.helpers.backbone import randomize_, tiny_gemma_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import FlopMeter, medim_v1_model  # noqa: E402

NATIVE = {"name": "native", "text_vocab_size": 100, "image_offset": 100, "image_vocab_size": 64, "mask_id": 164,
          "text_len": 8, "image_len": 16}
V1_SHAPE = dict(text_len=16, image_len=64, base_vocab=120, image_vocab=64)


def native_model(num_layers=2):
    model = MeDiMModel(MeDiMConfig(tiny_gemma_config(vocab_size=165, num_layers=num_layers), layout=NATIVE))
    return randomize_(model, std=0.1).eval()  # random AdaLN too: sigma matters


def v1_model(num_layers=None):
    return medim_v1_model("tiny", num_layers=num_layers, **V1_SHAPE)


def mixed_task(model, rows=3, seed=0):
    """Random tokens, a different random known set per row (and a padded report in medim-v1, so
    its key mask matters), with the per-row condition of the layout."""
    layout = model.layout
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randint(s.vocab_start, s.vocab_stop, (rows, s.length), generator=g)
                   for s in layout.segments], 1)
    known = torch.rand(rows, layout.state_len, generator=g) < torch.tensor([0.2, 0.5, 0.8])[:rows, None]
    known[0, : layout.text_len] = True  # row 0: the whole report known (image-to-report-like)
    condition = {}
    if layout.name == "medim-v1":
        x[1, layout.text_len - 4 : layout.text_len] = layout.pad_id
        known[1, layout.text_len - 4 : layout.text_len] = True
        condition = {"cond_ids": torch.randint(3, 100, (rows, 5), generator=g),
                     "cond_mask": torch.ones(rows, 5, dtype=torch.bool)}
        condition["cond_mask"][2, 3:] = False  # a shorter condition: rows differ in where the text sits
    return torch.where(known, x, layout.mask_id), known, condition


def run(denoiser, model, x, known, condition, seed=0, **options):
    gens = [torch.Generator().manual_seed(seed + r) for r in range(x.shape[0])]
    options.setdefault("num_inference_steps", 6)
    return sample(denoiser, x, known, segments=model.layout.segments, mask_id=model.layout.mask_id, generator=gens,
                  model_kwargs=condition, **options)


@pytest.mark.parametrize("layout", ["medim-v1", "native"])
@pytest.mark.parametrize("guidance", [0.0, 5.0])
def test_refresh_every_step_gives_the_uncached_tokens(layout, guidance):
    model = v1_model() if layout == "medim-v1" else native_model()
    x, known, condition = mixed_task(model)
    denoiser = ModelDenoiser(model)
    with torch.inference_mode():
        for opts in (dict(strategy="maskgit"), dict(strategy="maskgit", order="halton"), dict(order="text_first"),
                     dict(strategy="threshold"), dict(strategy="ddpm", num_inference_steps=3)):
            opts = dict(guidance_scale=guidance, **opts)
            ref = run(denoiser, model, x, known, condition, **opts)
            cached = run(denoiser, model, x, known, condition, cache_interval=1, **opts)
            assert torch.equal(cached.tokens, ref.tokens), opts
            assert not (cached.tokens == model.layout.mask_id).any()


class Recomputing:
    """A caching denoiser whose cached steps recompute everything: with it the sampler's refresh
    schedule and its bookkeeping of the still-masked columns must give the uncached tokens."""

    def __init__(self, model):
        self.plain, self.mask_id, self.calls = ModelDenoiser(model), model.layout.mask_id, []

    def __call__(self, x, sigma, positions, **kw):
        return self.plain(x, sigma, positions, **kw)

    def cached(self, x, sigma, positions, cache, **kw):
        self.calls.append((cache is None, x.clone(), {k: p.clone() for k, p in positions.items()}))
        return self.plain(x, sigma, positions, **kw), "cache"


@pytest.mark.parametrize("interval", [2, 3, 8])
def test_refresh_schedule_and_columns_are_exact(interval):
    model = native_model()
    x, known, condition = mixed_task(model)
    recomputing = Recomputing(model)
    with torch.inference_mode():
        for opts in (dict(guidance_scale=0.0), dict(guidance_scale=5.0, order="halton"), dict(order="text_first"),
                     dict(strategy="ddpm")):
            recomputing.calls.clear()
            ref = run(ModelDenoiser(model), model, x, known, condition, num_inference_steps=10, **opts)
            out = run(recomputing, model, x, known, condition, num_inference_steps=10, cache_interval=interval, **opts)
            assert torch.equal(out.tokens, ref.tokens), opts
            refreshes = [i for i, (fresh, _, _) in enumerate(recomputing.calls) if fresh]
            assert len(refreshes) < len(recomputing.calls)
            assert all(b - a <= interval for a, b in zip(refreshes, refreshes[1:] + [len(recomputing.calls)]))
            # A refresh asks exactly for the positions masked in some row; the steps after it keep them.
            for i, (fresh, xs, positions) in enumerate(recomputing.calls):
                asked = torch.cat(list(positions.values()))
                if fresh:
                    masked = torch.nonzero((xs[: x.shape[0]] == model.layout.mask_id).any(0)).squeeze(-1)
                    if opts.get("order") == "text_first":  # a phase asks for its own modality only
                        (seg,) = [s for s in model.layout.segments if s.name in positions]
                        masked = masked[(masked >= seg.start) & (masked < seg.stop)]
                    assert torch.equal(asked, masked)
                    served = asked
                else:
                    assert torch.equal(asked, served), i


@pytest.mark.parametrize("layout", ["medim-v1", "native"])
def test_cached_step_is_the_forward_when_nothing_is_stale(layout):
    model = v1_model() if layout == "medim-v1" else native_model()
    x, known, condition = mixed_task(model)
    x = torch.cat([x, torch.where(known, model.layout.mask_id, x)])  # a guided batch: both halves
    condition = {k: torch.cat([v, v]) for k, v in condition.items()}
    unknown = (~known).any(0)
    positions = {s.name: torch.nonzero(unknown[s.start : s.stop]).squeeze(-1) + s.start for s in model.layout.segments}
    sigma = torch.linspace(0.5, 2.0, x.shape[0])
    with torch.no_grad():
        ref = model(x, sigma, positions=positions, return_logits=True, **condition).logits
        out, cache = model.forward_cached(x, sigma, positions, return_logits=True, **condition)
        assert all(torch.equal(out.logits[k], ref[k]) for k in ref)  # the refresh is the plain forward
        again, _ = model.forward_cached(x, sigma, positions, cache, return_logits=True, **condition)
    for k, pos in positions.items():
        masked = x[:, pos] == model.layout.mask_id  # what a row can change; elsewhere zeros
        torch.testing.assert_close(again.logits[k][masked], ref[k][masked], atol=1e-5, rtol=1e-5)
        assert masked.any() and not again.logits[k][~masked].any()
    assert cache.active.shape[1] < model.layout.backbone_inputs(x, **condition).input_ids.shape[1]


@pytest.mark.parametrize("layout", ["medim-v1", "native"])
def test_cached_step_sees_committed_tokens(layout):
    """With one layer, the keys/values of the cached positions depend only on their own tokens and
    sigma, so after tokens at the served positions change (a report slot becomes padding in
    medim-v1) a cached step at the same sigma must still equal the whole forward: the positions it
    runs, the read-out and the key mask are right. With two layers the context is stale."""
    diffs = {}
    for layers in (1, 2):
        model = v1_model(layers) if layout == "medim-v1" else native_model(layers)
        x, known, condition = mixed_task(model)
        unknown = (~known).any(0)
        positions = {s.name: torch.nonzero(unknown[s.start : s.stop]).squeeze(-1) + s.start
                     for s in model.layout.segments}
        sigma = torch.tensor([0.3, 1.0, 2.5])
        g = torch.Generator().manual_seed(1)
        later = x.clone()
        for seg in model.layout.segments:
            ids = torch.randint(seg.vocab_start, seg.vocab_stop, x.shape, generator=g)
            changed = torch.where(torch.rand(x.shape, generator=g) < 0.5, ids, x)
            later[:, seg.start : seg.stop] = changed[:, seg.start : seg.stop]
        later = torch.where(known, x, later)
        if layout == "medim-v1":
            text = slice(0, model.layout.text_len)
            later[2, text] = torch.where(known[2, text], later[2, text], model.layout.pad_id)
        with torch.no_grad():
            _, cache = model.forward_cached(x, sigma, positions, return_logits=True, **condition)
            ref = model(later, sigma, positions=positions, return_logits=True, **condition).logits
            out, _ = model.forward_cached(later, sigma, positions, cache, return_logits=True, **condition)
        diffs[layers] = max(float((out.logits[k] - ref[k])[x[:, p] == model.layout.mask_id].abs().max())
                            for k, p in positions.items())
    assert diffs[1] < 1e-4 and diffs[2] > 1e-3, diffs


def test_image_to_report_runs_only_the_report():
    model = v1_model()
    layout = model.layout
    x, _, condition = mixed_task(model)
    known = torch.zeros_like(x, dtype=torch.bool)
    known[:, layout.text_len :] = True
    x = torch.where(known, x, layout.mask_id)
    with torch.no_grad():
        _, cache = model.forward_cached(x, torch.ones(3), {"text": torch.arange(layout.text_len)}, **condition)
    # The report slots and, for the shifted read-out, the one position before them.
    assert cache.active.shape[1] == layout.text_len + 1
    # Each row runs only what it still has masked (rows commit different tokens).
    x[0, :8] = 5
    x[1, 4:10] = 5
    x[2, :6] = 5
    with torch.no_grad():
        _, cache = model.forward_cached(x, torch.ones(3), {"text": torch.arange(layout.text_len)}, **condition)
    assert cache.active.shape[1] == layout.text_len - 6 + 2  # row 1: two runs of masked slots, each shifted


def test_bad_uses_raise():
    model = native_model()
    x, known, condition = mixed_task(model)
    plain = lambda *a, **k: ModelDenoiser(model)(*a, **k)  # noqa: E731
    with pytest.raises(ValueError, match="cache_interval=2 needs a denoiser with a `cached` method"):
        run(plain, model, x, known, condition, cache_interval=2)
    for bad in (0, 1.5, True, -1):
        with pytest.raises(ValueError, match="cache_interval"):
            run(ModelDenoiser(model), model, x, known, condition, cache_interval=bad)
    positions = {"image": torch.arange(8, 12)}
    with torch.no_grad():
        _, cache = model.forward_cached(x, torch.ones(3), positions)
        with pytest.raises(ValueError, match="rows"):
            model.forward_cached(x[:2], torch.ones(2), positions, cache)
        with pytest.raises(ValueError, match="refresh"):
            model.forward_cached(x, torch.ones(3), {"image": torch.arange(8, 10)}, cache)
        with pytest.raises(ValueError, match="positions"):
            model.forward_cached(x, torch.ones(3), {})
    causal = MeDiMModel(MeDiMConfig(tiny_gemma_config(vocab_size=165), layout=NATIVE, causal=True)).eval()
    with pytest.raises(ValueError, match="bidirectional"):
        causal.forward_cached(x, torch.ones(3), positions)


def test_computed_flops_match_torch_flop_counter():
    model = v1_model()
    x, known, condition = mixed_task(model)
    positions = {"text": torch.arange(2, 9), "image": torch.arange(20, 50)}
    sigma = torch.ones(3)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math kernel's matmuls are what the counter sees
        for call in ("forward", "refresh", "cached"):
            if call == "refresh" or call == "forward":
                cache = None
            with FlopCounterMode(display=False) as counter, FlopMeter(model) as meter:
                if call == "forward":
                    model(x, sigma, positions=positions, **condition)
                else:
                    _, cache = model.forward_cached(x, sigma, positions, cache, **condition)
            # Matmuls only; transformers 4.57's rotary embedding also builds its angles with one
            # (inv_freq x positions: 2 * rows * head_dim / 2 * length), which the formula leaves out.
            assert meter.flops == pytest.approx(counter.get_total_flops(), rel=1e-3) and meter.flops > 0, call
    assert "forward" not in model.__dict__  # the meter puts the methods back


def test_pipeline_caching():
    from medim import MeDiMPipeline
    from medim.data.synthetic import make_pair

    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    images = [make_pair(i, size=64)[0] for i in range(3)]

    def report(**kw):
        return pipe.image_to_report(images, prompt="Frontal", num_inference_steps=8, guidance_scale=3.0,
                                    generator=[torch.Generator().manual_seed(i) for i in range(3)], batch_size=2,
                                    **kw).tokens

    def pairs(**kw):
        return pipe.generate_pairs(["Frontal view of the chest.", ""], num_pairs_per_prompt=2, num_inference_steps=8,
                                   generator=torch.Generator().manual_seed(0), output_type="tokens", **kw).tokens

    for task in (report, pairs):
        ref = task()
        assert torch.equal(task(cache_interval=1), ref)
        approx = task(cache_interval=4)
        assert not (approx == pipe.layout.mask_id).any() and (approx == ref).float().mean() > 0.5
