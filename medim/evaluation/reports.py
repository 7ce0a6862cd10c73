"""Report metrics: the MeDiM paper's protocol and the COCO caption protocol, computed by the
packages that define them (`nltk`, `rouge`, `pycocoevalcap`), with a fallback for COCO's; and on
request (`metrics=`) the clinical CheXbert F1 and RadGraph F1 of `clinical.py`.

"medim" reproduces the released `report_metric.py` (docs/formats.md, section 6): per-report NLTK BLEU-1..4
(smoothing method1), ROUGE-1/2/L F of the `rouge==1.0.1` package, NLTK METEOR; all averaged over
reports. One deliberate change: the release skipped empty predictions, here they score zero (the
count is in the result), so a model cannot gain by staying silent.

"coco" is the captioning toolkit's corpus-level protocol, from pycocoevalcap when it is installed:
BLEU-1..4, ROUGE-L (beta 1.2), CIDEr-D and METEOR 1.5 (which also needs Java). Without it, NLTK's
corpus BLEU and this module's `rouge_l_coco` / `cider_d` (equal to pycocoevalcap's on the same
tokens) stand in, and METEOR is skipped.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any

from tqdm.auto import tqdm

from medim.evaluation.clinical import chexbert_f1, radgraph_f1
from medim.evaluation.wordnet import import_nltk, load_wordnet
from medim.utils.checks import check_choice

__all__ = [
    "ReportMetrics",
    "report_metrics",
    "tokenize_medim",
    "tokenize_coco",
    "rouge_paper",
    "rouge_l_coco",
    "cider_d",
]

logger = logging.getLogger(__name__)

PROTOCOLS = ("medim", "coco")
# metrics= names -> the score names they select; "chexbert" and "radgraph" are computed by clinical.py.
METRICS = {
    "bleu": ("bleu1", "bleu2", "bleu3", "bleu4"),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "meteor": ("meteor",),
    "cider": ("cider_d",),
    "chexbert": (),
    "radgraph": (),
}
CLINICAL = {"chexbert": chexbert_f1, "radgraph": radgraph_f1}
_BLEU_WEIGHTS = ((1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25))


@dataclass
class ReportMetrics:
    """What `report_metrics` returns.

    Attributes:
        scores: metric name -> value (BLEU/ROUGE/METEOR in [0, 1], CIDEr-D in [0, 10]).
        implementations: metric name -> what computed it (e.g. "nltk 3.9.1 sentence_bleu").
        protocol: "medim" or "coco".
        num_reports: number of prediction/reference pairs scored.
        num_empty: empty predictions, each scored zero (never dropped).
        notes: anything the reader must know to compare numbers (skipped metrics, deviations).
    """

    scores: dict[str, float]
    implementations: dict[str, str]
    protocol: str
    num_reports: int
    num_empty: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_medim(text: str) -> list[str]:
    """The release's tokenisation: lower-case, "." split off as its own token, split on single
    spaces (as `str.split(" ")`: tabs and newlines stay inside tokens), empty tokens dropped."""
    return [t for t in text.lower().replace(".", " .").split(" ") if t != ""]


# Tokens pycocoevalcap's PTBTokenizer removes after tokenising.
_COCO_PUNCT = re.compile(r"[\"'`()\[\]{}.?!,:;\-_/\\|@#$%^&*+=<>~]")


def tokenize_coco(text: str) -> list[str]:
    """Lower-case words with punctuation removed: an approximation of pycocoevalcap's Java
    PTBTokenizer (which also splits clitics such as "n't"), used so the protocol runs without Java."""
    return _COCO_PUNCT.sub(" ", text.lower()).split()


# ---------------------------------------------------------------- ROUGE of the `rouge` package
def _rouge_package():
    try:
        import rouge
    except ImportError as e:
        raise ImportError(
            "the paper's ROUGE needs the `rouge` package: `pip install 'medim-diffusion[eval]'` "
            "(or `pip install rouge==1.0.1`)"
        ) from e
    return rouge


def rouge_paper(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F of the `rouge==1.0.1` package (`Rouge().get_scores(hyp, ref)`), the paper's.

    The package splits sentences on "."; ROUGE-N counts *distinct* n-grams (spanning sentence
    boundaries); ROUGE-L is summary level (the union of the LCS words of every reference sentence
    against every hypothesis sentence, over the distinct words of each side). Returns zeros where
    the package raises: a side with no sentence ("" or only dots, e.g. "...").

    Example:
        >>> rouge_paper("the heart is normal.", "heart size is normal.")["rouge-1"]  # doctest: +ELLIPSIS
        0.749...
    """
    for name, text in (("hypothesis", hypothesis), ("reference", reference)):
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    rouge = _rouge_package()
    if not hypothesis.strip(".") or not reference.strip("."):
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    # The package traces each LCS back recursively, one frame per word of a sentence pair: give a
    # long pair the frames it needs instead of a RecursionError at ~1000 words.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + len(hypothesis.split()) + len(reference.split()))
    try:
        scores = rouge.Rouge().get_scores(hypothesis, reference)[0]
    finally:
        sys.setrecursionlimit(limit)
    return {k: scores[k]["f"] for k in ("rouge-1", "rouge-2", "rouge-l")}


# ---------------------------------------------------- COCO ROUGE-L and CIDEr-D without pycocoevalcap
def _lcs_length(x: Sequence[str], y: Sequence[str]) -> int:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            if x[i - 1] == y[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def rouge_l_coco(hypothesis: Sequence[str], reference: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L of the COCO toolkit for one tokenised pair: LCS precision/recall, F with beta 1.2.

    The "coco" protocol uses pycocoevalcap's `Rouge` when it is installed; this is its stand-in,
    equal to it on the same tokens.
    """
    if not hypothesis or not reference:
        return 0.0
    lcs = _lcs_length(reference, hypothesis)
    p, r = lcs / len(hypothesis), lcs / len(reference)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def _ngram_counts(tokens: Sequence[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D over a corpus of tokenised hypotheses, each with one or more references.

    TF-IDF n-gram vectors (n = 1..4, IDF from the references of the whole corpus), hypothesis
    weights clipped at the reference's, a Gaussian penalty on the length difference, mean over n,
    mean over references, times 10. As in the COCO toolkit, the "length" in the penalty is the
    number of bigrams. Returns (corpus mean, per-item scores).

    The "coco" protocol uses pycocoevalcap's `Cider` (which is CIDEr-D) when it is installed; this
    is its stand-in, equal to it on the same tokens.
    """
    n = 4
    refs_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for counts in refs_counts:
        doc_freq.update(set().union(*counts))
    log_num_docs = math.log(float(len(references)))

    def vectorise(counts: Counter):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for hyp, ref_counts in zip(hypotheses, refs_counts):
        vec_h, norm_h, len_h = vectorise(_ngram_counts(hyp, n))
        total = 0.0
        for counts in ref_counts:
            vec_r, norm_r, len_r = vectorise(counts)
            penalty = math.exp(-((len_h - len_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_h[k].items())
                if norm_h[k] != 0 and norm_r[k] != 0:
                    val /= norm_h[k] * norm_r[k]
                total += val * penalty / n
        scores.append(10.0 * total / len(ref_counts))
    return sum(scores) / len(scores), scores


# ---------------------------------------------------------------- the two protocols
def _check_inputs(predictions, references, protocol) -> None:
    check_choice(protocol, "protocol", PROTOCOLS)
    for name, seq in (("predictions", predictions), ("references", references)):
        if isinstance(seq, str) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of strings, got {type(seq).__name__}")
        bad = [i for i, s in enumerate(seq) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"{name}[{bad[0]}] is {type(seq[bad[0]]).__name__}, expected str")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} and "
            f"{len(references)}"
        )
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    empty_refs = [i for i, r in enumerate(references) if not r.strip()]
    if empty_refs:
        raise ValueError(f"references[{empty_refs[0]}] is empty ({len(empty_refs)} empty references)")
    # COCO scores words: nothing to score against (pycocoevalcap's CIDEr fails if no reference has one).
    if protocol == "coco":
        no_words = [i for i, r in enumerate(references) if not tokenize_coco(r)]
        if no_words:
            raise ValueError(
                f"references[{no_words[0]}] = {references[no_words[0]]!r} has no words once punctuation is "
                f"removed ({len(no_words)} such references): the coco protocol cannot score against it"
            )


def _medim(predictions, references, wordnet, progress) -> tuple[dict, dict, list[str]]:
    nltk, rouge_version = import_nltk(), _rouge_package().__version__  # both fail here if missing
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.meteor_score import single_meteor_score

    wn = None if wordnet is False else load_wordnet(wordnet)
    smoothing = SmoothingFunction().method1
    names = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rouge2", "rougeL"] + (["meteor"] if wn else [])
    totals = dict.fromkeys(names, 0.0)
    bar = progress and len(predictions) > 1  # a bar for one report says nothing
    for pred, ref in tqdm(zip(predictions, references), total=len(predictions), disable=not bar):
        hyp_tokens = tokenize_medim(pred.strip())
        if not hyp_tokens:
            continue  # an empty report scores zero on every metric
        ref_tokens = tokenize_medim(ref.strip())
        for k, weights in enumerate(_BLEU_WEIGHTS, 1):
            totals[f"bleu{k}"] += sentence_bleu(
                [ref_tokens], hyp_tokens, weights=weights, smoothing_function=smoothing
            )
        rouge = rouge_paper(pred.strip().lower(), ref.strip().lower())
        totals["rouge1"] += rouge["rouge-1"]
        totals["rouge2"] += rouge["rouge-2"]
        totals["rougeL"] += rouge["rouge-l"]
        if wn:
            totals["meteor"] += single_meteor_score(ref_tokens, hyp_tokens, wordnet=wn)
    scores = {k: v / len(predictions) for k, v in totals.items()}
    impl = {
        f"bleu{k}": f"nltk {nltk.__version__} sentence_bleu (smoothing method1), mean over reports"
        for k in range(1, 5)
    }
    impl.update(dict.fromkeys(["rouge1", "rouge2", "rougeL"], f"rouge {rouge_version} Rouge (F)"))
    notes = []
    if wn:
        impl["meteor"] = (
            f"nltk {nltk.__version__} single_meteor_score, WordNet {wn.get_version()} ({wn.root}); "
            "about 1.9x the Java METEOR 1.5 of the COCO toolkit"
        )
    else:
        notes.append("METEOR skipped (wordnet=False)")
    return scores, impl, notes


def _coco_pycocoevalcap(gts: dict, res: dict, meteor: bool) -> tuple[dict, dict, list[str]] | None:
    """BLEU, ROUGE-L, CIDEr-D (and METEOR 1.5 where Java is, unless `meteor` is False) from
    pycocoevalcap; None without it."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return None
    where = f"pycocoevalcap {version('pycocoevalcap')}"
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{k}": float(bleu[k - 1]) for k in range(1, 5)}
    impl = dict.fromkeys(scores, f"{where} Bleu (corpus, 'closest' reference length)")
    notes = []
    if not meteor:
        notes.append("METEOR skipped (wordnet=False)")
    elif shutil.which("java"):
        scores["meteor"] = float(Meteor().compute_score(gts, res)[0])  # the Java process ends with it
        impl["meteor"] = f"{where} Meteor (Java METEOR 1.5)"
    else:
        notes.append("METEOR 1.5 skipped: pycocoevalcap's needs Java (`java` on PATH)")
    scores["rougeL"] = float(Rouge().compute_score(gts, res)[0])
    impl["rougeL"] = f"{where} Rouge (ROUGE-L, beta 1.2)"
    # pycocoevalcap's Cider is CIDEr-D (clipped TF-IDF, Gaussian length penalty); it has no other.
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    impl["cider_d"] = f"{where} Cider (CIDEr-D, sigma 6, x10)"
    return scores, impl, notes


def _coco_fallback(hyps: list[list[str]], refs: list[list[str]]) -> tuple[dict, dict, list[str]]:
    """The same metrics without pycocoevalcap: NLTK corpus BLEU, medim ROUGE-L and CIDEr-D."""
    nltk = import_nltk()
    from nltk.translate.bleu_score import corpus_bleu

    scores = {
        f"bleu{k}": float(corpus_bleu([[r] for r in refs], hyps, weights=w))
        for k, w in enumerate(_BLEU_WEIGHTS, 1)
    }
    impl = dict.fromkeys(scores, f"nltk {nltk.__version__} corpus_bleu")
    scores["rougeL"] = sum(rouge_l_coco(h, r) for h, r in zip(hyps, refs)) / len(hyps)
    impl["rougeL"] = "medim rouge_l_coco (ROUGE-L, beta 1.2)"
    scores["cider_d"] = cider_d(hyps, [[r] for r in refs])[0]
    impl["cider_d"] = "medim cider_d (CIDEr-D, sigma 6, x10)"
    notes = [
        "pycocoevalcap is not installed (`pip install 'medim-diffusion[coco]'`): BLEU from NLTK's corpus_bleu, "
        "ROUGE-L and CIDEr-D from medim (equal to pycocoevalcap's on the same tokens), METEOR 1.5 skipped"
    ]
    return scores, impl, notes


def _coco(predictions, references, meteor: bool) -> tuple[dict, dict, list[str]]:
    hyps = [tokenize_coco(p) for p in predictions]
    refs = [tokenize_coco(r) for r in references]
    gts = {i: [" ".join(r)] for i, r in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    scores, impl, notes = _coco_pycocoevalcap(gts, res, meteor) or _coco_fallback(hyps, refs)
    notes.append("tokens: lower-case, punctuation removed (approximates the Java PTBTokenizer)")
    return scores, impl, notes


def _check_metrics(metrics, protocol, clinical) -> list[str]:
    """The metric names asked for (default: the protocol's own), checked before any scoring."""
    if metrics is None:
        return ["bleu", "rouge", "meteor"] + (["cider"] if protocol == "coco" else [])
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
        raise TypeError(f"metrics must be a non-empty list of names from {sorted(METRICS)}, got {metrics!r}")
    for name in metrics:
        check_choice(name, "metrics", tuple(METRICS))
    if "cider" in metrics and protocol != "coco":
        raise ValueError("metrics: 'cider' (CIDEr-D) is part of protocol='coco', not of protocol='medim'")
    if clinical is not None:
        if not isinstance(clinical, Mapping):
            raise TypeError(f"clinical must be a dict of metric -> options, got {type(clinical).__name__}")
        for name, options in clinical.items():
            check_choice(name, "clinical", tuple(CLINICAL))
            if not isinstance(options, Mapping):
                raise TypeError(f"clinical[{name!r}] must be a dict of keyword arguments of {CLINICAL[name].__name__}")
    return list(dict.fromkeys(metrics))


def _lexical(predictions, references, protocol, wordnet, progress, metrics) -> tuple[dict, dict, list[str]]:
    """The protocol's word-overlap scores, kept to the metrics asked for."""
    if not set(metrics) - set(CLINICAL):
        return {}, {}, []
    if protocol == "medim":
        wordnet = wordnet if "meteor" in metrics else False
        scores, impl, notes = _medim(predictions, references, wordnet, progress)
        if "meteor" not in metrics:
            notes = [n for n in notes if not n.startswith("METEOR skipped")]
    else:
        scores, impl, notes = _coco(predictions, references, meteor=wordnet is not False and "meteor" in metrics)
    keep = {name for m in metrics for name in METRICS[m]}
    return {k: v for k, v in scores.items() if k in keep}, {k: v for k, v in impl.items() if k in keep}, notes


def report_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    protocol: str = "medim",
    wordnet: str | os.PathLike | Any | None = None,
    progress: bool = True,
    *,
    metrics: Sequence[str] | None = None,
    clinical: Mapping[str, Mapping[str, Any]] | None = None,
) -> ReportMetrics:
    """Score generated reports against references.

    Args:
        predictions: generated reports, one string each.
        references: the ground-truth reports, in the same order.
        protocol: "medim" (the paper: per-report NLTK BLEU-1..4, ROUGE-1/2/L, NLTK METEOR) or
            "coco" (corpus BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D).
        wordnet: for "medim" METEOR: None finds a local WordNet 3.0 (see `load_wordnet`), a path
            names one. False skips METEOR under either protocol (under "coco" it is Java's). Never
            downloads.
        progress: show a tqdm bar.
        metrics: which to compute, from "bleu", "rouge", "meteor", "cider" (coco only) and the
            clinical "chexbert" (CheXbert F1, `chexbert_f1`) and "radgraph" (RadGraph F1,
            `radgraph_f1`); default the protocol's word-overlap metrics.
        clinical: keyword arguments per clinical metric, e.g. `{"chexbert": {"weights":
            "chexbert.pth", "tokenizer": "bert-base-uncased/"}, "radgraph": {"model_dir": "rg/"}}`.

    Returns:
        `ReportMetrics`. Empty predictions score zero and are counted in `num_empty`.

    Example:
        >>> from medim.evaluation import report_metrics
        >>> out = report_metrics(["the heart is normal."], ["heart size is normal."], wordnet=False)
        >>> round(out.scores["bleu1"], 3), out.implementations["rougeL"]  # doctest: +SKIP
        >>> options = {"chexbert": {"weights": "chexbert.pth"}}
        >>> report_metrics(preds, refs, metrics=["bleu", "chexbert"], clinical=options)  # doctest: +SKIP
    """
    _check_inputs(predictions, references, protocol)
    metrics = _check_metrics(metrics, protocol, clinical)
    num_empty = sum(not p.strip() for p in predictions)
    # The clinical metrics first: a missing model fails before anything else is scored.
    options = clinical or {}
    clinical_scores = [CLINICAL[m](predictions, references, **options.get(m, {})) for m in metrics if m in CLINICAL]
    scores, impl, notes = _lexical(predictions, references, protocol, wordnet, progress, metrics)
    for out in clinical_scores:
        scores.update(out.scores)
        impl.update(out.implementations)
    if num_empty:
        notes.append(f"{num_empty} empty prediction(s) scored zero (the release skipped them)")
        logger.warning("%d of %d predictions are empty; they score zero", num_empty, len(predictions))
    return ReportMetrics(
        scores=scores,
        implementations=impl,
        protocol=protocol,
        num_reports=len(predictions),
        num_empty=num_empty,
        notes=notes,
    )
