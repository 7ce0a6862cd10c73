"""Loading is strict and runs no code: weights that do not match their config, folders asking for
custom code, broken files and bad devices all fail with an error naming the file; good folders load
bit for bit."""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medim import MeDiMPipeline
from medim.commands.common import device_option
from medim.pipelines.loading import load_tokenizer
from medim.utils.hub import HubOptions
from tests.helpers.training import tiny_layout, tiny_tokenizer

MEDIM = Path(__file__).resolve().parents[2] / "medim"


@pytest.fixture(scope="module")
def pipe(native) -> MeDiMPipeline:
    return native  # conftest's tiny native pipeline: read-only


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    return pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "pipe")


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    """A copy of the saved pipeline that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "pipe"))


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_good_folder_loads_bit_for_bit(pipe, tmp_path, shard):
    folder = pipe.save_pretrained(tmp_path / "pipe", **({"max_shard_size": shard} if shard else {}))
    assert (folder / "model" / "model.safetensors.index.json").is_file() == (shard is not None)
    loaded = MeDiMPipeline.from_pretrained(folder)
    assert_same_weights(loaded.model, pipe.model)
    assert_same_weights(loaded.vqgan, pipe.vqgan)
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    text = ["Frontal view. No lesion."]
    assert torch.equal(loaded.layout.encode_reports(loaded.tokenizer, text),
                       pipe.layout.encode_reports(pipe.tokenizer, text))


def set_backbone(key, value):
    def change(config):
        config["backbone_config"][key] = value
        if key == "tie_word_embeddings":
            config[key] = value
    return change


@pytest.mark.parametrize("change, listed", [
    # Before: each loaded, with only transformers' printed LOAD REPORT, and generated other tokens.
    (set_backbone("num_hidden_layers", 1), r"unexpected \(11\): layers\.1\.adaLN_modulation\.bias, "),
    (set_backbone("num_hidden_layers", 3), r"missing \(11\): layers\.2\.adaLN_modulation\.bias, "),
    (set_backbone("tie_word_embeddings", False), r"missing \(1\): lm_head\.weight$"),
    (set_backbone("intermediate_size", 48), r"wrong shape \(6\): layers\.0\.mlp\.down_proj\.weight: file \(32, 64\) "
                                            r"vs model \(32, 48\)"),
])
def test_config_that_does_not_match_the_weights_is_refused(copy, change, listed):
    edit_json(copy / "model" / "config.json", change)
    with pytest.raises(ValueError, match=f"(?m)weights in .*model .*does not match the model:\n  {listed}"):
        MeDiMPipeline.from_pretrained(copy)


def test_weights_only_from_safetensors_in_the_folder(copy):
    model = copy / "model"
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"embed_tokens.weight": "../model-00001-of-00001.safetensors"}}))
    with pytest.raises(ValueError, match=r"names shard files outside .*\['\.\./model-00001"):
        MeDiMPipeline.from_pretrained(copy)
    (model / "model.safetensors.index.json").unlink()
    save_file({"x": torch.zeros(1)}, str(model / "unrelated.safetensors"))
    torch.save({}, model / "pytorch_model.bin")  # a pickle is never a fallback
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors .*only from safetensors"):
        MeDiMPipeline.from_pretrained(copy)


def evil_folder(folder: Path, marker: Path) -> None:
    """A tokenizer folder whose tokenizer_config.json names code that leaves `marker` when it runs."""
    (folder / "tokenization_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )

    def change(config):
        config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
        config["tokenizer_class"] = "EvilTokenizer"
    edit_json(folder / "tokenizer_config.json", change)


def test_folders_asking_for_custom_code_are_refused(copy, tmp_path, monkeypatch):
    # Before: transformers asked on the terminal whether to run tokenization_evil.py, and ran it on "y".
    marker = tmp_path / "ran"
    evil_folder(copy / "tokenizer", marker)
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    refused = r"tokenizer_config.json asks for custom code \(auto_map: .*trust_remote_code=False"
    with pytest.raises(ValueError, match=refused):
        MeDiMPipeline.from_pretrained(copy)
    with pytest.raises(ValueError, match=refused):
        load_tokenizer(copy / "tokenizer", HubOptions())  # from_original / from_base_models tokenizers
    from medim.cli import main

    (copy / "layout.json").write_text(json.dumps(tiny_layout().to_dict()))
    with pytest.raises(SystemExit, match=refused):
        main(["cache", "--dataset", "phantom", "--dataset-args", '{"n": 1}', "--vqgan", str(copy / "vqgan"),
              "--tokenizer", str(copy / "tokenizer"), "--layout", str(copy / "layout.json"),
              "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=refused):
        main(["cache", "--dataset", "phantom", "--dataset-args", '{"n": 1}', "--model", str(copy),
              "--out", str(tmp_path / "c")])
    assert not marker.exists() and not asked

    # A model's config.json beside a tokenizer (a Hub snapshot holds both) counts only for its tokenizer.
    shutil.rmtree(copy / "tokenizer")
    tiny_tokenizer().save_pretrained(str(copy / "tokenizer"))
    (copy / "tokenizer" / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    assert load_tokenizer(copy / "tokenizer", HubOptions()).convert_tokens_to_ids("<eos>") == 1
    (copy / "tokenizer" / "config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.X", None]}}))
    with pytest.raises(ValueError, match=r"tokenizer/config.json asks for custom code"):
        load_tokenizer(copy / "tokenizer", HubOptions())
    (copy / "tokenizer" / "config.json").unlink()
    edit_json(copy / "model" / "config.json",
              lambda c: c["backbone_config"].update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    with pytest.raises(ValueError, match=r"model/config.json asks for custom code \(auto_map: \{\"AutoModel\""):
        MeDiMPipeline.from_pretrained(copy)


def test_broken_files_and_bad_devices_are_named(copy):
    index = copy / "model_index.json"
    good = index.read_text()
    for text, error in [("[1, 2]", "must hold a JSON object, got a list"),
                        ('"pipe"', "must hold a JSON object, got a str"), ("{not json", "is not valid JSON")]:
        index.write_text(text)
        with pytest.raises(ValueError, match=f"model_index.json {error}"):
            MeDiMPipeline.from_pretrained(copy)
    index.write_text(good)

    tok = copy / "tokenizer" / "tokenizer.json"
    data = tok.read_bytes()
    tok.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"tokenizer/tokenizer.json is not valid JSON"):
        MeDiMPipeline.from_pretrained(copy)
    tok.write_text(json.dumps({"version": "1.0", "model": {"type": "Nonsense"}}))  # JSON, but no tokenizer
    with pytest.raises(ValueError, match=r"could not load a tokenizer from .*tokenizer \(files: \[.*'tokenizer.json'"):
        MeDiMPipeline.from_pretrained(copy)
    tok.write_bytes(data)

    config = copy / "model" / "config.json"
    config.write_text(config.read_text()[:-10])
    with pytest.raises(ValueError, match="model/config.json is not valid JSON"):
        MeDiMPipeline.from_pretrained(copy)

    for device in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="device 'meta' holds no data"):
            MeDiMPipeline.from_pretrained("medim-demo", device=device)
    # An accelerator torch does not see is named before anything loads (not torch's assertion after).
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=rf"device '{missing}(:0)?': (torch sees no cuda device|only \d+ cuda)"):
        MeDiMPipeline.from_pretrained("medim-demo", device=missing)
    with pytest.raises(SystemExit, match=f"--device: device '{missing}"):
        device_option(missing)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            # owner: the name before the dot (torch.load -> "torch"); None for a plain call (eval(...)).
            owner = None if isinstance(func, ast.Name) else (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else "")
            keywords = {k.arg: k.value.value if isinstance(k.value, ast.Constant) else k.value for k in node.keywords}
            yield node, owner, name, keywords


def unsafe_code(source: str, where: str) -> list[str]:
    """Lines of Python `source` that could run code from data: eval/exec, pickle-like modules,
    torch.load without weights_only=True, allow_pickle / trust_remote_code, Auto* loads without
    trust_remote_code=False."""
    problems = []
    tree = ast.parse(source, where)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{where}:{node.lineno} imports {n}" for n in names if n and n.split(".")[0] in PICKLERS]
    for node, owner, name, keywords in _calls(tree):
        line = f"{where}:{node.lineno}"
        if owner is None and name in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{line} calls {name}")
        if owner == "torch" and name == "load" and keywords.get("weights_only") is not True:
            problems.append(f"{line} torch.load without weights_only=True")
        if keywords.get("allow_pickle") is True or keywords.get("trust_remote_code", False) is not False:
            problems.append(f"{line} allows pickle or remote code")
        auto = (owner or "").startswith("Auto") and name == "from_pretrained"
        if auto and keywords.get("trust_remote_code") is not False:
            problems.append(f"{line} {owner}.from_pretrained without trust_remote_code=False")
    return problems


PICKLERS = ("pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle")


def test_no_eval_pickle_or_remote_code_in_medim():
    bad = """
import pickle
from dill import loads
eval("1"); exec("x = 1"); model.eval()
torch.load("x.ckpt"); torch.load("x.ckpt", weights_only=True)
np.load("x.npy", allow_pickle=True)
AutoTokenizer.from_pretrained("x"); AutoConfig.from_pretrained("x", trust_remote_code=True)
AutoTokenizer.from_pretrained("x", trust_remote_code=False)
"""
    assert sorted(unsafe_code(bad, "bad.py")) == [
        "bad.py:2 imports pickle", "bad.py:3 imports dill", "bad.py:4 calls eval", "bad.py:4 calls exec",
        "bad.py:5 torch.load without weights_only=True", "bad.py:6 allows pickle or remote code",
        "bad.py:7 AutoConfig.from_pretrained without trust_remote_code=False",
        "bad.py:7 AutoTokenizer.from_pretrained without trust_remote_code=False",
        "bad.py:7 allows pickle or remote code"]
    problems = [p for path in sorted(MEDIM.rglob("*.py"))
                for p in unsafe_code(path.read_text(), str(path.relative_to(MEDIM.parent)))]
    assert not problems, "\n".join(problems)
