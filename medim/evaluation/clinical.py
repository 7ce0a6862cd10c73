"""Clinical report metrics: CheXbert F1 (the 14 CheXpert observations, and the 5-observation subset)
and RadGraph F1, as the report-generation field reports them (ReXrank, LLaVA-Rad, MAIRA-2, ...).

CheXbert runs through transformers' `BertModel` with the labeler's 14 linear heads, the label logic
of the `f1chexbert` package (its "rrg" mode: "present" and "uncertain" count as positive) and the
F1 of its scikit-learn `classification_report` (micro and macro averages). The checkpoint is
`chexbert.pth` from the Hub repo StanfordAIMI/RRG_scorers (where `f1chexbert` gets it), read with
`torch.load(weights_only=True)`: no pickle runs code. RadGraph F1 is the `radgraph` package's own
`F1RadGraph` (a DyGIE++ span model on vendored AllenNLP code) with its weights read from a local
folder or its cache; see `radgraph_f1`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medim.utils.checks import check_choice, check_int
from medim.utils.hub import HubOptions, resolve_file

__all__ = [
    "CHEXBERT_CONDITIONS",
    "CHEXBERT_5",
    "CheXbert",
    "ClinicalScores",
    "chexbert_f1",
    "chexbert_labels",
    "multilabel_f1",
    "radgraph_f1",
]

CHEXBERT_CONDITIONS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
CHEXBERT_5 = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
CHEXBERT_REPO, CHEXBERT_FILE, CHEXBERT_TOKENIZER = "StanfordAIMI/RRG_scorers", "chexbert.pth", "bert-base-uncased"
RADGRAPH_MODELS = ("radgraph", "radgraph-xl", "modern-radgraph-xl")
RADGRAPH_LEVELS = ("simple", "partial", "complete")
_MAX_TOKENS = 512


@dataclass
class ClinicalScores:
    """Scores of one clinical metric: name -> value, what computed them, per-report labels or
    rewards where the metric has them."""

    scores: dict[str, float]
    implementations: dict[str, str]
    per_report: dict[str, list] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- CheXbert
class CheXbert(nn.Module):
    """CheXbert's labeler (Smit et al., 2020): BERT, then on the [CLS] state 13 heads of 4 classes
    (blank, present, absent, uncertain) and one of 2 for "No Finding". Module names match the
    checkpoint's (`bert.*`, `linear_heads.<i>.*`)."""

    def __init__(self, config):
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.bert(input_ids, attention_mask=attention_mask)[0][:, 0]
        return [head(cls) for head in self.linear_heads]


def load_chexbert_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The labeler's weights from `chexbert.pth` (its "model_state_dict", read with
    `weights_only=True`) or a safetensors copy, without DataParallel's "module." prefix."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state)
    # The checkpoint predates transformers' non-persistent position_ids buffer.
    return {k.replace("module.", ""): v for k, v in state.items() if not k.endswith("position_ids")}


def load_chexbert(
    weights: str | os.PathLike = CHEXBERT_REPO,
    tokenizer: str | os.PathLike = CHEXBERT_TOKENIZER,
    device: str | torch.device | None = None,
    hub: HubOptions | None = None,
) -> tuple[CheXbert, Any]:
    """The labeler and its tokenizer. `weights`: `chexbert.pth` (or a `.safetensors` copy), a
    folder holding it, or a Hub id holding it (default StanfordAIMI/RRG_scorers); `tokenizer`: a
    folder or Hub id with BERT-base-uncased's vocabulary and config (the architecture). Missing
    files raise one line naming what to download."""
    from transformers import AutoConfig, BertTokenizer

    options = (hub or HubOptions()).kwargs()
    try:
        path = resolve_file(weights, None if os.path.isfile(weights) else CHEXBERT_FILE, hub=hub)
        config = AutoConfig.from_pretrained(str(tokenizer), trust_remote_code=False, **options)
        tok = BertTokenizer.from_pretrained(str(tokenizer), **options)
    except (OSError, ValueError) as e:
        detail = " ".join(str(e).split())  # one line, whatever the loader wrote
        raise FileNotFoundError(
            f"CheXbert needs {CHEXBERT_FILE} (Hub repo {CHEXBERT_REPO}) and the {CHEXBERT_TOKENIZER} "
            f"tokenizer and config: `hf download {CHEXBERT_REPO} {CHEXBERT_FILE}` and "
            f"`hf download {CHEXBERT_TOKENIZER}`, then pass them or use the Hub cache ({type(e).__name__}: {detail})"
        ) from None
    model = CheXbert(config)
    model.load_state_dict(load_chexbert_state(path))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tok


def chexbert_input_ids(report: str, tokenizer) -> list[int]:
    """`f1chexbert`'s tokenisation of one report: whitespace collapsed, WordPiece, [CLS] ... [SEP]
    cut to 512 ids; a report with no token is [CLS] [SEP]."""
    text = re.sub(r"\s+", " ", report.strip().replace("\n", " ")).strip()
    tokens = tokenizer.tokenize(text)
    if not tokens:
        return [tokenizer.cls_token_id, tokenizer.sep_token_id]
    ids = [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(tokens), tokenizer.sep_token_id]
    return ids[: _MAX_TOKENS - 1] + [tokenizer.sep_token_id] if len(ids) > _MAX_TOKENS else ids


@torch.no_grad()
def chexbert_labels(reports: Sequence[str], model: CheXbert, tokenizer, batch_size: int = 32) -> np.ndarray:
    """`[N, 14]` 0/1 labels, `f1chexbert`'s "rrg" mode: 1 where the head says present (1) or
    uncertain (3), 0 for blank (0) and absent (2). Reports are stripped first, as there; batches are
    right-padded under an attention mask (the package scores one report at a time)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(reports), batch_size):
        ids = [chexbert_input_ids(r.strip(), tokenizer) for r in reports[start : start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i in ids], device=device)
        classes = torch.stack([logits.argmax(dim=1) for logits in model(input_ids, mask)], dim=1)
        out.append(((classes == 1) | (classes == 3)).long().cpu().numpy())
    return np.concatenate(out)


def multilabel_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 over label columns, as scikit-learn's `classification_report` gives them
    (a column with no positive on either side has F1 0, its `zero_division` default)."""
    tp = (y_true & y_pred).sum(0).astype(np.float64)
    fp = ((1 - y_true) & y_pred).sum(0).astype(np.float64)
    fn = (y_true & (1 - y_pred)).sum(0).astype(np.float64)
    denominator = 2 * tp + fp + fn
    per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    total = denominator.sum()
    return {"micro": float(2 * tp.sum() / total) if total else 0.0, "macro": float(per_class.mean())}


def chexbert_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    weights: str | os.PathLike = CHEXBERT_REPO,
    tokenizer: str | os.PathLike = CHEXBERT_TOKENIZER,
    model: tuple[CheXbert, Any] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    hub: HubOptions | None = None,
) -> ClinicalScores:
    """CheXbert F1 of generated reports against references: micro and macro F1 over the 14
    observations and over the 5 (cardiomegaly, edema, consolidation, atelectasis, pleural
    effusion), from the labels of both sides. `model` takes a `load_chexbert(...)` result to reuse.

    Example:
        >>> chexbert_f1(["No effusion."], ["Small left effusion."], weights="chexbert.pth").scores  # doctest: +SKIP
    """
    check_int(batch_size, "batch_size", minimum=1)
    labeler, tok = model or load_chexbert(weights, tokenizer, device, hub)
    hyp = chexbert_labels(predictions, labeler, tok, batch_size)
    ref = chexbert_labels(references, labeler, tok, batch_size)
    five = [CHEXBERT_CONDITIONS.index(c) for c in CHEXBERT_5]
    f14, f5 = multilabel_f1(ref, hyp), multilabel_f1(ref[:, five], hyp[:, five])
    scores = {
        "chexbert_micro_f1_14": f14["micro"], "chexbert_macro_f1_14": f14["macro"],
        "chexbert_micro_f1_5": f5["micro"], "chexbert_macro_f1_5": f5["macro"],
    }
    where = "medim CheXbert (transformers BertModel, f1chexbert's rrg labels, classification_report F1)"
    labels = {"labels": hyp.tolist(), "reference_labels": ref.tolist()}
    return ClinicalScores(scores, dict.fromkeys(scores, where), labels)


# ---------------------------------------------------------------- RadGraph
def _radgraph_package():
    try:
        import radgraph
    except ImportError as e:
        raise ImportError("RadGraph F1 needs the `radgraph` package: pip install 'medim-diffusion[radgraph]'") from e
    return radgraph


def load_radgraph(
    model_type: str = "radgraph-xl",
    model_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """The `radgraph` package's `F1RadGraph` (all three reward levels) on a local model: `model_dir`
    holds `<model_type>/` (config.json, vocabulary/, weights.th: the package's archive from the Hub
    repo StanfordAIMI/RRG_scorers, extracted), default the package's own cache. Built on the CPU,
    where the package reads weights.th with `weights_only=True`, then moved to `device`."""
    check_choice(model_type, "model_type", RADGRAPH_MODELS)
    package = _radgraph_package()
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        # Its vendored AllenNLP calls `tokenizer.encode_plus`, which transformers 5 removed.
        raise ImportError(
            f"the radgraph package ({_radgraph_package_version()}) needs transformers < 5, this is "
            f"{transformers.__version__}: pip install 'medim-diffusion[radgraph]' in its own environment"
        )
    from radgraph.radgraph import CACHE_DIR

    root = os.path.expanduser(str(model_dir)) if model_dir is not None else CACHE_DIR
    folder = os.path.join(root, model_type)
    if not os.path.isfile(os.path.join(folder, "weights.th")):
        # The package would download here (and run without a network check): say what it needs instead.
        raise FileNotFoundError(
            f"RadGraph weights not found in {folder}: download {model_type}.tar.gz from the Hub repo "
            f"{CHEXBERT_REPO} (`hf download {CHEXBERT_REPO} {model_type}.tar.gz`) and extract it into {folder}"
        )
    scorer = package.F1RadGraph(reward_level="all", model_type=model_type, model_cache_dir=root, cuda=-1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorer.radgraph.model.to(device)
    scorer.radgraph.device = device
    return scorer.eval()


def radgraph_f1(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    model_type: str = "radgraph-xl",
    model_dir: str | os.PathLike | None = None,
    scorer: Any = None,
    device: str | torch.device | None = None,
) -> ClinicalScores:
    """RadGraph F1 (Delbrouck et al., 2022) from the `radgraph` package's `F1RadGraph`: the mean
    over reports of the entity F1 ("simple", RG_E), entity-and-relation-exists F1 ("partial", RG_ER)
    and full-relation F1 ("complete"); `model_type` defaults to the package's, radgraph-xl. A pair with an
    empty side scores 0, as in the package. `scorer` takes a `load_radgraph(...)` result to reuse.

    Example:
        >>> radgraph_f1(["no effusion"], ["small left effusion"], model_dir="radgraph_models/").scores  # doctest: +SKIP
    """
    scorer = scorer or load_radgraph(model_type, model_dir, device)
    means, rewards, _, _ = scorer(refs=list(references), hyps=list(predictions))
    scores = {f"radgraph_{level}": float(m) for level, m in zip(RADGRAPH_LEVELS, means)}
    version = _radgraph_package_version()
    where = f"radgraph {version} F1RadGraph ({scorer.radgraph.model_type})"
    per_report = {f"radgraph_{level}": [float(r) for r in rs] for level, rs in zip(RADGRAPH_LEVELS, rewards)}
    return ClinicalScores(scores, dict.fromkeys(scores, where), per_report)


def _radgraph_package_version() -> str:
    from importlib.metadata import version

    return version("radgraph")
