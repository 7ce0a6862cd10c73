"""Clinical report metrics on tiny stand-in weights made here: CheXbert F1 against a transcription of
`f1chexbert`'s label logic and, where the package runs (transformers < 5), against the package
itself; RadGraph F1 against the `radgraph` package's `F1RadGraph` on a small DyGIE model."""

import json
import re

import numpy as np
import pytest
import torch

from medim.evaluation import chexbert_f1, load_chexbert, report_metrics
from medim.evaluation.clinical import (
    CHEXBERT_5,
    CHEXBERT_CONDITIONS,
    CheXbert,
    chexbert_input_ids,
    load_radgraph,
    multilabel_f1,
    radgraph_f1,
)

WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "effusion", "small", "left", "right", "heart",
    "normal", "size", "is", "a", "b", ".", ",", "pleural", "edema", "mild", "cardiomegaly", "atelectasis", "tube",
    "there", "pneumothorax", "consolidation", "enlarged", "stable", "lung", "opacity", "##s",
]
PREDICTIONS = [
    "No pleural effusion. Normal heart size.", "Normal heart size.", "mild edema and left atelectasis .",
    "", "  enlarged heart,\n\n stable   tube ", "no acute cardiopulmonary process", "small right pneumothorax",
    "consolidation " * 300,
]
REFERENCES = [
    "No pleural effusions.", "Enlarged heart.", "mild pulmonary edema", "no acute process",
    "cardiomegaly", "lung opacity", "small right pneumothorax", "no consolidation",
]
BERT = dict(
    hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=512
)


def _tokenizer_folder(folder):
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    BertConfig(vocab_size=len(WORDS), **BERT).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chexbert_files(tmp_path_factory):
    """A BERT-base-uncased stand-in folder and a chexbert.pth shaped like the release's: the labeler's
    state under "model_state_dict" with DataParallel's "module." prefix and an old position_ids buffer."""
    from transformers import BertConfig

    root = tmp_path_factory.mktemp("chexbert")
    tokenizer = _tokenizer_folder(root / "bert")
    torch.manual_seed(0)
    model = CheXbert(BertConfig(vocab_size=len(WORDS), **BERT))
    with torch.no_grad():
        for head in model.linear_heads:  # sharper heads, so the labels depend on the report
            head.weight.mul_(40)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.bert.embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model_state_dict": state, "epoch": 3}, root / "chexbert.pth")
    return root / "chexbert.pth", tokenizer


def _package_labels(reports, model, tokenizer):
    """f1chexbert 0.0.2's `get_label(report.strip(), mode="rrg")`, transcribed: one report at a time,
    its pandas whitespace clean-up (the same regular expressions), WordPiece, [CLS] ... [SEP] (512 at
    most), argmax per head, then blank -> '', present -> 1, absent -> 0, uncertain -> 1 and '' -> 0."""
    out = []
    for report in reports:
        text = re.sub(r"\s+", " ", report.strip().strip().replace("\n", " ")).strip()
        tokens = tokenizer.tokenize(text)
        if tokens:
            ids = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(tokens), tokenizer.sep_token_id]
            ids = ids[:511] + [tokenizer.sep_token_id] if len(ids) > 512 else ids
        else:
            ids = [tokenizer.cls_token_id, tokenizer.sep_token_id]
        batch = torch.LongTensor([ids])
        with torch.no_grad():
            heads = model(batch, torch.ones(batch.shape, dtype=torch.float))
        v = []
        for c in [h.argmax(dim=1).item() for h in heads]:
            v.append({0: "", 3: 1, 2: 0, 1: 1}[c])
        out.append([1 if (isinstance(x, int) and x > 0) else 0 for x in v])
    return np.array(out)


def test_chexbert_labels_match_package_logic(chexbert_files):
    weights, tokenizer = chexbert_files
    model, tok = load_chexbert(weights, tokenizer, device="cpu")
    out = chexbert_f1(PREDICTIONS, REFERENCES, model=(model, tok), batch_size=3)
    expected_hyp = _package_labels(PREDICTIONS, model, tok)
    expected_ref = _package_labels(REFERENCES, model, tok)
    np.testing.assert_array_equal(out.per_report["labels"], expected_hyp)
    np.testing.assert_array_equal(out.per_report["reference_labels"], expected_ref)
    assert 0 < expected_hyp.sum() < expected_hyp.size  # the stand-in says yes and no
    five = [CHEXBERT_CONDITIONS.index(c) for c in CHEXBERT_5]
    f14, f5 = multilabel_f1(expected_ref, expected_hyp), multilabel_f1(expected_ref[:, five], expected_hyp[:, five])
    assert out.scores == {
        "chexbert_micro_f1_14": f14["micro"], "chexbert_macro_f1_14": f14["macro"],
        "chexbert_micro_f1_5": f5["micro"], "chexbert_macro_f1_5": f5["macro"],
    }


def test_chexbert_truncates_like_the_package(chexbert_files):
    _, tokenizer = chexbert_files
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(tokenizer))
    ids = chexbert_input_ids("effusion " * 600, tok)
    assert len(ids) == 512 and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert chexbert_input_ids(" \n ", tok) == [tok.cls_token_id, tok.sep_token_id]


def test_multilabel_f1_by_hand_and_against_sklearn():
    y_true = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    y_pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    # column 0: tp 1 fn 1 -> 2/3; column 1: tp 1 fp 1 -> 2/3; column 2: nothing -> 0 (zero_division).
    out = multilabel_f1(y_true, y_pred)
    assert out["macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert out["micro"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 2, (40, 14)), rng.integers(0, 2, (40, 14))
    y_true[:, 3] = y_pred[:, 3] = 0
    report = metrics.classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    out = multilabel_f1(y_true, y_pred)
    assert out["micro"] == pytest.approx(report["micro avg"]["f1-score"], abs=1e-12)
    assert out["macro"] == pytest.approx(report["macro avg"]["f1-score"], abs=1e-12)


def test_chexbert_equals_f1chexbert_package(chexbert_files, tmp_path):
    """The package's own labels and scikit-learn reports on the same stand-in; its tokenisation calls
    `encode_plus`, which transformers 5 removed, so this runs where transformers < 5."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("f1chexbert 0.0.2 calls tokenizer.encode_plus, removed in transformers 5")
    f1chexbert = pytest.importorskip("f1chexbert.f1chexbert")
    from transformers import BertConfig
    weights, tokenizer = chexbert_files
    model, tok = load_chexbert(weights, tokenizer, device="cpu")
    package = f1chexbert.F1CheXbert.__new__(f1chexbert.F1CheXbert)
    torch.nn.Module.__init__(package)  # its __init__ downloads bert-base-uncased and chexbert.pth
    package.refs_filename = package.hyps_filename = None
    package.device, package.tokenizer = torch.device("cpu"), tok
    from transformers import BertModel

    BertModel(BertConfig.from_pretrained(str(tokenizer))).save_pretrained(tmp_path)  # the labeler's starting point
    labeler = f1chexbert.bert_labeler(pretrain_path=str(tmp_path))  # then the package's strict=False load
    state = torch.load(weights, weights_only=True)["model_state_dict"]
    labeler.load_state_dict({k.replace("module.", ""): v for k, v in state.items()}, strict=False)
    package.model = labeler.eval()
    package.target_names, package.target_names_5 = list(CHEXBERT_CONDITIONS), list(CHEXBERT_5)
    package.target_names_5_index = np.where(np.isin(package.target_names, package.target_names_5))[0]
    # Its `forward` stops at sklearn's private `_check_targets` (4 values in current releases) before the
    # reports: take its labels (`get_label`) and its two `classification_report` calls as written there.
    metrics = pytest.importorskip("sklearn.metrics")
    refs, hyps = [package.get_label(r.strip()) for r in REFERENCES], [package.get_label(h.strip()) for h in PREDICTIONS]
    refs_5 = [np.array(r)[package.target_names_5_index] for r in refs]
    hyps_5 = [np.array(h)[package.target_names_5_index] for h in hyps]
    cr = metrics.classification_report(refs, hyps, target_names=package.target_names, output_dict=True)
    cr_5 = metrics.classification_report(refs_5, hyps_5, target_names=package.target_names_5, output_dict=True)
    out = chexbert_f1(PREDICTIONS, REFERENCES, model=(model, tok)).scores
    assert out["chexbert_micro_f1_14"] == pytest.approx(cr["micro avg"]["f1-score"], abs=1e-12)
    assert out["chexbert_macro_f1_14"] == pytest.approx(cr["macro avg"]["f1-score"], abs=1e-12)
    assert out["chexbert_micro_f1_5"] == pytest.approx(cr_5["micro avg"]["f1-score"], abs=1e-12)
    assert out["chexbert_macro_f1_5"] == pytest.approx(cr_5["macro avg"]["f1-score"], abs=1e-12)


def test_report_metrics_with_chexbert(chexbert_files):
    weights, tokenizer = chexbert_files
    options = {"chexbert": {"weights": weights, "tokenizer": tokenizer, "device": "cpu"}}
    out = report_metrics(PREDICTIONS, REFERENCES, metrics=["bleu", "chexbert"], clinical=options, progress=False)
    assert set(out.scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "chexbert_micro_f1_14", "chexbert_macro_f1_14",
                               "chexbert_micro_f1_5", "chexbert_macro_f1_5"}
    direct = chexbert_f1(PREDICTIONS, REFERENCES, weights=weights, tokenizer=tokenizer, device="cpu")
    assert {k: out.scores[k] for k in direct.scores} == direct.scores
    assert out.num_empty == 1
    plain = report_metrics(PREDICTIONS, REFERENCES, wordnet=False, progress=False)
    assert {k: out.scores[k] for k in ("bleu1", "bleu4")} == {k: plain.scores[k] for k in ("bleu1", "bleu4")}


@pytest.mark.parametrize(
    "metrics, clinical, error",
    [
        (["bleu", "chexbrt"], None, "metrics"),
        ("bleu", None, "metrics"),
        (["cider"], None, "coco"),
        (["chexbert"], {"radgraf": {}}, "clinical"),
        (["chexbert"], {"chexbert": "chexbert.pth"}, "clinical"),
    ],
)
def test_report_metrics_checks_metric_names(metrics, clinical, error):
    with pytest.raises((ValueError, TypeError), match=error):
        report_metrics(["a ."], ["b ."], metrics=metrics, clinical=clinical)


def test_missing_chexbert_weights_name_the_download(tmp_path, chexbert_files):
    _, tokenizer = chexbert_files
    with pytest.raises(FileNotFoundError, match=r"chexbert\.pth .*StanfordAIMI/RRG_scorers") as info:
        load_chexbert(tmp_path, tokenizer)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- RadGraph
def _radgraph_folder(root, bert):
    """A small DyGIE model in the package's layout: <root>/radgraph/{config.json, vocabulary/, weights.th}."""
    from dotmap import DotMap
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    folder = root / "radgraph"
    (folder / "vocabulary").mkdir(parents=True)
    (folder / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    labels = ["", "Anatomy::definitely present", "Observation::definitely present", "Observation::definitely absent"]
    (folder / "vocabulary" / "radgraph__ner_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "vocabulary" / "radgraph__relation_labels.txt").write_text("\nlocated_at\nmodify\nsuggestive_of\n")
    bert_spec = {"type": "pretrained_transformer_mismatched", "model_name": str(bert), "max_length": 512}
    config = {
        "dataset_reader": {"type": "dygie", "token_indexers": {"bert": bert_spec}, "max_span_width": 4},
        "model": {
            "type": "dygie", "embedder": {"token_embedders": {"bert": bert_spec}}, "feature_size": 4,
            "max_span_width": 4, "target_task": "relation",
            "feedforward_params": {"num_layers": 2, "hidden_dims": 8, "dropout": 0.0},
            "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
            "modules": {
                "coref": {"spans_per_word": 0.3, "max_antecedents": 10, "coref_prop": 0}, "ner": {},
                "relation": {"spans_per_word": 0.5},
                "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                           "loss_weights": {"trigger": 1.0, "arguments": 0.5}},
            },
            "initializer": {}, "module_initializer": {},
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    model_args = DotMap(config).model
    for name in ["type", "embedder", "initializer", "module_initializer"]:
        del model_args[name]
    embedder = text_field_embedders.BasicTextFieldEmbedder(
        {"bert": token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(bert), max_length=512)}
    )
    torch.manual_seed(0)
    model = dygie.DyGIE(vocab=Vocabulary.from_files(folder / "vocabulary", None, None), embedder=embedder,
                        **model_args)
    torch.save(model.state_dict(), folder / "weights.th")
    return root


def test_radgraph_f1_equals_the_package(tmp_path):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        with pytest.raises(ImportError, match=r"medim-diffusion\[radgraph\]"):
            load_radgraph("radgraph", tmp_path)
        pytest.skip("the radgraph package needs transformers < 5 (it calls tokenizer.encode_plus)")
    radgraph = pytest.importorskip("radgraph")
    from transformers import BertConfig, BertModel

    bert = _tokenizer_folder(tmp_path / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), **BERT)).save_pretrained(bert)
    root = _radgraph_folder(tmp_path / "models", bert)
    out = radgraph_f1(PREDICTIONS, REFERENCES, model_type="radgraph", model_dir=root, device="cpu")
    package = radgraph.F1RadGraph(reward_level="all", model_type="radgraph", model_cache_dir=str(root), cuda=-1)
    means, rewards, _, _ = package(refs=REFERENCES, hyps=PREDICTIONS)
    assert [out.scores[f"radgraph_{k}"] for k in ("simple", "partial", "complete")] == [float(m) for m in means]
    assert out.per_report["radgraph_partial"] == [float(r) for r in rewards[1]]
    assert out.per_report["radgraph_simple"][3] == 0.0  # an empty prediction scores 0, as in the package
    assert 0 < out.scores["radgraph_complete"] and out.scores["radgraph_simple"] < 1  # entities and relations found


def test_missing_radgraph_weights_name_the_download(tmp_path):
    pytest.importorskip("radgraph")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("the transformers check comes first (tested above)")
    with pytest.raises(FileNotFoundError, match=r"radgraph-xl\.tar\.gz .*StanfordAIMI/RRG_scorers"):
        load_radgraph("radgraph-xl", tmp_path)


def test_radgraph_without_the_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "radgraph", None)
    with pytest.raises(ImportError, match=r"medim-diffusion\[radgraph\]"):
        radgraph_f1(["a"], ["b"])


def test_cli_reports_with_chexbert(chexbert_files, tmp_path, capsys):
    from medim.cli import main

    weights, tokenizer = chexbert_files
    for side, texts in (("pred", PREDICTIONS), ("ref", REFERENCES)):
        (tmp_path / side).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / side / f"{i}.txt").write_text(text)
    output = tmp_path / "m.json"
    argv = ["evaluate", "reports", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
            "--metrics", "rouge,chexbert", "--chexbert-weights", str(weights), "--chexbert-tokenizer", str(tokenizer),
            "--device", "cpu", "--output", str(output)]
    assert main(argv) == 0
    scores = json.loads(output.read_text())["scores"]
    ids = sorted(str(i) for i in range(len(PREDICTIONS)))  # read back by file stem, in name order
    preds = [(tmp_path / "pred" / f"{i}.txt").read_text().strip() for i in ids]
    refs = [(tmp_path / "ref" / f"{i}.txt").read_text().strip() for i in ids]
    direct = chexbert_f1(preds, refs, weights=weights, tokenizer=tokenizer, device="cpu").scores
    assert set(scores) == {"rouge1", "rouge2", "rougeL", *direct}
    assert {k: scores[k] for k in direct} == pytest.approx(direct, abs=0)
    assert "chexbert_macro_f1_5" in capsys.readouterr().out
