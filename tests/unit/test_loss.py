import math

import pytest
import torch

from medim.diffusion import LinearSchedule, diffusion_loss, sample_times
from medim.layout import Segment

SEGS = (Segment("text", 0, 3, 0, 5), Segment("image", 3, 4, 6, 4))  # mask id 5
MASK = 5
TABLE = {  # fixed log-probs per segment, independent of the input
    "text": torch.log_softmax(torch.arange(15.0).reshape(3, 5).sin() * 2, -1),
    "image": torch.log_softmax(torch.arange(16.0).reshape(4, 4).cos() * 3, -1),
}


def table_denoiser(x, sigma, positions, **kw):
    assert positions is None and sigma.shape == (x.shape[0],)
    return {k: v.expand(x.shape[0], -1, -1) for k, v in TABLE.items()}


X0 = torch.tensor([[1, 4, 0, 6, 9, 7, 8], [2, 2, 3, 9, 9, 6, 6]])


def test_loss_equals_hand_computation():
    known = torch.zeros_like(X0, dtype=torch.bool)
    known[1, 6] = True
    loss_mask = torch.ones_like(known)
    loss_mask[0, 2] = False
    out = diffusion_loss(table_denoiser, X0, SEGS, MASK, known=known, loss_mask=loss_mask,
                         generator=torch.Generator().manual_seed(3))
    # Re-draw in the documented order: t (one per stratum), then the mask uniforms.
    g = torch.Generator().manual_seed(3)
    u_t = torch.rand(2, generator=g).tolist()
    u_m = torch.rand(2, 7, generator=g).tolist()
    num, den, seg_num, seg_den = 0.0, 0, {"text": 0.0, "image": 0.0}, {"text": 0, "image": 0}
    for b in range(2):
        t = (1 - 1e-3) * ((u_t[b] + b) / 2) + 1e-3
        for n in range(7):
            name, start, vstart = ("text", 0, 0) if n < 3 else ("image", 3, 6)
            if known[b, n] or not loss_mask[b, n]:
                continue
            den += 1
            seg_den[name] += 1
            if u_m[b][n] < (1 - 1e-3) * t:  # masked: weight 1/t
                term = -TABLE[name][n - start, X0[b, n] - vstart].item() / t
                num += term
                seg_num[name] += term
    assert out.num_tokens.item() == den == 12
    assert math.isclose(out.loss.item(), num / den, rel_tol=1e-5)
    for name in seg_num:
        assert math.isclose(out.per_modality[name].item(), seg_num[name] / seg_den[name], rel_tol=1e-5, abs_tol=1e-7)
    assert 0 < out.num_masked.item() <= den
    # Modality weights scale each segment's sum, the denominator stays the counted tokens.
    w = diffusion_loss(table_denoiser, X0, SEGS, MASK, known=known, loss_mask=loss_mask,
                       modality_weights={"image": 0.0}, generator=torch.Generator().manual_seed(3))
    assert math.isclose(w.loss.item(), seg_num["text"] / den, rel_tol=1e-5, abs_tol=1e-7)


def test_times_are_stratified():
    t = sample_times(8, eps=1e-3, generator=torch.Generator().manual_seed(0))
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor()
    assert strata.tolist() == list(range(8))


def test_snr_cap_softmin():
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = diffusion_loss(table_denoiser, X0, SEGS, MASK, generator=g())
    capped = diffusion_loss(table_denoiser, X0, SEGS, MASK, snr_cap=2.0, generator=g())
    assert torch.equal(base.t, capped.t) and capped.loss < base.loss
    huge = diffusion_loss(table_denoiser, X0, SEGS, MASK, snr_cap=1e9, generator=g())
    torch.testing.assert_close(huge.loss, base.loss)


def _recording(seen):
    def denoiser(x, sigma, positions, **kw):
        seen.append(x.clone())
        return table_denoiser(x, sigma, positions)
    return denoiser


def test_prefix_keeping_rate():
    # sigma = 50 everywhere: every token is masked unless kept, so the kept fraction is the rate.
    x0 = X0[:1].expand(4000, -1).contiguous()
    seen = []
    diffusion_loss(_recording(seen), x0, SEGS, MASK, schedule=LinearSchedule(50.0, 50.0), keep_prefix_prob=0.3,
                   prefix_len=torch.full((4000,), 2), generator=torch.Generator().manual_seed(0))
    xt = seen[0]
    kept = (xt[:, :2] == x0[:, :2]).all(-1)
    assert torch.equal(kept, (xt[:, :2] != MASK).any(-1))  # both prefix tokens or neither
    assert (xt[:, 2:] == MASK).all()
    assert abs(kept.float().mean().item() - 0.3) < 0.03


def test_condition_dropout_rate_and_exclusion():
    # sigma ~ 0: nothing is masked except a dropped modality, which is masked whole.
    x0 = X0[:1].expand(4000, -1).contiguous()
    seen = []
    out = diffusion_loss(_recording(seen), x0, SEGS, MASK, schedule=LinearSchedule(1e-9, 2e-9), cond_drop_prob=0.2,
                         generator=torch.Generator().manual_seed(0))
    xt = seen[0]
    text_dropped, image_dropped = (xt[:, :3] == MASK).all(-1), (xt[:, 3:] == MASK).all(-1)
    assert not (text_dropped & image_dropped).any()
    assert not ((xt == MASK).any(-1) & ~(text_dropped | image_dropped)).any()
    dropped = text_dropped | image_dropped
    assert abs(dropped.float().mean().item() - 0.2) < 0.025
    assert abs(text_dropped.float().sum().item() / dropped.sum().item() - 0.5) < 0.08
    # Dropped positions do not count.
    assert out.num_tokens.item() == 4000 * 7 - 3 * text_dropped.sum().item() - 4 * image_dropped.sum().item()


def test_hidden_positions_are_masked_and_not_scored():
    hidden = torch.zeros_like(X0, dtype=torch.bool)
    hidden[0, 3:] = True  # row 0: the image hidden (a text-first pair's report state)
    known = torch.zeros_like(hidden)
    known[0, 3] = True  # known wins over hidden
    seen = []
    out = diffusion_loss(_recording(seen), X0, SEGS, MASK, known=known, hidden=hidden,
                         generator=torch.Generator().manual_seed(3))
    assert (seen[0][0, 4:] == MASK).all() and seen[0][0, 3] == X0[0, 3]
    assert out.num_tokens.item() == 2 * 7 - 4
    # The rest is the loss without the hidden positions: the same draws, the hidden ones not counted.
    ref = diffusion_loss(table_denoiser, X0, SEGS, MASK, known=known, loss_mask=~hidden,
                         generator=torch.Generator().manual_seed(3))
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="hidden"):
        diffusion_loss(table_denoiser, X0, SEGS, MASK, hidden=hidden[:, :3])


def test_condition_keeping_rate_and_exclusion():
    # sigma huge: everything is masked except a kept modality, which stays clean whole.
    x0 = X0[:1].expand(4000, -1).contiguous()
    seen = []
    out = diffusion_loss(_recording(seen), x0, SEGS, MASK, schedule=LinearSchedule(50.0, 50.0), cond_keep_prob=0.4,
                         generator=torch.Generator().manual_seed(0))
    xt = seen[0]
    text_kept, image_kept = (xt[:, :3] == x0[:, :3]).all(-1), (xt[:, 3:] == x0[:, 3:]).all(-1)
    assert not (text_kept & image_kept).any()
    assert not ((xt != MASK).any(-1) & ~(text_kept | image_kept)).any()
    kept = text_kept | image_kept
    assert abs(kept.float().mean().item() - 0.4) < 0.025
    assert abs(text_kept.float().sum().item() / kept.sum().item() - 0.5) < 0.08
    # Kept positions are conditioning: they do not count.
    assert out.num_tokens.item() == 4000 * 7 - 3 * text_kept.sum().item() - 4 * image_kept.sum().item()
    # Off by default: the release's masks, draw for draw.
    same = diffusion_loss(_recording(seen), x0, SEGS, MASK, schedule=LinearSchedule(50.0, 50.0),
                          cond_keep_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert (seen[-1] == MASK).all() and same.num_tokens.item() == 4000 * 7


def test_gradient_reaches_the_model():
    logits = torch.zeros(7, 10, requires_grad=True)

    def denoiser(x, sigma, positions):
        lp = logits.expand(x.shape[0], -1, -1)
        return {"text": lp[:, :3, :5].log_softmax(-1), "image": lp[:, 3:, :4].log_softmax(-1)}

    out = diffusion_loss(denoiser, X0, SEGS, MASK, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(out.loss)


def test_bad_inputs():
    with pytest.raises(ValueError, match="x0.*'image'"):
        diffusion_loss(table_denoiser, torch.tensor([[1, 1, 1, 1, 1, 1, 1]]), SEGS, MASK)
    with pytest.raises(ValueError, match="keep_prefix_prob"):
        diffusion_loss(table_denoiser, X0, SEGS, MASK, keep_prefix_prob=1.5)
    with pytest.raises(ValueError, match="prefix_len"):
        diffusion_loss(table_denoiser, X0, SEGS, MASK, keep_prefix_prob=0.1)
    with pytest.raises(ValueError, match="modality_weights.*'audio'"):
        diffusion_loss(table_denoiser, X0, SEGS, MASK, modality_weights={"audio": 1.0})
    with pytest.raises(ValueError, match="segments"):
        diffusion_loss(table_denoiser, X0, SEGS[:1], MASK)
    with pytest.raises(ValueError, match="mask_id"):
        diffusion_loss(table_denoiser, X0, SEGS, 2)
    with pytest.raises(ValueError, match="loss_mask"):
        diffusion_loss(table_denoiser, X0, SEGS, MASK, loss_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="denoiser.*'image'"):
        diffusion_loss(lambda x, s, p: {"text": TABLE["text"].expand(2, -1, -1)}, X0, SEGS, MASK)
