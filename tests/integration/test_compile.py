"""`pipe.compile()`: the compiled denoiser gives the eager tokens and compiles once per task shape:
nothing recompiles across steps, chunks (the last one is padded) or prompts of other lengths."""

import pytest
import torch

from medim import MeDiMPipeline
from medim.data.synthetic import make_pair
from medim.models.denoiser import ModelDenoiser

PROMPTS = ["A large dense nodule in the right upper zone.", "No focal lesion.", "Frontal chest radiograph.",
           "A small lucent lesion in the left lower zone.", "The right lower zone shows a small bright focus."]


def demo():
    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tasks(pipe, prompts, steps=4):
    """The three tasks, guided (so both graphs, unguided and guided, are used), in chunks of 2."""
    opts = dict(num_inference_steps=steps, guidance_scale=2.0, batch_size=2,
                generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))])
    images = [make_pair(i, size=64)[0] for i in range(len(prompts))]
    return [pipe.text_to_image(prompts, output_type="tokens", **opts).tokens,
            # prompts of different lengths: each chunk leaves other report positions unknown
            pipe.image_to_report(images, prompt=[p.split()[0] + " " * i for i, p in enumerate(prompts)], **opts).tokens,
            pipe.generate_pairs([p[: 5 * i] for i, p in enumerate(prompts)], output_type="tokens", **opts).tokens]


def test_compiled_pipeline_matches_eager_and_never_recompiles():
    pipe = demo()
    eager = tasks(pipe, PROMPTS)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        assert pipe.compile(backend=counting_backend) is pipe
        first = tasks(pipe, PROMPTS[:3])  # 3 outputs in chunks of 2: the last chunk is padded
        compiled = len(graphs)
        again = tasks(pipe, PROMPTS)  # more outputs, other prompts, three chunks
        assert len(graphs) == compiled > 0  # nothing traced again
    finally:
        torch._dynamo.reset()
    # Rows do not depend on their batch, so the padded chunks give the eager tokens.
    assert all(torch.equal(a, b[:3]) for a, b in zip(first, eager))
    assert all(torch.equal(a, b) for a, b in zip(again, eager))


def test_compile_options_are_checked():
    pipe = demo()
    with pytest.raises(ValueError, match="mode must be one of"):
        pipe.compile(mode="fastest")
    with pytest.raises(TypeError, match="backend"):
        pipe.compile(backend=3)
    with pytest.raises(TypeError, match="fullgraph"):
        pipe.compile(fullgraph="yes")
    assert not ModelDenoiser(pipe.model).compiled


@pytest.mark.slow
def test_inductor_tokens_agree_with_eager():
    """The real compiler (inductor, C++ on CPU) fuses and reorders float maths: tokens must agree
    with eager on at least 99.9 % of positions, and steps, chunks and prompts recompile nothing."""
    from torch._dynamo.utils import counters

    pipe = demo()
    eager = tasks(pipe, PROMPTS, steps=8)
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe.compile()
        tasks(pipe, PROMPTS[:3], steps=8)
        compiled = counters["stats"]["unique_graphs"]
        out = tasks(pipe, PROMPTS, steps=8)
        assert counters["stats"]["unique_graphs"] == compiled > 0
    finally:
        torch._dynamo.reset()
    same = sum(int((a == b).sum()) for a, b in zip(out, eager))
    total = sum(a.numel() for a in out)
    assert same / total >= 0.999, same / total
