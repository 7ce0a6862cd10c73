"""The training config's `lora` section: defaults, the example preset, and bad values refused
when the config is read, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from medim.training.config import LORA_TARGETS, load_config, resume_differences

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["model.init=m", "data.cache=c"]


def test_lora_is_off_by_default_and_the_preset_turns_it_on():
    lora = load_config(None, REQUIRED).lora
    assert (lora.r, lora.alpha, lora.dropout, lora.modules_to_save) == (0, 16.0, 0.0, [])
    assert tuple(lora.target_modules) == LORA_TARGETS and "adaLN_modulation" in LORA_TARGETS
    cfg = load_config(REPO / "configs/lora.yaml", REQUIRED)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.micro_batch_size) == (16, 16, 1)
    assert cfg.model.gradient_checkpointing
    liquid = load_config(REPO / "configs/lora.yaml", [
        *REQUIRED, "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        "lora.modules_to_save=[adaLN_modulation,time_embedder]"])
    assert liquid.lora.modules_to_save == ["adaLN_modulation", "time_embedder"]


@pytest.mark.parametrize("override, message", [
    ("lora.r=-1", "config option lora.r must be an int >= 0, got -1"),
    ("lora.r=2.5", "config option lora.r: expected an integer"),
    ("lora.alpha=0", "config option lora.alpha: expected a float > 0"),
    ("lora.alpha=-3", "config option lora.alpha must be a finite number >= 0"),
    ("lora.dropout=1", "config option lora.dropout: expected a float in [0, 1)"),
    ("lora.dropout=-0.1", "config option lora.dropout must be a finite number in [0, 1]"),
    ("lora.target_modules=[q_proj,q_proj]", "config option lora.target_modules: expected names listed once"),
    ("lora.target_modules=['']", "config option lora.target_modules: expected a list of module names"),
    ("lora.target_modules=[]", "config option lora.target_modules: expected at least one module name"),
    ("lora.modules_to_save=[adaLN_modulation]", "config option lora.modules_to_save: expected names not in "
                                                "lora.target_modules"),
    ("lora.rank=4", "unknown config key 'lora.rank'"),
    ("lora.trainable_tokens=[',',',']", "config option lora.trainable_tokens: expected pieces listed once"),
    ("lora.trainable_tokens=['  ']", "config option lora.trainable_tokens: expected a list of words"),
])
def test_bad_lora_values_are_refused_naming_the_option(override, message):
    overrides = [*REQUIRED, override] if override.startswith("lora.r") else [*REQUIRED, "lora.r=4", override]
    with pytest.raises(ValueError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_a_resume_may_not_change_the_adapters():
    cfg = load_config(None, [*REQUIRED, "lora.r=8"])
    saved = load_config(None, [*REQUIRED, "lora.r=4"]).to_dict()
    assert resume_differences(saved, cfg) == [("lora.r", 4, 8)]
    old = {k: v for k, v in saved.items() if k != "lora"}  # a checkpoint written before the lora section
    assert resume_differences(old, load_config(None, REQUIRED)) == []
