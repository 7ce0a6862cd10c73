import pytest
import torch

from medim.layout import MeDiMV1Layout, NativeLayout, SequenceLayout
from tests.helpers.backbone import TINY_BASE_VOCAB, tiny_tokenizer

V = TINY_BASE_VOCAB


@pytest.fixture
def v1():
    return MeDiMV1Layout(base_vocab_size=V, text_len=6, image_len=5, image_vocab_size=64)


@pytest.fixture
def native():
    return NativeLayout(text_vocab_size=200, image_offset=200, image_vocab_size=64, mask_id=264, text_len=6,
                        image_len=5)


def test_release_defaults_match_formats():
    lay = MeDiMV1Layout()
    assert (lay.boi_id, lay.eoi_id, lay.eos_id, lay.mask_id) == (32000, 32001, 32002, 32003)
    text, image = lay.segments
    assert (text.vocab_start, text.vocab_stop, image.vocab_start, image.vocab_stop) == (0, 32003, 32004, 40196)
    assert lay.state_len == 1280 and lay.min_vocab_size == 40196
    assert lay.report_end_id is None and not lay.supervise_padding
    liquid = NativeLayout()
    assert (liquid.mask_id, liquid.bos_id, liquid.eos_id, liquid.pad_id) == (264192, 2, 1, 0)
    assert liquid.report_end_id == liquid.eos_id
    assert liquid.min_vocab_size == 264193 and liquid.supervise_padding


def test_dict_round_trip_and_errors(v1, native):
    for lay in (v1, native):
        again = SequenceLayout.from_dict(lay.to_dict())
        assert again == lay and type(again) is type(lay)
    with pytest.raises(ValueError, match="accepted: \\['medim-v1', 'native'\\]"):
        SequenceLayout.from_dict({"name": "nope"})
    with pytest.raises(ValueError, match="text_len"):
        MeDiMV1Layout(text_len=0)
    with pytest.raises(ValueError, match="mask_id"):
        NativeLayout(text_vocab_size=200, image_offset=200, image_vocab_size=64, mask_id=210)


def test_v1_sequence_assembly_and_read_out(v1):
    tok = tiny_tokenizer()
    cond = v1.condition(tok, [(512, 512), (1024, 768)])
    c0, c1 = (int(n) for n in cond["cond_mask"].sum(1))
    assert c1 == c0 + 1 and cond["cond_ids"].shape == (2, c1)
    assert cond["cond_ids"][0, :c0].tolist() == tok(v1.size_string(512, 512))["input_ids"]
    assert cond["cond_ids"][0, 0] == tok.bos_token_id  # the size string keeps its BOS
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    image = v1.image_segment.vocab_start + torch.arange(10).view(2, 5)
    x = torch.cat([text, image], 1)
    inp = v1.backbone_inputs(x, **cond)
    L = 5 + 6 + 3 + c1
    assert inp.input_ids.shape == (2, L) and inp.position_ids[0].tolist() == list(range(L))
    for b, c in ((0, c0), (1, c1)):
        row = [v1.boi_id, *image[b].tolist(), v1.eoi_id, *cond["cond_ids"][b, :c].tolist(), *text[b].tolist(),
               v1.eos_id]
        assert inp.input_ids[b, : len(row)].tolist() == row
        L_row = len(row)
        # keys: everything of the row except text padding; the tail after <eos> is masked
        expected_mask = [True] * L_row + [False] * (L - L_row)
        for i in range(6):
            expected_mask[L_row - 7 + i] = bool(text[b, i] != 0)
        assert inp.key_mask[b].tolist() == expected_mask
        assert inp.out_index[b, :6].tolist() == [L_row - 8 + i for i in range(6)]  # L_row - (text_len + 2) + i
        assert inp.out_index[b, 6:].tolist() == [2 + j for j in range(5)]


def test_v1_condition_is_required(v1):
    x = torch.full((1, v1.state_len), v1.mask_id)
    with pytest.raises(ValueError, match="cond_ids"):
        v1.backbone_inputs(x)


def test_native_backbone_inputs(native):
    x = torch.cat([torch.randint(0, 200, (3, 6)), torch.randint(200, 264, (3, 5))], 1)
    inp = native.backbone_inputs(x)
    assert inp.key_mask is None
    assert torch.equal(inp.input_ids[:, 0], torch.full((3,), 2)) and torch.equal(inp.input_ids[:, 1:], x)
    assert torch.equal(inp.input_ids.gather(1, inp.out_index), x)  # read at each token's own position


def test_reports_native(native):
    tok = tiny_tokenizer()
    ids = native.encode_reports(tok, ["the chest", "no"])
    chest, the = tok.convert_tokens_to_ids(["chest", "the"])
    assert ids[0].tolist() == [the, chest, native.eos_id, 0, 0, 0]
    with pytest.warns(UserWarning, match="truncated"):
        long = native.encode_reports(tok, ["the " * 10])
    assert long[0, -1] == native.eos_id and long.shape == (1, 6)
    ids[0, 4] = chest  # anything after eos is ignored
    assert native.decode_reports(tok, ids) == ["the chest", "no"]


def test_reports_v1_keep_bos_and_no_eos(v1):
    tok = tiny_tokenizer()
    ids = v1.encode_reports(tok, ["the chest"])
    assert ids[0].tolist() == [tok.bos_token_id, *tok("the chest", add_special_tokens=False)["input_ids"], 0, 0, 0]
    assert v1.decode_reports(tok, ids) == ["the chest"]


def test_validate_state(native):
    x = torch.cat([torch.randint(0, 200, (2, 6)), torch.randint(200, 264, (2, 5))], 1)
    native.validate_state(x)
    bad = x.clone()
    bad[0, 7] = 5  # a text id at an image position
    with pytest.raises(ValueError, match="image positions"):
        native.validate_state(bad)
    with pytest.raises(ValueError, match="positions"):
        native.validate_state(x[:, :5])
