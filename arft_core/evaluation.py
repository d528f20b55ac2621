"""MAT evaluation: MAT-Coding, MAT-Search and multi-hop QA, with the agent loop (tools) and with the paper's
direct-answer baseline, batched across items. Produces predictions in the authors' released format (plus each
item's trajectory), metrics per benchmark and mode (multi-hop QA: per dataset too), and a self-contained HTML
report.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from arft_core import metrics
from arft_core.agent.env import EnvItem
from arft_core.agent.runner import Agent, open_tools
from arft_core.config import Config, EvalConfig
from arft_core.reports import render_report, render_section


@dataclass
class BenchItem:
    env: EnvItem
    split: str | None = None
    types: list[str] = field(default_factory=list)  # MAT-Coding corruption labels


def load_benchmark(name: str, cfg: Config) -> list[BenchItem]:
    """The test items of one benchmark, from the pipeline's data folders. Multi-hop: the datasets of
    `eval.multihop_files` (and/or FanOutQA dev), each item's split being its dataset's name."""
    import json

    if name in ("mat-coding", "mat-search"):
        task, folder = ("coding", cfg.path("mat_coding")) if name == "mat-coding" else ("search", cfg.path("mat_search"))
        return [BenchItem(EnvItem.from_manifest(i, task, folder), i.get("split"), list(i.get("type") or []))
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
             engine=None, plan: dict[str, list[BenchItem]] | None = None, *,
             tracer: Callable[[str, str, list[BenchItem], list[dict]], None] | None = None,
             ) -> tuple[dict, dict[str, list[dict]], str]:
    """Run every configured benchmark and mode. Returns (metrics[benchmark][mode], predictions["bench.mode"],
    the HTML report). `engine` defaults to `eval_engine` on `model_dir`; each benchmark's calls are capped at its
    eval.max_new_tokens. `plan` is the loaded benchmarks (default: `load_benchmark` for each of
    `cfg.eval.benchmarks`). `tracer(benchmark, mode, items, predictions)` is called after each benchmark and mode
    is scored, while the tool images are still in the scratch folder (e.g. `traces.log_eval_traces`)."""
    plan = plan or {b: load_benchmark(b, cfg) for b in cfg.eval.benchmarks}
    agent = eval_agent(engine or eval_engine(model_dir, cfg), cfg)
    needs_code = "agent" in cfg.eval.modes and "mat-coding" in plan
    needs_search = "agent" in cfg.eval.modes and any(b != "mat-coding" for b in plan)
    results: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    sections = []
    search = None
    if needs_search:
        from arft_core.search import make_backend

        search = make_backend(cfg.search, cfg.root)
    with tempfile.TemporaryDirectory(prefix="arft-eval-") as scratch, \
            open_tools(cfg.sandbox, code=needs_code, search=search, top_k=cfg.search.top_k) as tools:
        for bench, items in plan.items():
            for mode in cfg.eval.modes:
                if mode == "agent":
                    episodes = agent.run(bench, [b.env for b in items], tools, Path(scratch) / bench,
                                         progress=progress)
                    records = [e.record for e in episodes]
                else:
                    records = agent.direct(bench, [b.env for b in items])
                    progress(len(items))
                scores, preds = score_run(items, records, bench, mode)
                if tracer is not None:
                    tracer(bench, mode, items, preds)
                results.setdefault(bench, {})[mode] = scores
                sections.append(render_section(bench, mode, scores, items, preds, cfg.eval.report_images_px))
                predictions[f"{bench}.{mode}"] = [_portable(p) for p in preds]
    return results, predictions, render_report(results, sections)


def eval_agent(engine, cfg: Config) -> Agent:
    """The agent that evaluation and serving run on `engine`: the agent settings with the transcript form of the
    model's training mode, each benchmark's eval.max_new_tokens, sandbox.workers tool threads."""
    return Agent(engine, cfg.agent.for_training_mode(cfg.train.mode), cfg.eval.max_new_tokens,
                 tool_threads=cfg.sandbox.workers)


def teacher_forced(engine, cfg: Config) -> dict[str, float] | None:
    """MAT-Coding's held-out teacher turns (each test item's problem, code and answer turns replayed through the
    agent loop: what SFT trains on, for items it never saw) scored teacher-forced by the engine's model: the share
    of their tokens it predicts (argmax, %) and their mean negative log-likelihood. A learning signal that does not
    need whole well-formed generations. None for an engine without an HF model (vLLM) or when eval.teacher_forced
    is off."""
    import torch

    from arft_core.agent.steps import step_rows
    from arft_core.agent.transcript import Transcript
    from arft_core.io import load_manifest

    model = getattr(engine, "model", None)
    if not cfg.eval.teacher_forced or model is None:
        return None
    agent = cfg.agent.for_training_mode(cfg.train.mode)
    transcript = Transcript(engine.processor, agent.protocol, agent.transcript)
    folder = cfg.path("mat_coding")
    right = total = 0
    nll = 0.0
    model.eval()
    with tempfile.TemporaryDirectory(prefix="arft-teacher-") as scratch, \
            open_tools(cfg.sandbox, code=True) as tools:
        rows = step_rows(load_manifest(folder, "test"), "coding", folder, tools, agent, transcript, Path(scratch),
                         tool_threads=cfg.sandbox.workers)
        for row in rows:
            prompt = transcript.encode(row["prompt"], [Path(p) for p in row["images"]])
            target = transcript.tokens(row["solution"])
            images = [transcript.open_image(Path(p)) for p in row["images"]]
            inputs = engine.model_inputs([prompt + target], [images], model.device)
            with torch.no_grad():
                logits = model(**inputs).logits[0, len(prompt) - 1:-1].float()
            labels = torch.tensor(target, device=logits.device)
            right += int((logits.argmax(-1) == labels).sum())
            total += len(target)
            nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    return {"n": len(rows), "token_accuracy": round(100 * right / max(total, 1), 2),
            "nll": round(nll / max(total, 1), 4)}


def generation_eval(cfg: Config) -> EvalConfig:
    """`eval` as generation uses it: under agent.protocol paper the decoding is the checkpoint's
    generation_config, whatever eval.decoding says (the authors' harness passed no sampling arguments)."""
    return cfg.eval.model_copy(update={"decoding": "checkpoint"}) if cfg.agent.protocol == "paper" else cfg.eval


def eval_engine(model_dir: Path, cfg: Config, progress: Callable[[int], None] = lambda _: None):
    """The evaluation's model back-end on `model_dir`: rollout's engine, eval's decoding, the protocol's stop strings
    (none under `paper`), the processor's pixel budget from model.min_pixels / max_pixels whatever the
    checkpoint's own."""
    from arft_core.agent.generation import make_engine
    from arft_core.protocol import stop_sequences

    return make_engine(model_dir, generation_eval(cfg), cfg.rollout, cfg.model.dtype, progress,
                          stop_sequences=stop_sequences(cfg.agent.protocol), min_pixels=cfg.model.min_pixels,
                          max_pixels=cfg.model.max_pixels)


def generation_settings(engine, cfg: Config) -> dict[str, Any]:
    """What the back-end generated with, flat (MLflow params of the evaluation): the resolved decoding (under
    `eval.decoding: checkpoint`, the checkpoint's values), max new tokens per benchmark, stop strings, the engine, and
    the processor's pixel bounds (HF back-end)."""
    out: dict[str, Any] = {"generation.source": generation_eval(cfg).decoding,
                           "generation.engine": "vllm" if hasattr(engine, "llm") else "hf"}
    out.update({f"generation.{k}": v for k, v in (getattr(engine, "decoding", None) or {}).items()})
    out.update({f"generation.max_new_tokens.{b}": n for b, n in cfg.eval.max_new_tokens.items()})
    if hasattr(engine, "stop_sequences"):
        out["generation.stop_sequences"] = " ".join(engine.stop_sequences) or "none"
    if getattr(engine, "processor", None) is not None:
        from arft_core.model.processor import pixel_budget

        out["generation.min_pixels"], out["generation.max_pixels"] = pixel_budget(engine.processor)
    return out


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
