"""The fast sampling path computes what the plain path computes.

The release-style loop of the benchmarks (one sample at a time, guidance as its own forward,
full-vocabulary logits at every position, log-softmax before mixing) draws the same random
numbers as `sample`, so on a tiny model both must give the same tokens.
"""

import sys
from pathlib import Path

import torch

from medim.diffusion.draw import categorical
from medim.diffusion.sampler import sample
from medim.models.medim import MeDiMModelOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from common import medim_v1_model, release_style_sample, text_to_image_batch  # noqa: E402

SHAPE = dict(text_len=16, image_len=64, base_vocab=120, image_vocab=64)


def _fast(model, x, known, cond, steps, guidance, seeds):
    layout = model.layout
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def denoiser(xt, sigma, positions, **kw):  # as the pipeline's: raw logits, normalised by the sampler
        return model(xt, sigma, positions=positions, return_logits=True, **kw).logits

    return sample(denoiser, x, known, segments=layout.segments, mask_id=layout.mask_id, num_inference_steps=steps,
                  guidance_scale=guidance, generator=gens, model_kwargs=cond)


def test_batched_guided_sampling_matches_release_style_loop():
    model = medim_v1_model("tiny", **SHAPE)
    x, known, cond = text_to_image_batch(model.layout, 3, cond_len=5, seed=2)
    x[1, 10:16] = model.layout.pad_id  # padded report: the key mask is exercised too
    with torch.inference_mode():
        for guidance in (0.0, 5.0):
            fast = _fast(model, x, known, cond, 6, guidance, [7, 8, 9])
            ref = release_style_sample(model, x, known, cond, 6, guidance,
                                       [torch.Generator().manual_seed(s) for s in (7, 8, 9)])
            assert torch.equal(fast.tokens, ref), guidance
            assert fast.nfe == 6
    # Guidance changes the result (the unconditional half is really used).
    assert not torch.equal(_fast(model, x, known, cond, 6, 5.0, [7, 8, 9]).tokens,
                           _fast(model, x, known, cond, 6, 0.0, [7, 8, 9]).tokens)


def test_blocked_categorical_is_the_inverse_cdf():
    g = torch.Generator().manual_seed(0)
    for V in (64, 300, 1000, 1024):  # below, across, above the 128-wide blocks; ragged tail or whole
        weights = torch.rand(4, 50, V, generator=g) ** 4
        weights[0, :, V // 2 :] = 0.0  # zero-probability entries are never picked
        u = torch.rand(4, 50, generator=g)
        idx, total = categorical(weights, u)
        cdf = weights.double().cumsum(-1)
        ref = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
        assert torch.equal(idx, ref.clamp(max=V - 1)), V
        torch.testing.assert_close(total, weights.sum(-1))
        assert (weights.gather(-1, idx[..., None]) > 0).all()


def test_in_place_log_softmax_only_without_grad():
    model = medim_v1_model("tiny", **SHAPE)
    x, _, cond = text_to_image_batch(model.layout, 2, cond_len=5)
    sigma = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        logits = model(x, sigma, return_logits=True, **cond).logits
        lp = model(x, sigma, **cond).logprobs
    for name in ("text", "image"):
        torch.testing.assert_close(lp[name], logits[name].log_softmax(-1))
    out = model(x, sigma, positions={"image": torch.arange(16, 20)}, **cond).logprobs["image"]
    out.sum().backward()  # training keeps the autograd-friendly path
    assert model.layers[0].self_attn.q_proj.weight.grad is not None


def test_compiled_model_static_shapes_same_tokens():
    model = medim_v1_model("tiny", **SHAPE)
    x, known, cond = text_to_image_batch(model.layout, 2, cond_len=5)
    with torch.inference_mode():
        eager = _fast(model, x, known, cond, 4, 5.0, [1, 2]).tokens
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.compile(backend=counting_backend, dynamic=False)
    with torch.inference_mode():
        first = _fast(model, x, known, cond, 4, 5.0, [1, 2]).tokens
        compiled = len(graphs)
        second = _fast(model, x, known, cond, 4, 5.0, [1, 2]).tokens
    torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager)
    # Positions and batch sizes are static across steps: nothing is traced again on a second run.
    assert compiled > 0 and len(graphs) == compiled


def test_pipeline_asks_for_logits_and_its_tokens_are_unchanged(upstream, monkeypatch):
    """The pipeline's denoiser skips the model's log-softmax (raw logits); forcing the log-prob
    path back on gives the same tokens for every task."""
    from medim import MeDiMPipeline
    from tests.helpers.pipeline import V1_LAYOUT

    paths = upstream
    pipe = MeDiMPipeline.from_original(paths["release"], backbone=paths["liquid"], tokenizer=paths["llama_tokenizer"],
                                       vqgan=paths["space"], num_layers=2, layout=V1_LAYOUT)
    pipe.set_progress_bar_config(disable=True)
    forward, seen = pipe.model.forward, []

    def spy(*args, return_logits=False, **kwargs):
        seen.append(return_logits)
        return forward(*args, return_logits=return_logits, **kwargs)

    def run():
        opts = dict(num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
        image = pipe.text_to_image(["the heart", "no"], output_type="tokens", **opts).images
        pairs = pipe.generate_pairs(["the"], num_pairs_per_prompt=2, **opts).tokens
        return image, pairs

    monkeypatch.setattr(pipe.model, "forward", spy)
    checked = []  # the pipeline checks at its edge: the sampler must not read the tokens back per chunk
    monkeypatch.setattr("medim.diffusion.sampler.check_tokens", lambda *args: checked.append(args))
    fast = run()
    assert seen and all(seen) and not checked
    # Log-probs where the sampler asked for logits: the same tokens (a per-position constant apart).
    monkeypatch.setattr(pipe.model, "forward",
                        lambda *a, return_logits=False, **kw: MeDiMModelOutput(logits=forward(*a, **kw).logprobs))
    slow = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
