"""Report metrics against the reference implementations, WordNet lookup, and `medim evaluate`."""

import json
import random
import sys

import pytest

from medim.cli import main
from medim.evaluation import cider_d, load_wordnet, report_metrics, rouge_paper
from medim.evaluation.reports import rouge_l_coco, tokenize_coco, tokenize_medim
from medim.evaluation.wordnet import DEBIAN_WORDNET_DIR

nltk = pytest.importorskip("nltk")
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu  # noqa: E402

PAIRS = [
    (
        "The heart is normal in size. No pleural effusion.",
        "Heart size is normal. There is no pleural effusion.",
    ),
    ("Mild cardiomegaly.   Lungs are clear.", "The lungs are clear. Mild cardiomegaly is seen."),
    ("left lower lobe opacity. no pneumothorax", "No pneumothorax. Opacity in the left lower lobe."),
]


def _wordnet_or_skip():
    try:
        return load_wordnet()
    except LookupError as e:
        pytest.skip(f"no local WordNet: {e}")


def test_tokenize_matches_release():
    assert tokenize_medim("The heart.  Is  OK.") == ["the", "heart", ".", "is", "ok", "."]


def test_bleu_equals_nltk():
    out = report_metrics([p for p, _ in PAIRS], [r for _, r in PAIRS], wordnet=False, progress=False)
    smooth = SmoothingFunction().method1
    weights = [(1,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4]
    for k, w in enumerate(weights, 1):
        expected = sum(
            sentence_bleu([tokenize_medim(r)], tokenize_medim(p), weights=w, smoothing_function=smooth)
            for p, r in PAIRS
        ) / len(PAIRS)
        assert out.scores[f"bleu{k}"] == pytest.approx(expected, abs=1e-12)
    assert "meteor" not in out.scores and any("METEOR skipped" in n for n in out.notes)
    assert out.scores["bleu1"] > out.scores["bleu4"] > 0


def test_rouge_hand_computed():
    # hyp words {the, heart, is, normal}, ref {heart, size, is, normal}: 3 shared unigrams.
    r = rouge_paper("the heart is normal", "heart size is normal")
    assert r["rouge-1"] == pytest.approx(2 * 0.75 * 0.75 / (1.5 + 1e-8))
    # bigrams: hyp {the heart, heart is, is normal}, ref {heart size, size is, is normal}: 1 shared.
    assert r["rouge-2"] == pytest.approx(2 * (1 / 3) ** 2 / (2 / 3 + 1e-8))
    # LCS "heart is normal" (3 words) over 4 distinct words on each side.
    assert r["rouge-l"] == pytest.approx(2 * 0.75 * 0.75 / (1.5 + 1e-8))
    assert rouge_paper("...", "heart") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


# Where the `rouge` package splits, joins and raises: empty sides, only dots, whitespace-only
# sentences, tabs and newlines, repeated words, runs of dots.
TRICKY_ROUGE = [
    ("", "heart"),
    ("heart", ""),
    ("...", "heart"),
    ("heart", ". . ."),
    (" ", " "),
    (" . ", "heart"),
    (".heart.", "heart"),
    ("heart..size", "heart size"),
    ("the heart.\tis normal\n.", "heart\tis. normal"),
    ("no   effusion .  no  pneumothorax", "no effusion. no pneumothorax."),
    ("a a a a", "a"),
    ("a b. b a. a b", "b a b a"),
]


def _rouge_package_f(scorer, hyp, ref):
    try:
        scores = scorer.get_scores(hyp, ref)[0]
    except ValueError:  # a side with no sentence: rouge_paper scores it zero
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    return {k: scores[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}


def test_rouge_equals_rouge_package():
    rouge = pytest.importorskip("rouge", reason="the `rouge` package (the paper's) is not installed")
    scorer, rng = rouge.Rouge(), random.Random(0)
    vocab = "the heart is normal size lungs are clear . no effusion mild cardiomegaly left".split()
    random_pairs = [
        (
            " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 20))),
            " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 20))),
        )
        for _ in range(200)
    ]
    for hyp, ref in TRICKY_ROUGE + random_pairs:
        expected = _rouge_package_f(scorer, hyp, ref)
        assert rouge_paper(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


def test_rouge_long_sentence():
    # The package traces its LCS back with one recursion per word: a 1,100-word sentence pair is
    # past Python's default limit of 1,000 frames; rouge_paper still scores it, and puts the limit back.
    limit = sys.getrecursionlimit()
    text = " ".join(f"w{i}" for i in range(1100))
    assert rouge_paper(text, text) == pytest.approx({"rouge-1": 1.0, "rouge-2": 1.0, "rouge-l": 1.0})
    assert sys.getrecursionlimit() == limit


def test_rouge_missing_package_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge", None)  # as if `rouge` were not installed
    with pytest.raises(ImportError, match=r"pip install 'medim-diffusion\[eval\]'"):
        rouge_paper("heart", "heart")
    with pytest.raises(ImportError, match="rouge"):
        report_metrics(["heart"], ["heart"], wordnet=False, progress=False)


def test_rouge_l_lcs_equals_rouge_score():
    rs = pytest.importorskip("rouge_score.rouge_scorer")

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    scorer = rs.RougeScorer(["rougeL"], tokenizer=Whitespace())
    hyp, ref = "no acute cardiopulmonary process seen".split(), "no acute process in the chest".split()
    s = scorer.score(" ".join(ref), " ".join(hyp))["rougeL"]
    # Same LCS precision/recall; COCO weighs them with beta 1.2 instead of rouge-score's F1.
    beta2 = 1.2**2
    expected = (1 + beta2) * s.precision * s.recall / (s.recall + beta2 * s.precision)
    assert rouge_l_coco(hyp, ref) == pytest.approx(expected)


def test_cider_d_hand_checked():
    # Item 0 repeats its reference: cosine 1 for n = 1, 2, 3; a 3-word text has no 4-grams, so
    # n = 4 adds 0 -> 10 * (1 + 1 + 1 + 0) / 4 = 7.5 (equal bigram counts: no length penalty).
    # Item 1 shares no n-gram with its reference -> 0.
    refs = [[["a", "b", "c"]], [["x", "y", "z"]]]
    mean, per_item = cider_d([["a", "b", "c"], ["q", "r"]], refs)
    assert per_item == pytest.approx([7.5, 0.0])
    assert mean == pytest.approx(3.75)
    # The Gaussian length penalty: one extra word (one extra bigram) costs exp(-1 / 72).
    _, (longer, _) = cider_d([["a", "b", "c", "a"], ["q", "r"]], refs)
    assert 0 < longer < 7.5


def test_cider_d_equals_pycocoevalcap():
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(1)
    vocab = "the heart is normal size lungs are clear no effusion mild cardiomegaly".split()
    hyps = [[rng.choice(vocab) for _ in range(rng.randint(1, 15))] for _ in range(20)]
    refs = [[rng.choice(vocab) for _ in range(rng.randint(1, 15))] for _ in range(20)]
    gts = {i: [" ".join(r)] for i, r in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    expected, expected_items = cider.Cider().compute_score(gts, res)
    mean, items = cider_d(hyps, [[r] for r in refs])
    assert mean == pytest.approx(expected, abs=1e-12)
    assert items == pytest.approx(list(expected_items), abs=1e-12)


def test_rouge_l_coco_equals_pycocoevalcap():
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    rng = random.Random(2)
    vocab = "the heart is normal size lungs are clear no effusion mild cardiomegaly".split()
    for _ in range(50):
        hyp = [rng.choice(vocab) for _ in range(rng.randint(1, 15))]
        ref = [rng.choice(vocab) for _ in range(rng.randint(1, 15))]
        expected = rouge.Rouge().calc_score([" ".join(hyp)], [" ".join(ref)])
        assert rouge_l_coco(hyp, ref) == pytest.approx(expected, abs=1e-12), (hyp, ref)


@pytest.fixture
def no_pycocoevalcap(monkeypatch):
    """Import pycocoevalcap (and its already-imported modules) fails, as if it were not installed."""
    names = ["pycocoevalcap"] + [m for m in sys.modules if m.startswith("pycocoevalcap.")]
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


COCO_PREDICTIONS = [p for p, _ in PAIRS] + [""]
COCO_REFERENCES = [r for _, r in PAIRS] + ["no effusion"]


def test_coco_protocol_without_pycocoevalcap(no_pycocoevalcap):
    out = report_metrics(COCO_PREDICTIONS, COCO_REFERENCES, protocol="coco")
    assert set(out.scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider_d"}
    assert "corpus_bleu" in out.implementations["bleu1"]
    assert out.implementations["rougeL"].startswith("medim rouge_l_coco")
    assert out.implementations["cider_d"].startswith("medim cider_d")
    assert any("pycocoevalcap is not installed" in n and "METEOR 1.5 skipped" in n for n in out.notes)
    assert out.num_empty == 1 and out.scores["cider_d"] > 0


def test_coco_protocol_pycocoevalcap_equals_fallback(monkeypatch, tmp_path):
    pytest.importorskip("pycocoevalcap.cider.cider")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `java`: METEOR 1.5 is skipped (and fast)
    out = report_metrics(COCO_PREDICTIONS, COCO_REFERENCES, protocol="coco")
    for name in ("bleu1", "rougeL", "cider_d"):
        assert out.implementations[name].startswith("pycocoevalcap "), name
    assert "Cider (CIDEr-D" in out.implementations["cider_d"]
    assert any("METEOR 1.5 skipped" in n for n in out.notes) and "meteor" not in out.scores
    # Without pycocoevalcap, medim's own ROUGE-L and CIDEr-D give the same numbers.
    hyps, refs = [tokenize_coco(p) for p in COCO_PREDICTIONS], [tokenize_coco(r) for r in COCO_REFERENCES]
    assert out.scores["rougeL"] == pytest.approx(sum(map(rouge_l_coco, hyps, refs)) / len(hyps), abs=1e-12)
    assert out.scores["cider_d"] == pytest.approx(cider_d(hyps, [[r] for r in refs])[0], abs=1e-12)
    assert out.scores["cider_d"] > 0 and out.scores["rougeL"] > 0



def test_coco_protocol_wordnet_false_skips_java_meteor(monkeypatch):
    """wordnet=False (`--wordnet none`) skips METEOR under "coco" too: Java never starts."""
    meteor = pytest.importorskip("pycocoevalcap.meteor.meteor")
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)  # as if Java were there

    def no_java(*args, **kwargs):
        raise AssertionError("METEOR ran although wordnet=False")

    monkeypatch.setattr(meteor.Meteor, "__init__", no_java)
    out = report_metrics(COCO_PREDICTIONS, COCO_REFERENCES, protocol="coco", wordnet=False)
    assert "meteor" not in out.scores and "METEOR skipped (wordnet=False)" in out.notes


def test_one_report_shows_no_progress_bar(capsys):
    report_metrics(["the heart"], ["the heart"], wordnet=False)
    assert "it/s" not in capsys.readouterr().err

def test_coco_rejects_reference_without_words():
    with pytest.raises(ValueError, match=r"references\[1\] = '\.\.\.' has no words"):
        report_metrics(["heart", "lungs"], ["heart", "..."], protocol="coco")


def test_empty_predictions_score_zero_not_dropped():
    p, r = PAIRS[0]
    full = report_metrics([p], [r], wordnet=False, progress=False)
    half = report_metrics([p, "  "], [r, r], wordnet=False, progress=False)
    assert half.num_empty == 1 and half.num_reports == 2
    for k, v in full.scores.items():
        assert half.scores[k] == pytest.approx(v / 2)
    assert any("empty" in n for n in half.notes)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(predictions=["a"], references=["a", "b"]), ValueError, "same length"),
        (dict(predictions=[], references=[]), ValueError, "empty"),
        (dict(predictions=["a"], references=["a"], protocol="bleu"), ValueError, "'medim', 'coco'"),
        (dict(predictions="a", references=["a"]), TypeError, "predictions"),
        (dict(predictions=["a"], references=[" "]), ValueError, r"references\[0\]"),
        (dict(predictions=[1], references=["a"]), TypeError, r"predictions\[0\]"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        report_metrics(wordnet=False, **kwargs)


def test_missing_wordnet_explains(monkeypatch, tmp_path):
    monkeypatch.setattr("medim.evaluation.wordnet.DEBIAN_WORDNET_DIR", tmp_path / "none")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    with pytest.raises(LookupError, match="apt-get install wordnet-base"):
        report_metrics(["a b"], ["a b"], progress=False)
    with pytest.raises(FileNotFoundError, match="nltk.downloader"):
        report_metrics(["a b"], ["a b"], wordnet=tmp_path / "missing", progress=False)
    with pytest.raises(FileNotFoundError, match="not a WordNet folder"):
        load_wordnet(tmp_path)


def test_meteor_equals_nltk():
    from nltk.translate.meteor_score import single_meteor_score

    wn = _wordnet_or_skip()
    out = report_metrics([p for p, _ in PAIRS], [r for _, r in PAIRS], wordnet=wn, progress=False)
    expected = sum(
        single_meteor_score(tokenize_medim(r), tokenize_medim(p), wordnet=wn) for p, r in PAIRS
    ) / len(PAIRS)
    assert out.scores["meteor"] == pytest.approx(expected, abs=1e-12)
    assert "WordNet 3.0" in out.implementations["meteor"]
    # WordNet synonyms count: "chest" ~ "thorax" (and both survive Porter stemming).
    syn = single_meteor_score(["the", "chest", "is", "clear"], ["the", "thorax", "is", "clear"], wordnet=wn)
    non = single_meteor_score(["the", "chest", "is", "clear"], ["the", "banana", "is", "clear"], wordnet=wn)
    assert syn > non


@pytest.mark.skipif(not DEBIAN_WORDNET_DIR.is_dir(), reason="Debian's wordnet-base is not installed")
def test_debian_wordnet_loads():
    wn = load_wordnet(DEBIAN_WORDNET_DIR)
    assert wn.get_version() == "3.0"
    assert "thorax" in {lemma.name() for s in wn.synsets("chest") for lemma in s.lemmas()}


def _write_reports(folder, reports):
    folder.mkdir()
    for key, text in reports.items():
        (folder / f"{key}.txt").write_text(text)


def test_cli_reports(tmp_path, capsys):
    refs = {f"text_{i}": r for i, (_, r) in enumerate(PAIRS)}
    _write_reports(tmp_path / "ref", refs)
    manifest = tmp_path / "gen" / "manifest.jsonl"
    manifest.parent.mkdir()
    rows = [{"file_name": f"text_{i}.png", "report": p} for i, (p, _) in enumerate(PAIRS[:2])]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out_json = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate",
            "reports",
            "--pred",
            str(tmp_path / "gen"),
            "--ref",
            str(tmp_path / "ref"),
            "--wordnet",
            "none",
            "--output",
            str(out_json),
        ]
    )
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["num_reports"] == 3 and result["num_missing"] == 1 and result["num_empty"] == 1
    # Matched by id: the same pairs scored directly, the missing one as an empty prediction.
    direct = report_metrics(
        [PAIRS[0][0], PAIRS[1][0], ""], list(refs.values()), wordnet=False, progress=False
    )
    assert result["scores"] == pytest.approx(direct.scores)
    assert "bleu4" in capsys.readouterr().out


def test_cli_rejects_bad_manifest(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"text": "no report key"}\n')
    with pytest.raises(SystemExit, match="medim evaluate: .*'report'"):
        main(["evaluate", "reports", "--pred", str(bad), "--ref", str(bad), "--wordnet", "none"])


def test_reads_a_medim_generate_folder(tmp_path):
    # `medim generate` writes NNNNNN.txt and a manifest whose "report" names that file.
    from medim.commands.evaluate import read_reports

    for i, text in enumerate(["the heart is normal.", "no effusion."]):
        (tmp_path / f"{i:06d}.txt").write_text(text + "\n")
    rows = [{"index": i, "seed": i, "source_image": f"in/{i}.png", "report": f"{i:06d}.txt"} for i in range(2)]
    rows.append({"index": 2, "seed": 2, "source_image": "in/2.png", "error": "in/2.png could not be decoded"})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_reports(tmp_path) == {"000000": "the heart is normal.", "000001": "no effusion."}
    header = {"medim": "generate", "inputs": {}}  # the signed header medim writes first
    rows = [header, *({"medim": "generate", **r} for r in rows)]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_reports(tmp_path) == {"000000": "the heart is normal.", "000001": "no effusion."}
