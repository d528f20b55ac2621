"""MAT evaluation: MAT-Coding, MAT-Search and multi-hop QA, with the agent loop (tools) and with the paper's
direct-answer baseline, batched across items. Produces predictions in the authors' released format (plus each
item's trajectory), metrics per benchmark and mode (multi-hop QA: per dataset too), and a self-contained HTML
report.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from arft_core import metrics
from arft_core.agent import AgentEnv, EnvItem, Prompt, Tools, run_episodes
from arft_core.config import Config, EvalConfig
from arft_core.data.mat_coding import input_image_path
from arft_core.protocol import direct_prompt


@dataclass
class BenchItem:
    env: EnvItem
    split: str | None = None
    types: list[str] = field(default_factory=list)  # MAT-Coding corruption labels


def load_benchmark(name: str, cfg: Config) -> list[BenchItem]:
    """The test items of one benchmark, from the pipeline's data folders. Multi-hop: the datasets of
    `eval.multihop_files` (and/or FanOutQA dev), each item's split being its dataset's name."""
    import json

    if name == "mat-coding":
        folder = cfg.path("mat_coding")
        return [BenchItem(EnvItem(i["id"], "coding", i["question"], i["answers"], folder / input_image_path(i),
                                  labels=list(i["type"]), cjk=True), i.get("split"), list(i["type"]))
                for i in json.loads((folder / "test.json").read_text())]
    if name == "mat-search":
        folder = cfg.path("mat_search")
        # Annotated gold searches (manifest `gold.queries`, absent for unannotated items) feed the env's
        # query-similarity reward part.
        return [BenchItem(EnvItem(i["id"], "search", i["question"], i["answers"], folder / i["image_path"],
                                  gold_queries=list((i.get("gold") or {}).get("queries") or [])), i.get("split"))
                for i in json.loads((folder / "test.json").read_text())]
    if name == "multihop":
        from arft_core.data.multihop import load_datasets

        e = cfg.eval
        datasets = load_datasets(e.multihop_files, fanoutqa=e.multihop_fanoutqa, limit=e.multihop_limit,
                                 root=cfg.root)
        # The dataset as the split: score_run then scores each one (`multihop.<mode>.<dataset>.*`).
        return [BenchItem(EnvItem(i["id"], "search", i["question"], i["answers"]), dataset)
                for dataset, items in datasets.items() for i in items]
    raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(metrics.BENCHMARKS)}")


def eval_fingerprint(cfg: Config, plan: dict[str, list[BenchItem]]) -> str:
    """What makes two evaluations' scores comparable: the test items (questions, answers, image bytes) and every
    setting that changes a prediction. Versions scored under different fingerprints are not compared as-is."""
    import hashlib
    import json

    digest = hashlib.sha256()
    settings = {"eval": cfg.eval.model_dump(mode="json", exclude={"report_images_px", "checkpoints", "teacher_forced"}),
                "agent": cfg.agent.model_dump(mode="json"),
                "search": cfg.search.model_dump(mode="json", include={"backend", "top_k", "corpus_path"})}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(plan):
        for b in plan[name]:
            digest.update(json.dumps([name, b.env.id, b.env.question, b.env.answers, b.split]).encode())
            if b.env.image is not None:
                digest.update(hashlib.sha256(Path(b.env.image).read_bytes()).digest())
    return digest.hexdigest()[:16]


def run_direct(items: list[BenchItem], benchmark: str, generator) -> list[dict]:
    """The paper's direct baseline: question + a 'answer directly' suffix, no tools; the raw output is scored."""
    kind = "multihop" if benchmark == "multihop" else "mat"
    prompts = [Prompt(direct_prompt(b.env.question, kind, b.env.image is not None),
                      [b.env.image] if b.env.image else [], b.env.id, 1) for b in items]
    try:
        outputs = generator.generate(prompts)
    except Exception as e:  # recorded per item, like the agent's failures
        return [{"id": b.env.id, "pred_answer": None, "end": "error", "n_turns": 0, "tool_calls": {},
                 "turns": [{"output": None, "error": f"{type(e).__name__}: {e}"}]} for b in items]
    return [{"id": b.env.id, "pred_answer": out.strip(), "end": "answer", "n_turns": 1, "tool_calls": {},
             "turns": [{"output": out, "action": "answer", "error": None, "reward": {}, "observation": None}]}
            for b, out in zip(items, outputs, strict=True)]


def score_run(items: list[BenchItem], records: list[dict], benchmark: str,
              mode: str = "agent") -> tuple[dict, list[dict]]:
    """(metrics, predictions) for one benchmark and mode; agent mode also scores the valid-action rate."""
    cjk = benchmark == "mat-coding"
    predictions, rows = [], []
    for b, rec in zip(items, records, strict=True):
        s = metrics.score(rec["pred_answer"], b.env.answers, cjk)
        row = {**s, "answered": rec["pred_answer"] is not None, "split": b.split,
               "type": "+".join(b.types) if b.types else None}
        outputs = [t for t in rec["turns"] if t.get("output") is not None]
        if mode == "agent":  # the share of the item's model turns that were a well-formed action (0 when none ran)
            row["valid_actions"] = sum(t["action"] is not None for t in outputs) / len(outputs) if outputs else 0.0
        rows.append(row)
        predictions.append({"id": b.env.id, "gt": b.env.answers, "pred_answer": rec["pred_answer"],
                            **({"split": b.split} if b.split else {}), **({"type": b.types} if b.types else {}),
                            "f1": round(s["f1"], 4), "em": s["em"], "end": rec["end"], "n_turns": rec["n_turns"],
                            "tool_calls": rec["tool_calls"], "turns": rec["turns"]})
    out: dict[str, Any] = metrics.aggregate(rows)
    if benchmark == "multihop":
        out = _by_dataset(out, [b.split for b in items])
    if cjk:
        out["by_type"] = {k: v for k, v in metrics.aggregate(rows, by="type").items() if k != "avg"}
    calls = [r["tool_calls"] for r in records]
    n = max(len(records), 1)
    out["tool_calls"] = {k: round(sum(c.get(k, 0) for c in calls) / n, 3)
                         for k in ("search", "code", "code_failed", "invalid")}
    out["end"] = dict(Counter(r["end"] for r in records))
    out["mean_turns"] = round(sum(r["n_turns"] for r in records) / n, 3)
    return out, predictions


def _by_dataset(scores: dict, splits: list[str | None]) -> dict:
    """Multi-hop scores: one entry per dataset in plan order, and `avg` their unweighted mean (`n`: all items), as
    the paper's Table 2 Avg column: pooled, 2Wiki's 12,576 questions would drown Bamboogle's 125."""
    names = list(dict.fromkeys(s for s in splits if s))
    if not names:  # a hand-built plan without datasets: the pooled average
        return scores
    per = [scores[n] for n in names]
    mean = {"n": sum(d["n"] for d in per),
            **{m: round(sum(d[m] for d in per) / len(per), 2) for m in ("f1", "em", "squad_f1", "no_answer_rate",
                                                                         "valid_action_rate") if m in per[0]}}
    return {"avg": mean, **{n: scores[n] for n in names}}


def evaluate(model_dir: Path, cfg: Config, progress: Callable[[int], None] = lambda _: None,
             generator=None, plan: dict[str, list[BenchItem]] | None = None, *,
             tracer: Callable[[str, str, list[BenchItem], list[dict]], None] | None = None,
             ) -> tuple[dict, dict[str, list[dict]], str]:
    """Run every configured benchmark and mode. Returns (metrics[benchmark][mode], predictions["bench.mode"],
    the HTML report). `generator` defaults to `eval_generator` on `model_dir`; its `max_new_tokens` is set to each
    benchmark's eval.max_new_tokens in turn. `plan` is the loaded benchmarks (default: `load_benchmark` for each of
    `cfg.eval.benchmarks`). `tracer(benchmark, mode, items, predictions)` is called after each benchmark and mode
    is scored, while the tool images are still in the scratch folder (e.g. `traces.log_eval_traces`)."""
    plan = plan or {b: load_benchmark(b, cfg) for b in cfg.eval.benchmarks}
    generator = generator or eval_generator(model_dir, cfg)
    needs_code = "agent" in cfg.eval.modes and "mat-coding" in plan
    needs_search = "agent" in cfg.eval.modes and any(b != "mat-coding" for b in plan)
    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    sections = []
    agent = cfg.agent.for_training_mode(cfg.train.mode)
    with tempfile.TemporaryDirectory(prefix="arft-eval-") as scratch, _tools(cfg, needs_code, needs_search) as tools:
        for bench, items in plan.items():
            generator.max_new_tokens = cfg.eval.max_new_tokens[bench]  # the paper's 1024 coding / 2048 search
            for mode in cfg.eval.modes:
                if mode == "agent":
                    envs = [AgentEnv(b.env, tools, agent, Path(scratch) / bench / f"item-{k}")
                            for k, b in enumerate(items)]
                    records = run_episodes(envs, generator, tool_threads=cfg.sandbox.workers, progress=progress)
                else:
                    records = run_direct(items, bench, generator)
                    progress(len(items))
                scores, preds = score_run(items, records, bench, mode)
                if tracer is not None:
                    tracer(bench, mode, items, preds)
                results.setdefault(bench, {})[mode] = scores
                sections.append(render_section(bench, mode, scores, items, preds, cfg.eval.report_images_px))
                predictions[f"{bench}.{mode}"] = [_portable(p) for p in preds]
    return results, predictions, render_report(results, sections)


def teacher_forced(generator, cfg: Config) -> dict[str, float] | None:
    """MAT-Coding's held-out teacher steps (each test item's problem, code and answer steps: what SFT trains on,
    for items it never saw) scored teacher-forced by the back-end's model: the share of their tokens it predicts
    (argmax, %) and their mean negative log-likelihood. A learning signal that does not need whole well-formed
    generations. None for a back-end without an HF model (vLLM) or when eval.teacher_forced is off."""
    import json

    import torch

    from arft_core.data.mat_coding import step_samples
    from arft_core.io import load_image
    from arft_core.protocol import step_prompt

    model, processor = getattr(generator, "model", None), getattr(generator, "processor", None)
    if not cfg.eval.teacher_forced or model is None or processor is None:
        return None
    folder = cfg.path("mat_coding")
    rows = [r for item in json.loads((folder / "test.json").read_text()) for r in step_samples(item)]
    right = total = 0
    nll = 0.0
    model.eval()
    for row in rows:
        prompt = processor.apply_chat_template(step_prompt("coding", row), tokenize=False, add_generation_prompt=True)
        image = load_image(folder / row["image_path"], None)
        full = processor(text=[prompt + row["solution"]], images=[image], return_tensors="pt").to(model.device)
        start = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        with torch.no_grad():
            logits = model(**full).logits[0, start - 1:-1].float()
        target = full["input_ids"][0, start:]
        right += int((logits.argmax(-1) == target).sum())
        total += len(target)
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
    return {"n": len(rows), "token_accuracy": round(100 * right / max(total, 1), 2),
            "nll": round(nll / max(total, 1), 4)}


def generation_eval(cfg: Config) -> EvalConfig:
    """`eval` as generation uses it: under agent.protocol paper the decoding is the checkpoint's
    generation_config, whatever eval.decoding says (the authors' harness passed no sampling arguments)."""
    return cfg.eval.model_copy(update={"decoding": "checkpoint"}) if cfg.agent.protocol == "paper" else cfg.eval


def eval_generator(model_dir: Path, cfg: Config, progress: Callable[[int], None] = lambda _: None):
    """The evaluation's model back-end on `model_dir`: rollout's engine, eval's decoding, the protocol's stop strings
    (none under `paper`), the processor's pixel budget from model.min_pixels / max_pixels whatever the
    checkpoint's own."""
    from arft_core.agent.generation import make_generator
    from arft_core.protocol import stop_sequences

    return make_generator(model_dir, generation_eval(cfg), cfg.rollout, cfg.model.dtype, progress,
                          stop_sequences=stop_sequences(cfg.agent.protocol), min_pixels=cfg.model.min_pixels,
                          max_pixels=cfg.model.max_pixels)


def generation_settings(generator, cfg: Config) -> dict[str, Any]:
    """What the back-end generated with, flat (MLflow params of the evaluation): the resolved decoding (under
    `eval.decoding: checkpoint`, the checkpoint's values), max new tokens per benchmark, stop strings, the engine, and
    the processor's pixel bounds (HF back-end)."""
    out: dict[str, Any] = {"generation.source": generation_eval(cfg).decoding,
                           "generation.engine": "vllm" if hasattr(generator, "llm") else "hf"}
    out.update({f"generation.{k}": v for k, v in (getattr(generator, "decoding", None) or {}).items()})
    out.update({f"generation.max_new_tokens.{b}": n for b, n in cfg.eval.max_new_tokens.items()})
    if hasattr(generator, "stop_sequences"):
        out["generation.stop_sequences"] = " ".join(generator.stop_sequences) or "none"
    if getattr(generator, "processor", None) is not None:
        from arft_core.model.processor import pixel_budget

        out["generation.min_pixels"], out["generation.max_pixels"] = pixel_budget(generator.processor)
    return out


class _tools:
    """The sandbox and search tool, started only when the agent needs them, and closed afterwards."""

    def __init__(self, cfg: Config, code: bool, search: bool):
        self.cfg, self.code, self.search, self.pool = cfg, code, search, None

    def __enter__(self) -> Tools:
        from arft_core.search import make_backend

        if self.code:
            from arft_core.sandbox import SandboxPool

            self.pool = SandboxPool(self.cfg.sandbox)
        backend = make_backend(self.cfg.search, self.cfg.root) if self.search else None
        return Tools(sandbox=self.pool, search=backend, top_k=self.cfg.search.top_k)

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()


_TIMING_KEYS = ("gen_start_ns", "gen_end_ns", "tool_start_ns", "tool_elapsed_s")


def _portable(prediction: dict) -> dict:
    """Prediction without scratch-folder image paths (the images live inline in the HTML report)."""
    turns = []
    for t in prediction["turns"]:
        obs = t.get("observation")
        if obs:
            obs = {"text": obs["text"], "new_image": obs.get("image") is not None}
        # Timings (for traces) left out: the same predictions from the same model and data, run after run.
        turns.append({k: v for k, v in {**t, "observation": obs}.items() if k not in _TIMING_KEYS})
    return {**prediction, "turns": turns}


# ---- HTML report
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


def render_section(bench: str, mode: str, scores: dict, items: list[BenchItem], preds: list[dict], px: int) -> str:
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
