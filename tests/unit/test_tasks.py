import pytest
import torch

from medim.diffusion import image_to_report, inpainting, pair_from_prompt, text_to_image, unconditional
from medim.layout import NativeLayout

LAYOUT = NativeLayout(text_vocab_size=20, image_offset=20, image_vocab_size=16, mask_id=36, text_len=5, image_len=6)
M = LAYOUT.mask_id


def test_text_to_image():
    ids = torch.tensor([[3, 4, 5, 1, 0], [7, 8, 1, 0, 0]])
    task = text_to_image(LAYOUT, ids)
    assert task.known[:, :5].all() and not task.known[:, 5:].any()
    assert torch.equal(task.x[:, :5], ids) and (task.x[:, 5:] == M).all()


def test_image_to_report_offsets_codes():
    codes = torch.tensor([[0, 1, 2, 3, 4, 15]])
    task = image_to_report(LAYOUT, codes)
    assert torch.equal(task.x[0, 5:], codes[0] + 20)
    assert (task.x[:, :5] == M).all() and task.known[:, 5:].all() and not task.known[:, :5].any()
    with pytest.raises(ValueError, match="image_codes"):
        image_to_report(LAYOUT, torch.tensor([[0, 1, 2, 3, 4, 16]]))


def test_pair_from_prompt_per_row_lengths():
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    task = pair_from_prompt(LAYOUT, ids, [2, 0])
    assert task.known[0].tolist() == [True, True] + [False] * 9
    assert not task.known[1].any()
    assert task.x[0, :2].tolist() == [3, 4] and (task.x[0, 2:] == M).all() and (task.x[1] == M).all()
    with pytest.raises(ValueError, match="prompt_lengths"):
        pair_from_prompt(LAYOUT, ids, [6, 0])


def test_unconditional_and_inpainting():
    task = unconditional(LAYOUT, 3)
    assert task.x.shape == (3, 11) and (task.x == M).all() and not task.known.any()
    x = torch.tensor([[3, 4, 5, 1, 0, 20, 21, 22, 23, 24, 25]])
    regen = torch.zeros_like(x, dtype=torch.bool)
    regen[0, [1, 7, 8]] = True
    task = inpainting(LAYOUT, x, regen)
    assert torch.equal(task.known, ~regen)
    assert (task.x[regen] == M).all() and torch.equal(task.x[~regen], x[~regen])


def test_bad_inputs():
    with pytest.raises(ValueError, match="report_ids"):
        text_to_image(LAYOUT, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="report_ids.*'text'"):
        text_to_image(LAYOUT, torch.full((1, 5), 30))  # an image id in the text slots
    with pytest.raises(ValueError, match="batch_size"):
        unconditional(LAYOUT, 0)
    with pytest.raises(ValueError, match="regenerate"):
        inpainting(LAYOUT, torch.zeros(1, 11, dtype=torch.long), torch.zeros(1, 11))
