import math

import pytest
import torch

from medim.diffusion import commit_counts, image_to_report, pair_from_prompt, sample, text_to_image
from medim.diffusion.draw import filter_logprobs
from medim.diffusion.halton import halton_order, halton_rank
from medim.diffusion.schedule import get_schedule
from medim.layout import NativeLayout

LAYOUT = NativeLayout(text_vocab_size=12, image_offset=12, image_vocab_size=10, mask_id=22, text_len=6, image_len=20)
SEGS, M, N, V = LAYOUT.segments, LAYOUT.mask_id, LAYOUT.state_len, 23  # V: full id range incl. mask


class Toy:
    """Full-vocabulary logits that depend on the state and sigma; returns per-segment log-probs at
    the requested positions only, and records every call."""

    def __init__(self, seed=0, peak=None, scale=1.0, segs=SEGS):
        g = torch.Generator().manual_seed(seed)
        self.segs, self.n = segs, segs[-1].start + segs[-1].length
        self.base = torch.randn(self.n, V, generator=g) * scale
        self.mix = torch.randn(V, V, generator=g) * 0.5 * scale
        self.first = torch.randn(V, self.n, V, generator=g) * scale  # every position sees token 0
        self.peak = peak  # target state: its tokens get +peak everywhere
        self.allowed = torch.zeros(self.n, V, dtype=torch.bool)
        for s in segs:
            self.allowed[s.start : s.start + s.length, s.vocab_start : s.vocab_start + s.vocab_size] = True
        self.calls = []

    def full_logits(self, x, sigma):  # [B, N, V], -inf outside each position's segment
        logits = (self.base + self.mix[x.roll(-1, dims=1)] + self.first[x[:, 0]]) * (1 + 0.05 * sigma[:, None, None])
        if self.peak is not None:
            logits = logits + self.peak[1] * torch.nn.functional.one_hot(self.peak[0], V)
        return logits.masked_fill(~self.allowed, -math.inf)

    def __call__(self, x, sigma, positions, **kw):
        self.calls.append(dict(x=x.clone(), positions=positions, kw=kw))
        full = self.full_logits(x, sigma)
        segs = {s.name: s for s in self.segs}
        return {n: full[:, p, segs[n].vocab_start : segs[n].vocab_start + segs[n].vocab_size].log_softmax(-1)
                for n, p in positions.items()}


def t2i(B=2):
    ids = torch.randint(0, 12, (B, 6), generator=torch.Generator().manual_seed(5))
    return text_to_image(LAYOUT, ids)


def run(model, task, **kw):
    kw.setdefault("num_inference_steps", 8)
    return sample(model, task.x, task.known, segments=SEGS, mask_id=M, **kw)


@pytest.mark.parametrize("strategy", ["maskgit", "threshold", "ddpm"])
def test_fills_everything_and_keeps_known(strategy):
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(3, 1), [0, 2, 5])
    out = run(Toy(), task, strategy=strategy, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert not (out.tokens == M).any()
    assert torch.equal(out.tokens[task.known], task.x[task.known])
    for s in SEGS:
        ids = out.tokens[:, s.start : s.start + s.length]
        assert ((ids >= s.vocab_start) & (ids < s.vocab_start + s.vocab_size)).all()


@pytest.mark.parametrize("schedule", ["arccos", "cosine", "linear", "cosine_ratio"])
def test_commit_counts_followed_exactly(schedule):
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(2, 1), [1, 4])
    masked_counts = []
    out = run(Toy(), task, num_inference_steps=7, schedule=schedule, generator=torch.Generator().manual_seed(0),
              callback=lambda i, t, x: masked_counts.append((x == M).sum(-1)))
    remaining = torch.stack([(~task.known).sum(-1)] + masked_counts)
    committed = (remaining[:-1] - remaining[1:]).T
    expected = commit_counts((~task.known).sum(-1), 7, schedule)
    assert torch.equal(committed, expected) and remaining[-1].eq(0).all()
    assert (expected >= 1).all()
    assert out.nfe == 7


def test_commit_counts_release_formula():
    # adap_sche: r = linspace(1, 0, S); f = arccos(r) / (pi/2); round(f / sum f * m), 0 -> 1, last = rest.
    assert commit_counts([10], 4).tolist() == [[1, 2, 3, 4]]
    c = commit_counts([300, 5, 0], 128)
    assert c.sum(-1).tolist() == [300, 5, 0]
    assert c[1].tolist() == [1] * 5 + [0] * 123  # fewer tokens than steps: one per step
    assert (c[0] >= 1).all() and c[0, 0] == 1
    with pytest.raises(ValueError, match="schedule"):
        commit_counts([3], 2, "square")


def test_commit_counts_cosine_ratio_is_maskgits_mask_ratio():
    # After step i of S, round(cos(pi/2 * i/S) * m) tokens stay masked; at least one commit per step.
    m, S = 98, 4
    left = [round(math.cos(math.pi / 2 * i / S) * m) for i in range(S + 1)]
    assert commit_counts([m], S, "cosine_ratio").tolist() == [[a - b for a, b in zip(left, left[1:])]]
    assert commit_counts([m], S, "cosine_ratio")[0, 0] > 1 == commit_counts([m], S, "cosine")[0, 0]
    c = commit_counts([300, 5, 0], 128, "cosine_ratio")
    assert c.sum(-1).tolist() == [300, 5, 0] and (c[0] >= 1).all()
    assert c[1].tolist() == [1] * 5 + [0] * 123


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_text_first_writes_the_report_then_draws_the_image(guidance):
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(2, 1), [1, 3])
    toy, states, sigmas = Toy(scale=0.3), [], []

    def denoiser(x, sigma, positions, **kw):
        sigmas.append(float(sigma[0]))
        return toy(x, sigma, positions, **kw)

    out = run(denoiser, task, num_inference_steps=8, order="text_first", text_share=0.6, guidance_scale=guidance,
              generator=torch.Generator().manual_seed(0), callback=lambda i, t, x: states.append(x.clone()))
    assert not (out.tokens == M).any() and torch.equal(out.tokens[task.known], task.x[task.known])
    text, image = LAYOUT.text_segment, LAYOUT.image_segment
    a = round(0.6 * 8)  # the report's steps
    # Each phase asks for its own modality only, and commits on its own counts.
    assert [set(c["positions"]) for c in toy.calls] == [{"text"}] * a + [{"image"}] * (8 - a)
    masked = torch.stack([torch.where(task.known, task.x, M)] + states) == M
    for seg, (lo, hi) in ((text, (0, a)), (image, (a, 8))):
        per_step = (masked[:-1, :, seg.start : seg.stop].sum(-1) - masked[1:, :, seg.start : seg.stop].sum(-1)).T
        unknown = (~task.known[:, seg.start : seg.stop]).sum(-1)
        assert torch.equal(per_step[:, lo:hi], commit_counts(unknown, hi - lo, "arccos")), seg.name
        assert not per_step[:, :lo].any() and not per_step[:, hi:].any(), seg.name
    assert masked[a, :, image.start : image.stop].all()  # the image is still hidden when the report is done
    # Each phase runs its own time grid from t = 1.
    sigma = get_schedule("loglinear").sigma
    grid = torch.cat([torch.linspace(1, 1e-5, a + 1)[:-1], torch.linspace(1, 1e-5, 8 - a + 1)[:-1]])
    torch.testing.assert_close(torch.tensor(sigmas), sigma(grid))


@pytest.mark.parametrize("task", ["t2i", "i2r"])
def test_text_first_samples_one_modality_as_the_confidence_order(task):
    codes = torch.randint(0, 10, (2, 20), generator=torch.Generator().manual_seed(1))
    task = t2i() if task == "t2i" else image_to_report(LAYOUT, codes)
    ref = run(Toy(), task, generator=torch.Generator().manual_seed(4)).tokens
    out = run(Toy(), task, order="text_first", generator=torch.Generator().manual_seed(4)).tokens
    assert torch.equal(out, ref)


def test_seeds():
    toy = Toy(scale=0.3)  # flat distributions: different seeds must differ
    a = run(toy, t2i(), generator=torch.Generator().manual_seed(1)).tokens
    b = run(toy, t2i(), generator=torch.Generator().manual_seed(1)).tokens
    c = run(toy, t2i(), generator=torch.Generator().manual_seed(2)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_zero_is_one_forward_of_batch_b():
    toy = Toy()
    out0 = run(toy, t2i(3), guidance_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert out0.nfe == 8 and len(toy.calls) == 8
    assert all(c["x"].shape[0] == 3 for c in toy.calls)
    # Text is known for text-to-image: text logits are never computed.
    assert all(set(c["positions"]) == {"image"} for c in toy.calls)
    # Nothing known: guidance has nothing to drop, so it is skipped and changes nothing.
    toy.calls.clear()
    task = pair_from_prompt(LAYOUT, torch.zeros(3, 6, dtype=torch.long), [0, 0, 0])
    a = run(toy, task, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    b = run(toy, task, guidance_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and all(c["x"].shape[0] == 3 for c in toy.calls)


def test_guided_step_is_one_batched_forward():
    toy = Toy()
    task = t2i(2)
    size = torch.tensor([[1.0], [2.0]])
    out = run(toy, task, guidance_scale=5.0, model_kwargs={"size": size, "flag": "v1"},
              generator=torch.Generator().manual_seed(0))
    assert out.nfe == len(toy.calls) == 8
    # Step 0 has t = 1, so the (1 - t) ramp gives w = 0: unguided, as in the release.
    assert toy.calls[0]["x"].shape[0] == 2
    for c in toy.calls[1:]:
        x = c["x"]
        assert x.shape[0] == 4 and torch.equal(x[:2][~task.known], x[2:][~task.known])
        assert (x[2:][task.known] == M).all() and torch.equal(x[:2][task.known], task.x[task.known])
        assert torch.equal(c["kw"]["size"], torch.cat([size, size])) and c["kw"]["flag"] == "v1"
    const = Toy()
    run(const, task, guidance_scale=5.0, guidance_schedule="constant", generator=torch.Generator().manual_seed(0))
    assert all(c["x"].shape[0] == 4 for c in const.calls)


def test_all_strategies_recover_a_peaked_target():
    target = torch.tensor([s.vocab_start + (i * 7) % s.vocab_size for s in SEGS for i in range(s.length)])
    task = pair_from_prompt(LAYOUT, target[None, :6].repeat(2, 1), [2, 0])
    nfe = {}
    for strategy in ("maskgit", "threshold", "ddpm"):
        toy = Toy(peak=(target, 30.0))
        out = run(toy, task, num_inference_steps=16, strategy=strategy, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.tokens, target.expand(2, -1)), strategy
        nfe[strategy] = out.nfe
    assert nfe["maskgit"] == 16 and nfe["threshold"] < nfe["maskgit"]


def test_per_row_generators_make_rows_independent_of_the_batch():
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(3, 1), [0, 3, 6])
    for strategy in ("maskgit", "threshold", "ddpm"):
        kw = dict(strategy=strategy, guidance_scale=2.0, temperature=0.9, top_k=5, top_p=0.9)
        batch = run(Toy(scale=0.5), task, generator=[torch.Generator().manual_seed(10 + r) for r in range(3)], **kw)
        for r in range(3):
            alone = run(Toy(scale=0.5), type(task)(task.x[r : r + 1], task.known[r : r + 1]),
                        generator=[torch.Generator().manual_seed(10 + r)], **kw)
            assert torch.equal(alone.tokens[0], batch.tokens[r]), (strategy, r)


def test_greedy_ignores_the_seed_and_filters_are_exact():
    toy = Toy()
    kw = dict(temperature=0.0, confidence_temperature=0.0)
    a = run(toy, t2i(), generator=torch.Generator().manual_seed(0), **kw).tokens
    b = run(toy, t2i(), generator=torch.Generator().manual_seed(1), **kw).tokens
    assert torch.equal(a, b)
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    torch.testing.assert_close(filter_logprobs(logp, 0.5, None, None), (logp / 0.5).log_softmax(-1))
    top2 = filter_logprobs(logp, 1.0, 2, None).exp()
    torch.testing.assert_close(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = filter_logprobs(logp, 1.0, None, 0.8).exp()  # 0.5 + 0.3 reaches 0.8: two tokens
    torch.testing.assert_close(nucleus, top2)
    assert (filter_logprobs(logp, 1.0, None, 0.81).exp() > 0).sum() == 3


def release_reference(toy, x, known, gens, steps=128, cfg=5.0, r_temp=10.0):
    """A naive transcription of docs/formats.md, section 4 / the release sampler: loops over steps and rows,
    full-vocabulary logits, mask id and other-modality ids -> -inf after mixing."""
    x = x.clone()
    B, N = x.shape
    t_grid = torch.linspace(1, 1e-5, steps + 1)
    sched = []
    for b in range(B):
        m = int((~known[b]).sum())
        r = torch.linspace(1, 0, steps)
        f = torch.arccos(r) / (math.pi * 0.5)
        s = ((f / f.sum()) * m).round()
        s[s == 0] = 1
        s[-1] += m - s.sum()
        s[-1] = max(s[-1], 0)
        sched.append(s.long().tolist())
    for i in range(steps):
        t = t_grid[i]
        sigma = -torch.log1p(-(1 - 1e-3) * t)
        w = cfg * (1 - t)
        for b in range(B):
            u = torch.rand(2, N, generator=gens[b])
            masked = x[b] == M
            k = min(sched[b][i], int(masked.sum()))
            if k <= 0:
                continue
            cond = toy.full_logits(x[b : b + 1], sigma[None])[0]
            if w > 0 and known[b].any():
                unc = toy.full_logits(torch.where(known[b], M, x[b])[None], sigma[None])[0]
                logits = ((1 + w) * cond - w * unc).masked_fill(cond == -math.inf, -math.inf)
            else:
                logits = cond
            logp = logits.log_softmax(-1)
            # Sample every position (inverse CDF), then keep the k most confident masked ones.
            cdf = logp.exp().cumsum(-1)
            pred = torch.searchsorted(cdf, (u[0] * cdf[:, -1])[:, None], right=True)[:, 0]
            gumbel = -torch.log(-torch.log(u[1].clamp(1e-20, 1 - 1e-7)))
            conf = logp.gather(-1, pred[:, None])[:, 0] + r_temp * t * gumbel
            conf = torch.where(masked, conf, -math.inf)
            order = torch.sort(-conf, stable=True).indices[:k]  # ties: lower position first
            x[b, order] = pred[order]
    for b in range(B):  # final argmax pass for anything still masked
        masked = x[b] == M
        if masked.any():
            full = toy.full_logits(x[b : b + 1], (-torch.log1p(-(1 - 1e-3) * t_grid[-1]))[None])[0]
            x[b, masked] = full.argmax(-1)[masked]
    return x


def test_release_sampler_parity():
    # Two rows with different known sets, more unknowns than the 128 steps (as in the release's use).
    big = NativeLayout(text_vocab_size=12, image_offset=12, image_vocab_size=10, mask_id=M, text_len=6, image_len=130)
    toy = Toy(seed=3, segs=big.segments)
    task = pair_from_prompt(big, torch.arange(6).repeat(2, 1), [6, 2])
    out = sample(toy, task.x, task.known, segments=big.segments, mask_id=M, num_inference_steps=128, schedule="arccos",
                 confidence_temperature=10.0, guidance_scale=5.0, guidance_schedule="linear",
                 generator=[torch.Generator().manual_seed(r) for r in range(2)])
    ref = release_reference(toy, task.x, task.known, [torch.Generator().manual_seed(r) for r in range(2)])
    assert torch.equal(out.tokens, ref)
    # Steps where no row commits anything run no forward (the release returns early there too).
    counts = commit_counts((~task.known).sum(-1), 128)
    assert out.nfe == int((counts.sum(0) > 0).sum()) == len(toy.calls)
    assert sum(c["x"].shape[0] == 4 for c in toy.calls) == out.nfe - 1  # all guided but t = 1


def test_bad_inputs():
    task = t2i()
    cases = [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(strategy="greedy"), "strategy.*'maskgit'"),
        (dict(schedule="square"), "schedule"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_schedule="cosine"), "guidance_schedule"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(threshold=1.5), "threshold"),
        (dict(order="spiral"), "order.*'halton'"),
        (dict(order="halton"), "square grid"),  # 20 image tokens
        (dict(generator=[torch.Generator()]), "generator"),
        (dict(model_kwargs={"size": torch.ones(3)}), "model_kwargs"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            run(Toy(), task, **kw)
    with pytest.raises(ValueError, match="known"):
        sample(Toy(), task.x, task.known.long(), segments=SEGS, mask_id=M, num_inference_steps=2)
    bad = task.x.clone()
    bad[0, 0] = 15  # an image id in a known text slot
    with pytest.raises(ValueError, match="'text'"):
        sample(Toy(), bad, task.known, segments=SEGS, mask_id=M, num_inference_steps=2)


def test_check_false_skips_the_input_checks_only(monkeypatch):
    """`check=False` (the pipeline's, which checks at its edge) gives the same tokens without reading
    the known tokens back from the device; the settings are still checked against the denoiser."""
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(3, 1), [0, 2, 5])
    opts = dict(guidance_scale=3.0, generator=[torch.Generator().manual_seed(r) for r in range(3)])
    ref = run(Toy(), task, **opts)
    read = []
    monkeypatch.setattr("medim.diffusion.sampler.check_tokens", lambda *args: read.append(args))
    out = run(Toy(), task, check=False, guidance_scale=3.0,
              generator=[torch.Generator().manual_seed(r) for r in range(3)])
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe and not read
    run(Toy(), task, **opts)
    assert len(read) == 1
    with pytest.raises(ValueError, match="cache_interval"):
        run(Toy(), task, check=False, cache_interval=2)


@pytest.mark.parametrize("opts", [dict(strategy="maskgit"), dict(strategy="threshold"), dict(strategy="ddpm"),
                                  dict(strategy="maskgit", temperature=0.7, top_k=5, top_p=0.9)])
def test_denoiser_outputs_matter_only_up_to_a_per_position_constant(opts):
    """Raw logits (or log-probs shifted by any per-position constant) give the same tokens as
    log-probs: what lets the pipeline skip the model's log-softmax (`return_logits=True`)."""
    toy = Toy()
    g = torch.Generator().manual_seed(9)
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(3, 1), [0, 2, 5])

    def shifted(x, sigma, positions, **kw):
        # A different constant per row and position, varying from call to call (as logits do).
        return {n: lp + 20 * torch.rand(*lp.shape[:2], 1, generator=g) - 10
                for n, lp in toy(x, sigma, positions, **kw).items()}

    kw = dict(guidance_scale=3.0, **opts)
    ref = run(toy, task, generator=torch.Generator().manual_seed(1), **kw)
    out = run(shifted, task, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out.tokens, ref.tokens) and out.nfe == ref.nfe


SQUARE = NativeLayout(text_vocab_size=12, image_offset=12, image_vocab_size=10, mask_id=M, text_len=6, image_len=16)


def test_halton_order_is_a_spread_out_permutation():
    for side in range(1, 41):
        assert sorted(halton_order(side)) == list(range(side * side)), side
    # Spread out: the first 8 cells of an 8 x 8 grid sit in 8 different rows and 8 different columns
    # (a raster order would fill one row), the first 32 of a 32 x 32 grid in 32 columns.
    first = halton_order(8)[:8]
    assert len({j // 8 for j in first}) == len({j % 8 for j in first}) == 8
    assert len({j % 32 for j in halton_order(32)[:32]}) == 32
    assert torch.equal(halton_rank(64)[torch.tensor(halton_order(8))], torch.arange(64))
    with pytest.raises(ValueError, match="square"):
        halton_rank(20)


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_halton_commits_every_image_position_once_in_halton_order(guidance):
    task = pair_from_prompt(SQUARE, torch.arange(6).repeat(2, 1), [0, 3])
    known = task.known.clone()
    known[1, [6 + 3, 6 + 7]] = True  # row 1 has two image tokens given (inpainting)
    x = task.x.clone()
    x[1, [6 + 3, 6 + 7]] = 12
    states = [x.clone()]
    out = sample(Toy(scale=0.3, segs=SQUARE.segments), x, known, segments=SQUARE.segments, mask_id=M,
                 num_inference_steps=7, order="halton", guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(0), callback=lambda i, t, xi: states.append(xi.clone()))
    assert not (out.tokens == M).any() and torch.equal(out.tokens[known], x[known])
    masked = torch.stack([s == M for s in states])  # [steps + 1, B, N]
    committed = masked[:-1] & ~masked[1:]  # [steps, B, N]: committed at that step
    image = slice(6, 22)
    assert torch.equal(committed[:, :, image].sum(0), (~known[:, image]).long())  # each unknown once, known never
    rank = halton_rank(16)
    for row in range(2):
        steps = [rank[committed[s, row, image]] for s in range(7)]
        done = [r for r in steps if r.numel()]
        assert all(a.max() < b.min() for a, b in zip(done, done[1:])), steps  # Halton order, step after step
    # Each modality on its own commit schedule.
    for seg in SQUARE.segments:
        sl = slice(seg.start, seg.stop)
        expected = commit_counts((~known[:, sl]).sum(-1), 7)
        assert torch.equal(committed[:, :, sl].sum(-1).T, expected), seg.name


@pytest.mark.parametrize("opts", [dict(strategy="maskgit"), dict(strategy="threshold"), dict(strategy="ddpm"),
                                  dict(temperature=0.0), dict(top_k=3, top_p=0.8), dict(order="halton"),
                                  dict(order="text_first", text_share=0.25)])
def test_nan_from_the_denoiser_raises(opts):
    toy = Toy(segs=SQUARE.segments)
    nan_at = 3

    def broken(x, sigma, positions, **kw):
        out = toy(x, sigma, positions, **kw)
        if len(toy.calls) == nan_at + 1:
            out[next(iter(out))][0, 1, 3] = math.nan  # one entry of one position: its softmax is all NaN
        return out

    task = pair_from_prompt(SQUARE, torch.arange(6).repeat(2, 1), [2, 4])
    with pytest.raises(FloatingPointError, match=f"NaN at step {nan_at} of 8"):
        sample(broken, task.x, task.known, segments=SQUARE.segments, mask_id=M, num_inference_steps=8,
               guidance_scale=2.0, generator=torch.Generator().manual_seed(0), **opts)
    if opts.get("strategy") != "threshold":
        assert len(toy.calls) == 8  # checked on the device and read once: the loop ran to its end


def test_nan_in_the_final_pass_raises():
    toy = Toy(segs=SQUARE.segments)

    def broken(x, sigma, positions, **kw):
        out = toy(x, sigma, positions, **kw)
        if len(toy.calls) == 5:  # ddpm: 4 steps, then the final pass for what is still masked
            out["image"].fill_(math.nan)
        return out

    task = text_to_image(SQUARE, torch.arange(6).repeat(2, 1))
    with pytest.raises(FloatingPointError, match="the final pass"):
        sample(broken, task.x, task.known, segments=SQUARE.segments, mask_id=M, num_inference_steps=4, strategy="ddpm",
               time_eps=0.5, generator=torch.Generator().manual_seed(0))


def test_pipeline_with_nan_weights_raises():
    from medim import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan  # as a diverged training run leaves it
    for call in (lambda: pipe.text_to_image(["No focal lesion."], num_inference_steps=4),
                 lambda: pipe.generate_pairs([""], num_inference_steps=4, cache_interval=2)):
        with pytest.raises(FloatingPointError, match="denoiser returned NaN at step 0"):
            call()


@pytest.mark.parametrize("options", [dict(), dict(guidance_scale=3.0), dict(order="text_first", guidance_scale=3.0),
                                     dict(strategy="ddpm"), dict(top_k=3, top_p=0.9, temperature=0.7),
                                     dict(schedule="cosine_ratio"), dict(strategy="threshold")])
def test_the_step_loop_reads_nothing_back(monkeypatch, options):
    """No host read inside the step loop (on an accelerator each would stall it): the only reads
    are after it (whether the final pass must run, the NaN flag), plus the threshold strategy's
    one count per step, which decides its length. (Context caching also reads at its refreshes,
    by design; this toy denoiser has no cache.)"""
    from medim.diffusion import sampler
    from tests.helpers.training import HostSyncCounter

    seen, denoise = [], sampler._denoise

    def counted(*args, **kwargs):
        with HostSyncCounter() as reads:
            out = denoise(*args, **kwargs)
        seen.append((reads.calls, out.nfe))
        return out

    monkeypatch.setattr(sampler, "_denoise", counted)
    task = pair_from_prompt(LAYOUT, torch.arange(6).repeat(2, 1), [0, 2])
    run(Toy(), task, generator=torch.Generator().manual_seed(0), **options)
    (reads, nfe), = seen
    per_step = nfe if options.get("strategy") == "threshold" else 0
    assert reads == ["_local_scalar_dense"] * (per_step + 2)
