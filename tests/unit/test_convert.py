import pytest
import torch
from safetensors.torch import load_file, save_file

import medim.models.convert as convert
from medim import MeDiMModel
from medim.layout import MeDiMV1Layout
from tests.helpers.backbone import (
    TINY_BASE_VOCAB,
    TINY_IMAGE_VOCAB,
    tiny_gemma_config,
    write_tiny_liquid,
    write_tiny_release_checkpoint,
)

SMALL = dict(image_offset=200, image_vocab_size=64, text_len=8, image_len=16)


def test_truncated_liquid_reads_only_needed_shards(tmp_path, monkeypatch):
    ref = write_tiny_liquid(tmp_path / "liquid", num_layers=6, shards=3)
    opened = []
    real_safe_open = convert.safe_open

    def spy(path, *args, **kwargs):
        opened.append(path.rsplit("/", 1)[-1])
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(convert, "safe_open", spy)
    model = MeDiMModel.from_liquid(tmp_path / "liquid", num_layers=2, **SMALL)
    # shard 1 holds embed + layers 0-1, shard 3 the final norm; shard 2 (layers 2-3) is never opened
    assert sorted(opened) == ["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert len(model.layers) == 2 and model.layout.mask_id == 264
    table = model.embed_tokens.weight
    assert table.shape == (265, 32) and model.lm_head.weight is table
    assert torch.allclose(table[264], table[:200].mean(0), atol=1e-6)  # mask row: mean text embedding
    # identity AdaLN + causal switch: the first two layers of the full Gemma, exactly
    model.config.causal = True
    for layer in model.layers:
        layer.self_attn.is_causal = True
    ref.model.layers = ref.model.layers[:2]
    ref.config.num_hidden_layers = 2
    ids = torch.randint(0, 264, (2, 10))
    with torch.no_grad():
        diff = (model.backbone_logits(ids, torch.rand(2))[..., :264] - ref(ids).logits).abs().max()
    assert diff < 1e-4


def test_liquid_dtype_and_errors(tmp_path):
    write_tiny_liquid(tmp_path / "liquid", num_layers=2, shards=1)
    model = MeDiMModel.from_liquid(tmp_path / "liquid", num_layers=1, dtype=torch.bfloat16, **SMALL)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.backbone_config.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError, match="only 2 layers"):
        MeDiMModel.from_liquid(tmp_path / "liquid", num_layers=3, **SMALL)
    with pytest.raises(ValueError, match="layout must be 'native'"):
        MeDiMModel.from_liquid(tmp_path / "liquid", layout="medim-v1", **SMALL)
    with pytest.raises(FileNotFoundError):
        MeDiMModel.from_liquid(tmp_path / "missing", **SMALL)


def test_plain_backbone_gets_image_and_mask_rows(tmp_path):
    write_tiny_liquid(tmp_path / "liquid", num_layers=1, shards=1)
    model = MeDiMModel.from_liquid(tmp_path / "liquid", num_layers=1, image_offset=None, image_vocab_size=16,
                                   text_len=4, image_len=4)
    assert model.layout.segments[1].vocab_start == 264 and model.layout.mask_id == 280
    assert model.embed_tokens.weight.shape[0] == 281


def release(tmp_path):
    layout = MeDiMV1Layout(base_vocab_size=TINY_BASE_VOCAB, text_len=8, image_len=16, image_vocab_size=TINY_IMAGE_VOCAB)
    return layout, tiny_gemma_config(vocab_size=layout.min_vocab_size)


def test_release_loads_strictly_from_newest_checkpoint(tmp_path):
    state = write_tiny_release_checkpoint(tmp_path, step=200)
    layout, config = release(tmp_path)
    model = MeDiMModel.from_original(tmp_path, backbone_config=config, layout=layout)
    own = model.state_dict()
    for key, value in state.items():
        if key != "lm_head.weight":
            assert torch.equal(own[key.removeprefix("model.")], value), key
    assert model.lm_head.weight is model.embed_tokens.weight


def test_release_key_errors_are_listed(tmp_path):
    write_tiny_release_checkpoint(tmp_path, step=10)
    path = tmp_path / "checkpoint_10" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.adaLN_modulation.bias"]
    tensors["model.extra.weight"] = torch.zeros(1)
    tensors["model.norm.weight"] = torch.zeros(7)
    save_file(tensors, path)
    layout, config = release(tmp_path)
    with pytest.raises(ValueError) as err:
        MeDiMModel.from_original(tmp_path, backbone_config=config, layout=layout)
    message = str(err.value)
    assert "layers.1.adaLN_modulation.bias" in message and "extra.weight" in message
    assert "norm.weight: file (7,)" in message
    with pytest.raises(FileNotFoundError, match="checkpoint_<step>"):
        MeDiMModel.from_original(tmp_path / "checkpoint_20", backbone_config=config, layout=layout)
