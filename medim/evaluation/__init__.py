"""Evaluation: the paper's report metrics (BLEU, ROUGE, METEOR; COCO's CIDEr-D) and FID, offline.

Example:
    >>> from medim.evaluation import report_metrics, fid
    >>> report_metrics(["the heart is normal ."], ["heart size is normal ."], wordnet=False).scores  # doctest: +SKIP
"""

from medim.evaluation.fid import FIDInceptionV3, FIDResult, feature_statistics, fid, frechet_distance
from medim.evaluation.reports import ReportMetrics, cider_d, report_metrics, rouge_paper
from medim.evaluation.wordnet import load_wordnet

__all__ = [
    "FIDInceptionV3",
    "FIDResult",
    "ReportMetrics",
    "cider_d",
    "feature_statistics",
    "fid",
    "frechet_distance",
    "load_wordnet",
    "report_metrics",
    "rouge_paper",
]
