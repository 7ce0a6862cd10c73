"""Evaluation: the paper's report metrics (BLEU, ROUGE, METEOR; COCO's CIDEr-D), the field's clinical
ones (CheXbert F1, RadGraph F1) and image metrics (FID on Inception or RAD-DINO features, MS-SSIM
diversity, Inception Score, the VLM-judged image-report match), offline.

Example:
    >>> from medim.evaluation import report_metrics, fid
    >>> report_metrics(["the heart is normal ."], ["heart size is normal ."], wordnet=False).scores  # doctest: +SKIP
"""

from medim.evaluation.clinical import ClinicalScores, chexbert_f1, load_chexbert, load_radgraph, radgraph_f1
from medim.evaluation.diversity import DiversityResult, ms_ssim_diversity
from medim.evaluation.fid import FIDResult, feature_statistics, fid, frechet_distance
from medim.evaluation.inception import FIDInceptionV3, InceptionV3
from medim.evaluation.inception_score import InceptionScoreResult, inception_score, inception_score_from_probs
from medim.evaluation.pair_match import PairMatchResult, VLMJudge, load_judge, pair_match, parse_score
from medim.evaluation.rad_features import RadDinoFeatures
from medim.evaluation.reports import ReportMetrics, cider_d, report_metrics, rouge_paper
from medim.evaluation.wordnet import load_wordnet

__all__ = [
    "ClinicalScores",
    "DiversityResult",
    "RadDinoFeatures",
    "chexbert_f1",
    "load_chexbert",
    "load_radgraph",
    "ms_ssim_diversity",
    "radgraph_f1",
    "FIDInceptionV3",
    "FIDResult",
    "InceptionScoreResult",
    "InceptionV3",
    "PairMatchResult",
    "ReportMetrics",
    "cider_d",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "inception_score",
    "inception_score_from_probs",
    "load_judge",
    "load_wordnet",
    "pair_match",
    "parse_score",
    "report_metrics",
    "rouge_paper",
    "VLMJudge",
]
