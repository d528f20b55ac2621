"""Answer metrics as the paper scores them (spec §3.1, §6.1): set-based token F1 and EM, max over gold answers.

`cjk=True` is the MAT-Coding notebook's Chinese handling, reproduced to the character: full-width punctuation is
removed too; a text containing CJK ideographs (U+4E00-U+9FFF, `protocol.has_cjk`) loses its ASCII spaces and
keeps its articles; and F1 is computed over characters whenever either side has such a character (so an English
gold compared with a Chinese prediction keeps its spaces as tokens). Those details are what make Table 1 reproduce to two decimals.
SQuAD's multiset F1 is reported beside the paper's set-based one.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from arft_core.protocol import has_cjk

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Full-width and CJK punctuation the MAT-Coding scorer removes in addition to ASCII punctuation.
_CJK_PUNCT = frozenset("！？｡＂＃＄％＆＇（）＊＋，－．／：；＜＝＞＠［＼］＾＿｀｛｜｝～“”‘’、。：《》【】")
_ASCII_PUNCT = frozenset(string.punctuation)

BENCHMARKS = ("mat-coding", "mat-search", "multihop")
# Positional Simple/Hard sizes the authors' notebooks use when items carry no split field (spec §5).
POSITIONAL_SPLITS = {"mat-coding": 70, "mat-search": 75}


def normalize(text: str, cjk: bool = False) -> str:
    """Lowercase, drop punctuation, then either drop spaces (CJK text) or drop articles and collapse spaces."""
    text = text.lower()
    punct = _ASCII_PUNCT | _CJK_PUNCT if cjk else _ASCII_PUNCT
    text = "".join(ch for ch in text if ch not in punct)
    if cjk and has_cjk(text):
        return text.replace(" ", "")
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(pred: str, gold: str, cjk: bool) -> tuple[list[str], list[str]]:
    p, g = normalize(pred, cjk), normalize(gold, cjk)
    if cjk and (has_cjk(p) or has_cjk(g)):
        return list(p), list(g)
    return p.split(), g.split()


def exact_match(pred: str, gold: str, cjk: bool = False) -> float:
    return float(normalize(pred, cjk) == normalize(gold, cjk))


def f1(pred: str, gold: str, cjk: bool = False) -> float:
    """The paper's set-based token F1: |set(pred) & set(gold)| over each side's token count."""
    pt, gt = _tokens(pred, gold, cjk)
    common = len(set(pt) & set(gt))
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


def squad_f1(pred: str, gold: str, cjk: bool = False) -> float:
    """SQuAD's multiset token F1 (repeated tokens count as often as they appear on both sides)."""
    pt, gt = _tokens(pred, gold, cjk)
    common = sum((Counter(pt) & Counter(gt)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


def score(pred: str | None, golds: list[str] | str, cjk: bool = False) -> dict[str, float]:
    """F1, EM and SQuAD F1 of one prediction: max over golds; EM = 1 forces both F1s to 1; None scores 0."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if pred is None or not golds:
        return {"f1": 0.0, "em": 0.0, "squad_f1": 0.0}
    em = max(exact_match(pred, g, cjk) for g in golds)
    if em == 1.0:
        return {"f1": 1.0, "em": 1.0, "squad_f1": 1.0}
    return {"f1": max(f1(pred, g, cjk) for g in golds), "em": 0.0,
            "squad_f1": max(squad_f1(pred, g, cjk) for g in golds)}


def _pct(values: list[float]) -> float:
    return round(100 * sum(values) / len(values), 2) if values else 0.0


def summarize(rows: list[dict]) -> dict:
    """Percent F1/EM/SQuAD-F1 and no-answer rate over scored rows (keys f1, em, squad_f1, answered), and the
    valid-action rate when every row has one (`valid_actions`: the share of the item's model turns that were a
    well-formed protocol action; agent mode)."""
    out = {"n": len(rows), "f1": _pct([r["f1"] for r in rows]), "em": _pct([r["em"] for r in rows]),
           "squad_f1": _pct([r["squad_f1"] for r in rows]),
           "no_answer_rate": _pct([float(not r["answered"]) for r in rows])}
    if rows and all("valid_actions" in r for r in rows):
        out["valid_action_rate"] = _pct([r["valid_actions"] for r in rows])
    return out


def aggregate(rows: list[dict], by: str = "split") -> dict:
    """`summarize` overall (`avg`) and per value of `by` (rows without it are only in `avg`)."""
    out = {"avg": summarize(rows)}
    for value in sorted({r[by] for r in rows if r.get(by)}):
        out[value] = summarize([r for r in rows if r.get(by) == value])
    return out


def score_predictions(rows: list[dict], benchmark: str) -> dict:
    """Score a prediction file in the authors' released format (list of `{id?, gt, pred_answer, split?}`).

    Returns `{"n", "none", "avg", "simple", "hard"}` with percentages; simple/hard only for the MAT benchmarks,
    taken from each row's `split` field, else by position (first 70 / 75 items are Simple, as the authors do).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    cjk = benchmark == "mat-coding"
    scored = []
    for i, row in enumerate(rows):
        missing = [k for k in ("gt", "pred_answer") if k not in row]
        if missing:
            raise ValueError(f"prediction {row.get('id', f'#{i}')}: missing field(s) {', '.join(missing)}")
        pred = row["pred_answer"]
        if pred is not None and not isinstance(pred, str):
            raise ValueError(f"prediction {row.get('id', f'#{i}')}: field pred_answer must be a string or null, "
                             f"got {type(pred).__name__}")
        scored.append({**score(pred, row["gt"], cjk), "answered": pred is not None, "split": row.get("split")})
    out = {"n": len(rows), "none": sum(not r["answered"] for r in scored)}
    out["avg"] = _f1_em(scored)
    if benchmark in POSITIONAL_SPLITS:
        if not all(r["split"] in ("simple", "hard") for r in scored):
            cut = POSITIONAL_SPLITS[benchmark]
            for i, r in enumerate(scored):
                r["split"] = "simple" if i < cut else "hard"
        for split in ("simple", "hard"):
            out[split] = _f1_em([r for r in scored if r["split"] == split])
    return out


def _f1_em(rows: list[dict]) -> dict:
    return {"f1": _pct([r["f1"] for r in rows]), "em": _pct([r["em"] for r in rows]),
            "squad_f1": _pct([r["squad_f1"] for r in rows])}
