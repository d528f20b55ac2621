"""Answer metrics as the paper scores them (spec §3.1, §6.1): set-based token F1 and EM, max over gold answers.

`cjk=True` adds the MAT-Coding notebook's Chinese handling: full-width punctuation is removed too, and text with
CJK characters is compared character by character without spaces or article stripping.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")
# Full-width and CJK punctuation removed by the MAT-Coding scorer in addition to ASCII punctuation.
_CJK_PUNCT = set("，。！？；：、“”‘’（）《》【】「」『』—…·～￥％＃＠＆＊（）＿＋－＝［］｛｝｜＼：；＂＇＜＞，．？／")
_ASCII_PUNCT = set(string.punctuation)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def normalize(text: str, cjk: bool = False) -> str:
    """Lowercase, drop punctuation, drop articles, collapse spaces (the paper's normalisation)."""
    text = text.lower()
    punct = _ASCII_PUNCT | _CJK_PUNCT if cjk else _ASCII_PUNCT
    text = "".join(ch for ch in text if ch not in punct)
    if cjk and has_cjk(text):
        return "".join(text.split())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(norm: str, cjk: bool) -> list[str]:
    return list(norm) if cjk and has_cjk(norm) else norm.split()


def exact_match(pred: str, gold: str, cjk: bool = False) -> float:
    return float(normalize(pred, cjk) == normalize(gold, cjk))


def f1(pred: str, gold: str, cjk: bool = False) -> float:
    """Set-based token F1 (not SQuAD's multiset): |set(pred) & set(gold)| over each side's token count."""
    p, g = normalize(pred, cjk), normalize(gold, cjk)
    pt, gt = _tokens(p, cjk), _tokens(g, cjk)
    common = len(set(pt) & set(gt))
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


def score(pred: str | None, golds: list[str], cjk: bool = False) -> dict[str, float]:
    """F1 and EM of one prediction against its golds: max over golds; EM = 1 forces F1 = 1; None scores 0."""
    if pred is None or not golds:
        return {"f1": 0.0, "em": 0.0}
    em = max(exact_match(pred, g, cjk) for g in golds)
    best_f1 = 1.0 if em == 1.0 else max(f1(pred, g, cjk) for g in golds)
    return {"f1": best_f1, "em": em}


def aggregate(rows: list[dict]) -> dict:
    """Percent F1/EM over rows with keys f1, em, split, answered; overall and per split."""

    def summary(part: list[dict]) -> dict:
        n = len(part)
        return {
            "n": n,
            "f1": round(100 * sum(r["f1"] for r in part) / n, 2) if n else 0.0,
            "em": round(100 * sum(r["em"] for r in part) / n, 2) if n else 0.0,
            "no_answer_rate": round(100 * sum(not r["answered"] for r in part) / n, 2) if n else 0.0,
        }

    out = {"avg": summary(rows)}
    for split in sorted({r["split"] for r in rows}):
        out[split] = summary([r for r in rows if r["split"] == split])
    return out
