"""Every HTML page the pipeline writes: the evaluation report (per benchmark and mode, each item's trajectory with
its images inline) and the sampled rollouts of agentic training. Pages are self-contained (images as data URLs)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def inline_image(path: Path | None, px: int) -> str:
    if path is None:
        return ""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(scores: dict) -> str:
    splits = [k for k in scores if isinstance(scores[k], dict) and "f1" in scores[k]]
    head = "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    body = "".join(
        f"<tr><td>{m}</td>" + "".join(f"<td>{scores[s][m]}</td>" for s in splits) + "</tr>"
        for m in ("n", "f1", "em", "squad_f1", "no_answer_rate", "valid_action_rate") if m in scores[splits[0]])
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _dataset_table(scores: dict) -> str:
    """Multi-hop QA: one row per dataset, then `avg`, their mean (the paper's Table 2, one row per column)."""
    names = [k for k in scores if k != "avg" and isinstance(scores[k], dict) and "f1" in scores[k]] + ["avg"]
    columns = ("n", "f1", "em", "squad_f1", "no_answer_rate")
    head = "".join(f"<th>{c}</th>" for c in ("dataset", *columns))
    body = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{scores[n][c]}</td>" for c in columns) + "</tr>"
                   for n in names)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_section(bench: str, mode: str, scores: dict, items: list, preds: list[dict], px: int) -> str:
    esc = html.escape
    parts = [f'<h2 id="{bench}-{mode}">{esc(bench)} · {esc(mode)}</h2>',
             _dataset_table(scores) if bench == "multihop" else _table(scores)]
    if "by_type" in scores:
        parts.append("<h3>By corruption type</h3>" + _table(scores["by_type"]))
    parts.append(f"<p>tool calls per item: {esc(str(scores['tool_calls']))}; endings: {esc(str(scores['end']))}</p>")
    for b, p in zip(items, preds, strict=True):
        ok = "ok" if p["em"] else ("part" if p["f1"] else "bad")
        turns = []
        for k, t in enumerate(p["turns"], start=1):
            obs = t.get("observation") or {}
            err = f'<div class="err">{esc(t["error"])}</div>' if t.get("error") else ""
            tool = f"<pre>{esc(obs.get('text') or '')}</pre>" if obs.get("text") else ""
            turns.append(f'<div class="turn"><b>turn {k}</b> <pre>{esc(t.get("output") or "")}</pre>{err}{tool}'
                         f'{inline_image(obs.get("image"), px)}</div>')
        dataset = f"{esc(b.split)} " if bench == "multihop" and b.split else ""
        parts.append(
            f'<details class="{ok}"><summary>{dataset}#{esc(str(p["id"]))} F1 {p["f1"]:.2f} · '
            f'{esc(str(p["pred_answer"]))} · gold {esc(str(p["gt"]))} · {esc(str(p["end"]))}</summary>'
            f'<p>{esc(b.env.question)}</p>{inline_image(b.env.image, px)}{"".join(turns)}</details>')
    return "\n".join(parts)


def _dataset_summary(bench: str, scores: dict) -> str:
    """Multi-hop QA's datasets under its summary line (avg is their mean)."""
    names = [k for k in scores if k != "avg" and isinstance(scores[k], dict) and "f1" in scores[k]]
    if bench != "multihop" or not names:
        return ""
    return "<ul>" + "".join(f'<li>{html.escape(n)}: F1 {scores[n]["f1"]}, EM {scores[n]["em"]}, no answer '
                            f'{scores[n]["no_answer_rate"]}% (n={scores[n]["n"]})</li>' for n in names) + "</ul>"


def render_report(results: dict, sections: list[str]) -> str:
    summary = "".join(f'<li><a href="#{b}-{m}">{b} · {m}</a>: F1 {s["avg"]["f1"]}, EM {s["avg"]["em"]}, '
                      f'no answer {s["avg"]["no_answer_rate"]}%{_dataset_summary(b, s)}</li>'
                      for b, modes in results.items() for m, s in modes.items())
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}pre{white-space:pre-wrap;background:#f4f4f4;"
             "padding:4px}td,th{border:1px solid #ccc;padding:2px 8px}table{border-collapse:collapse}"
             ".ok summary{color:#070}.part summary{color:#a60}.bad summary{color:#a00}.err{color:#a00}"
             ".turn{margin-left:1em;border-left:3px solid #ddd;padding-left:8px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>arft evaluation</title><style>{style}</style>"
            f"</head><body><h1>arft evaluation</h1><ul>{summary}</ul>{''.join(sections)}</body></html>")


def render_trajectories(step: int, items: list, records: list[dict], limit: int) -> str:
    """A self-contained HTML page of a rollout's first trajectories (`items`: their EnvItems): each turn, its tool
    result and images."""
    parts = [f"<h1>GRPO step {step}: sample rollouts</h1>"]
    for item, rec in list(zip(items, records, strict=True))[:limit]:
        turns = []
        for k, t in enumerate(rec["turns"], start=1):
            obs = t.get("observation") or {}
            turns.append(f"<h4>turn {k} · {html.escape(str(t.get('action')))} · reward {t.get('reward')}</h4>"
                         f"<pre>{html.escape(t.get('output') or '')}</pre>"
                         + (f"<pre>{html.escape(t['error'])}</pre>" if t.get("error") else "")
                         + (f"<pre>{html.escape(obs.get('text') or '')}</pre>" if obs.get("text") else "")
                         + inline_image(obs.get("image"), 256))
        parts.append(f"<details open><summary>item {html.escape(str(item.id))} · "
                     f"{html.escape(str(item.question))} · gold {html.escape(str(item.answers))} · "
                     f"end {rec['end']}</summary>{inline_image(item.image, 256)}"
                     f"{''.join(turns)}</details>")
    return "<!doctype html><meta charset='utf-8'><body style='font-family:sans-serif'>" + "".join(parts)
