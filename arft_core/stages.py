"""The pipeline's stages: one function each, shared by the CLI (`arft <stage>`), the Prefect flows and dvc.yaml.

`run_stage` wraps a stage in its MLflow run and logs what it returns; each stage reads and writes only the paths
of `params.yaml`, and writes its outputs whole (a failed stage leaves no half-written output behind as valid).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from arft_core.config import Config
from arft_core.data.mat_coding import MANIFESTS, load_manifest, write_json_atomic, write_text_atomic
from arft_core.progress import progress_bar


def model_stage(cfg: Config) -> dict:
    from arft_core.model.embedded import prepare_base_model

    return prepare_base_model(cfg.model, cfg.path("base_model"))


def data_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.data.contact_sheet import contact_sheet
    from arft_core.data.mat_coding import generate

    with progress_bar("generating MAT-Coding items", cfg.data.n_train + cfg.data.n_test) as advance:
        report = generate(cfg.data, cfg.path("mat_coding"), cfg.root, cfg.sandbox, advance)
    write_json_atomic(cfg.path("data_report"), report)
    data_dir = cfg.path("mat_coding")
    sheet = contact_sheet(load_manifest(data_dir, "train") + load_manifest(data_dir, "test"), data_dir,
                          cfg.path("contact_sheet"))
    for artifact in (cfg.path("data_report"), sheet):
        mlflow.log_artifact(str(artifact))
    print(f"{sum(m['n'] for m in report['manifests'].values())} items from {report['candidates']} candidates "
          f"(reject rate {report['reject_rate']:.1%}), {report['items_per_second']} items/s; "
          f"contact sheet: {sheet}")
    return {"items": sum(m["n"] for m in report["manifests"].values()), "candidates": report["candidates"],
            "reject_rate": report["reject_rate"], "items_per_second": report["items_per_second"]}


def search_index_stage(cfg: Config) -> dict:
    import time

    from arft_core.search.local import build_index, build_wiki_corpus

    started = time.perf_counter()
    corpus = cfg.path("search_corpus")  # the stage's output: the corpus the index was built from
    if cfg.search.corpus_path:
        corpus.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cfg.root / cfg.search.corpus_path, corpus)
        n_docs = None
    else:
        n_docs = build_wiki_corpus(corpus)
    build_index(corpus, cfg.root / cfg.search.index_dir)
    seconds = round(time.perf_counter() - started, 2)
    print(f"indexed {corpus} into {cfg.root / cfg.search.index_dir} in {seconds} s")
    return {"documents": n_docs or sum(1 for _ in corpus.open()), "seconds": seconds}


def open_search(cfg: Config):
    """The configured backend behind its cache (`search.cache_path`, `search.mode`): how stages search."""
    from arft_core.search import make_backend

    return make_backend(cfg.search, cfg.root)


IMPORT_RECORD = "import.json"


def annotation_changes(cfg: Config) -> list[str]:
    """'new annotations' when the MAT-Search export differs from the one the last import read (the export is a
    user's file outside DVC's graph, so `dvc status` cannot see it); empty for the embedded sample."""
    from arft_core.tracking import content_hash

    if cfg.search_data.export is None:
        return []
    export = cfg.root / cfg.search_data.export
    record = cfg.path("mat_search") / IMPORT_RECORD
    last = json.loads(record.read_text()) if record.is_file() else {}
    now = content_hash(export)
    return [] if last.get("md5") == now else [f"new MAT-Search annotations in {export} (md5 {last.get('md5')} -> {now})"]


def search_data_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.data.search_import import import_search
    from arft_core.data.search_steps import search_step_samples
    from arft_core.tracking import content_hash

    d = cfg.search_data
    if d.export is None:
        from arft_core.data.search_sample import write_sample

        export = write_sample(cfg.path("search_sample"), "jsonl")
        image_dir = export.parent
    else:
        export = cfg.root / d.export
        image_dir = cfg.root / (d.image_dir or Path(d.export).parent)
    out = cfg.path("mat_search")
    previous = load_manifest(out, "all") if (out / "all.json").is_file() else None
    result = import_search(export, image_dir, out, d.format, d.fields or None, previous, d.test_fraction,
                           cfg.validation)
    result.write_quarantine(out / "quarantine.json")
    for q in result.quarantined:
        print(f"quarantined: {q['reason']}")
    write_json_atomic(out / "all.json", result.items)
    for part in ("train", "test"):
        write_json_atomic(out / f"{part}.json", [i for i in result.items if i.get("partition") == part])
    search = open_search(cfg)
    train = [i for i in result.items if i.get("partition") == "train"]
    with progress_bar("search step samples", len(train)) as advance:
        steps = []
        for item in train:
            steps += search_step_samples(item, search, cfg.search.top_k)
            advance(1)
    write_json_atomic(out / "train_steps.json", steps)
    # What this import read: a retraining run compares it with the export now there (new annotations).
    write_json_atomic(out / IMPORT_RECORD, {"export": str(export), "md5": content_hash(export)})
    mlflow.log_artifact(str(out / "quarantine.json"))
    return {"items": len(result.items), "quarantined": len(result.quarantined), "step_samples": len(steps),
            "cache_hits": search.stats.hits, "backend_calls": search.stats.backend_calls}


def validate_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.validation import (ValidationFailed, format_report, merge_reports, new_context,
                                      validate_manifests)

    data_dir = cfg.path("mat_coding")
    expected = {m: {"n": n, "hard": round(n * cfg.data.hard_fraction) if cfg.data.hard else 0}
                for m, n in (("train", cfg.data.n_train), ("test", cfg.data.n_test))}
    docs = cfg.path("data_docs")
    context = new_context(docs)
    report = validate_manifests({m: load_manifest(data_dir, m) for m in MANIFESTS}, data_dir, cfg.validation,
                                expected, context=context)
    search_dir = cfg.path("mat_search")
    search = validate_manifests({m: load_manifest(search_dir, m) for m in MANIFESTS}, search_dir, cfg.validation,
                                kind="search", context=context)
    context.build_data_docs(site_names=["arft"])
    report = merge_reports({"coding": report, "search": search})
    report_path = cfg.path("validation_report")
    write_json_atomic(report_path, report)
    mlflow.log_artifact(str(report_path))
    mlflow.log_artifacts(str(docs), artifact_path="data_docs")
    text = format_report(report)
    if not report["success"]:
        raise ValidationFailed(f"{text}\nfull report: {report_path}")
    print(text)
    n_failed = sum(len(m["failures"]) for m in report["manifests"].values())
    n_quarantined = sum(len(q) for q in report["quarantined"].values())
    return {"items": sum(m["n_items"] for m in report["manifests"].values()), "failed_expectations": n_failed,
            "quarantined": n_quarantined}


def train_here(cfg: Config, sink: Callable[[dict, int], None]) -> dict:
    """Train in this process (one rank of a distributed launch, or the only one)."""
    from contextlib import ExitStack

    from arft_core.training import train

    data_dir = cfg.path("mat_coding" if cfg.train.task == "coding" else "mat_search")
    agentic = cfg.train.mode == "agentic"
    kwargs: dict = {"sink": sink, "checkpoint_dir": cfg.path("train_checkpoints")}
    with ExitStack() as stack:
        pool = None
        if cfg.train.task == "coding" and (agentic or cfg.train.reward_variant == "corrected"):
            # Code runs in the sandbox: the corrected code reward and the agent's <code> tool.
            from arft_core.sandbox import SandboxPool

            pool = stack.enter_context(SandboxPool(cfg.sandbox))
        if agentic:
            from arft_core.agent import Tools
            from arft_core.search import make_backend

            # Training searches use their own cache (an output of this stage), never the search_data stage's.
            search_cfg = cfg.search.model_copy(update={"cache_path": cfg.paths.train_search_cache})
            search = make_backend(search_cfg, cfg.root) if cfg.train.task == "search" else None
            kwargs.update(tools=Tools(sandbox=pool, search=search, top_k=cfg.search.top_k), agent_cfg=cfg.agent,
                          artifact_sink=_log_text_artifact)
        elif pool is not None:
            from arft_core.agent.env import code_runner

            kwargs["code_runner"] = code_runner(pool)
        return train(cfg.model, cfg.train, cfg.path("base_model"), data_dir, cfg.path("trained_model"),
                     cfg.path("train_log"), **kwargs)


def _log_text_artifact(name: str, text: str) -> None:
    import mlflow

    if mlflow.active_run():
        mlflow.log_text(text, name)


def launch_command(cfg: Config, machine_rank: int = 0) -> list[str]:
    """The launcher command of `train.launcher` for this node: `accelerate launch` with accelerate_config (DDP or
    DeepSpeed ZeRO on GPUs) or `torchrun` (plain DDP: NCCL on GPUs, gloo on CPU), single- or multi-node."""
    import sys

    t = cfg.train
    worker = ["-m", "arft_core.cli", "train-worker", "--params", str(cfg._source or cfg.root / "params.yaml")]
    multi = t.num_machines > 1
    if multi and not t.main_process_ip:
        raise ValueError("train.main_process_ip: required when train.num_machines > 1 (the rank-0 node's address)")
    if t.launcher == "accelerate":
        config_file = cfg.root / t.accelerate_config
        if not config_file.is_file():
            raise FileNotFoundError(f"train.accelerate_config: {config_file} does not exist")
        nodes = ["--num_machines", str(t.num_machines), "--machine_rank", str(machine_rank), "--main_process_ip",
                 t.main_process_ip, "--main_process_port", str(t.main_process_port)] if multi else []
        # accelerate counts processes over all nodes
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                "--num_processes", str(t.num_processes * t.num_machines), *nodes, *worker]
    nodes = (["--nnodes", str(t.num_machines), "--node_rank", str(machine_rank), "--master_addr",
              t.main_process_ip, "--master_port", str(t.main_process_port)] if multi else ["--standalone"])
    return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(t.num_processes),
            *worker]


def launch_distributed(cfg: Config, run_id: str | None) -> None:
    """Start this node's ranks of `arft train-worker` (see `launch_command`); global rank 0 logs to MLflow run
    `run_id` and writes the outputs. A multi-node launch reads this node's rank from ARFT_MACHINE_RANK."""
    import os
    import subprocess

    cmd = launch_command(cfg, int(os.environ.get("ARFT_MACHINE_RANK", "0")))
    env = {**os.environ, "ARFT_TRAIN_RUN_ID": run_id or ""}
    proc = subprocess.run(cmd, cwd=cfg.root, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}")


def train_worker(cfg: Config) -> dict:
    """One rank of a distributed launch: train; rank 0 logs metrics to the launching stage's MLflow run."""
    import os

    import mlflow
    from accelerate import PartialState

    from arft_core.tracking import log_metrics

    run_id = os.environ.get("ARFT_TRAIN_RUN_ID")
    if PartialState().is_main_process and run_id:
        mlflow.set_tracking_uri(cfg.tracking_uri())
        with mlflow.start_run(run_id=run_id):
            summary = train_here(cfg, lambda m, step: log_metrics(m, step=step))
    else:
        summary = train_here(cfg, lambda m, step: None)
    if PartialState().is_main_process:
        write_json_atomic(cfg.path("train_metrics"), summary)
    return summary


def train_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.tracking import log_metrics

    if cfg.train.launcher != "none":
        run = mlflow.active_run()
        launch_distributed(cfg, run.info.run_id if run else None)
        summary = json.loads(cfg.path("train_metrics").read_text())
    else:
        summary = train_here(cfg, lambda m, step: log_metrics(m, step=step))
        write_json_atomic(cfg.path("train_metrics"), summary)
    mlflow.log_artifact(str(cfg.path("train_log")))
    if cfg.train.save_steps:  # where the resumable checkpoints are (too large to copy into the tracking store)
        mlflow.set_tag("train.checkpoints", str(cfg.path("train_checkpoints")))
    return summary


def eval_search(cfg: Config, mode: str | None = None, cache_path: str | None = None):
    """The search settings of an evaluation: its own cache (`paths.eval_search_cache` unless `cache_path`),
    optionally another mode."""
    return cfg.search.model_copy(update={"cache_path": cache_path or cfg.paths.eval_search_cache,
                                         "mode": mode or cfg.search.mode})


def evaluate_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.evaluation import eval_fingerprint, evaluate, load_benchmark

    # The evaluation's searches go through their own cache (an output of this stage), so that the frozen answers
    # of one evaluation can be replayed and the search_data stage's cache is never modified behind DVC's back.
    cfg = cfg.model_copy(update={"search": eval_search(cfg)})
    plan = {b: load_benchmark(b, cfg) for b in cfg.eval.benchmarks}
    total = sum(map(len, plan.values())) * len(cfg.eval.modes)
    with progress_bar(f"evaluating {', '.join(cfg.eval.benchmarks)} ({', '.join(cfg.eval.modes)})", total) as advance:
        scores, predictions, report = evaluate(cfg.path("trained_model"), cfg, advance, plan=plan)
    out = cfg.path("predictions")
    for name, rows in predictions.items():
        write_json_atomic(out / f"{name}.json", rows)
    write_json_atomic(cfg.path("eval_metrics"), scores)
    write_text_atomic(cfg.path("eval_report"), report)
    flat = _flat_scores(scores)
    mlflow.log_metrics(flat)
    fingerprint = eval_fingerprint(cfg, plan)
    mlflow.set_tag("eval.fingerprint", fingerprint)
    mlflow.log_artifact(str(cfg.path("eval_report")))
    mlflow.log_artifacts(str(out), artifact_path="predictions")
    for bench, modes in scores.items():
        for mode, s in modes.items():
            print(f"{bench:<11} {mode:<7} F1 {s['avg']['f1']:6.2f}  EM {s['avg']['em']:6.2f}  "
                  f"no answer {s['avg']['no_answer_rate']:6.2f}%  (n={s['avg']['n']})")
    print(f"report: {cfg.path('eval_report')}")
    rows = evaluate_checkpoints(cfg, plan, fingerprint) if cfg.eval.checkpoints == "all" else []
    if not rows:  # the DVC plot file exists either way
        write_text_atomic(cfg.path("checkpoint_eval") / "checkpoints.csv", _csv([]))
    return {k: v for k, v in flat.items() if k.endswith(".avg.f1") or k.endswith(".avg.em")}


def eval_overrides(cfg: Config, model: str | None = None, benchmarks: list[str] | None = None,
                   modes: list[str] | None = None, out: str | None = None, checkpoints: str | None = None) -> Config:
    """The config for an ad-hoc evaluation: another model folder, a subset of benchmarks or modes, every training
    checkpoint too, and outputs under `out` (eval.json, eval_report.html, predictions/, checkpoints/) instead of the
    pipeline's own files."""
    data = cfg.model_dump()
    if model and model.startswith("models:/"):  # a registered version, e.g. models:/arft-agent@champion
        from arft_core.tracking import configure

        configure(cfg)
        model = str(registered_model_dir(model))
    if checkpoints:
        data["eval"]["checkpoints"] = checkpoints
    if model:
        data["paths"]["trained_model"] = str(Path(model).resolve())
    if benchmarks:
        data["eval"]["benchmarks"] = benchmarks
    if modes:
        data["eval"]["modes"] = modes
    if out:
        folder = Path(out).resolve()
        data["paths"].update(eval_metrics=str(folder / "eval.json"), eval_report=str(folder / "eval_report.html"),
                             predictions=str(folder / "predictions"), checkpoint_eval=str(folder / "checkpoints"))
    new = Config.model_validate(data)
    new._root = cfg.root
    return new


def score_tags(scores: dict) -> dict[str, str]:
    """eval.json's Simple/Hard/Avg F1 and EM as version tags: `eval.<bench>.<mode>.<split>.<f1|em>`."""
    return {f"eval.{k}": str(v) for k, v in _flat_scores(scores).items()
            if k.split(".")[2] in ("avg", "simple", "hard") and k.split(".")[3] in ("f1", "em")}


def register_stage(cfg: Config) -> dict:
    import mlflow

    from arft_core.evaluation import eval_fingerprint, load_benchmark
    from arft_core.registry import FINGERPRINT, register_model
    from arft_core.tracking import flatten, git_tags, input_hashes, locked_out_hashes

    scores = json.loads(cfg.path("eval_metrics").read_text())
    data_paths = {cfg.paths.mat_coding, cfg.paths.mat_search, cfg.paths.base_model}
    plan = {b: load_benchmark(b, cfg) for b in scores}
    # What a version is: its scores, the frozen evaluation they come from, the data (DVC hashes), code, config.
    tags = {**git_tags(cfg.root), **{f"dvc.input.{k}": v for k, v in input_hashes(cfg.root, "register").items()},
            **{f"dvc.data.{k}": v for k, v in locked_out_hashes(cfg.root).items() if k in data_paths},
            **{f"config.{k}": v[:5000]
               for k, v in flatten(cfg.model_dump(mode="json", include={"train", "model"})).items()},
            **score_tags(scores), FINGERPRINT: eval_fingerprint(cfg, plan)}
    result = register_model(cfg.path("trained_model"), cfg.tracking.registered_model, cfg.tracking.alias, tags)
    if cfg._source:
        mlflow.log_artifact(str(cfg._source))
    write_json_atomic(cfg.path("registration"), result)
    print(f"registered {result['name']} version {result['version']} as @{result['alias']}")
    return {"version": int(result["version"])}


def registered_model_dir(uri: str) -> Path:
    """Download a registered version (`models:/<name>@<alias>` or `models:/<name>/<version>`) and return the model
    folder inside its pyfunc (what `evaluate` loads)."""
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(uri))
    found = [p.parent for p in folder.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not found:
        raise FileNotFoundError(f"{uri}: no model weights in the registered artifacts")
    return found[0]


def _rescore_version(cfg: Config, version) -> dict[str, str]:
    """Evaluate a registered version again on this evaluation (the promotion metrics' benchmarks and modes). Its
    searches go through the promotion's own cache, a fresh copy of the evaluation's frozen one (replay for web
    back-ends: no new paid calls), so the evaluate stage's output is never modified (`dvc status` stays clean)."""

    from arft_core.evaluation import evaluate, load_benchmark

    wanted = [m.split(".") for m in cfg.tracking.promotion_metrics]
    benchmarks = sorted({w[1] for w in wanted})
    modes = sorted({w[2] for w in wanted})
    mode = "record" if cfg.search.backend == "local" else "replay"
    scope = cfg.eval.model_copy(update={"benchmarks": benchmarks, "modes": modes})
    own = str(cfg.path("promotion_search_cache"))
    sub = cfg.model_copy(update={"search": eval_search(cfg, mode, own), "eval": scope})
    model_dir = registered_model_dir(f"models:/{version.name}/{version.version}")
    plan = {b: load_benchmark(b, sub) for b in benchmarks}
    print(f"re-scoring champion version {version.version} on this evaluation ({', '.join(benchmarks)})")
    scores, _, _ = evaluate(model_dir, sub, plan=plan)
    return score_tags(scores)


def promote_stage(cfg: Config) -> dict:
    """The promotion gate: the new candidate takes the champion alias only when it scores better by the margin."""
    import mlflow

    from arft_core.registry import promote

    t = cfg.tracking
    # The stage's own output, made fresh each time from the evaluation's frozen cache (an empty one without it).
    frozen, own = cfg.path("eval_search_cache"), cfg.path("promotion_search_cache")
    tmp = own.with_name(own.name + ".tmp")
    own.parent.mkdir(parents=True, exist_ok=True)
    if frozen.is_file():
        shutil.copyfile(frozen, tmp)
    else:
        tmp.write_bytes(b"")
    os.replace(tmp, own)
    decision = promote(t.registered_model, t.promotion_metrics, t.promotion_margin, t.alias, t.champion_alias,
                       rescore=lambda version: _rescore_version(cfg, version))
    write_json_atomic(cfg.path("promotion"), decision)
    mlflow.set_tags({f"promotion.{k}": str(decision[k]) for k in ("promoted", "reason", "candidate_version",
                                                                  "champion_version", "champion_now")})
    mlflow.log_dict(decision, "promotion.json")
    verb = "promoted" if decision["promoted"] else "kept"
    print(f"{verb}: @{t.champion_alias} -> version {decision['champion_now']} ({decision['reason']})")
    return {k: float(decision[k]) for k in ("candidate_score", "champion_score", "promoted")
            if decision[k] is not None}


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` under `folder`, by step."""
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found)


def evaluate_checkpoints(cfg: Config, plan: dict, fingerprint: str) -> list[dict]:
    """Every saved training checkpoint on the same evaluation: one nested MLflow run per checkpoint (metrics under
    the evaluate stage's names, logged at the checkpoint's step), a CSV for DVC plots and an F1-vs-step PNG."""
    import mlflow

    from arft_core.evaluation import evaluate
    from arft_core.registry import FINGERPRINT

    found = checkpoint_steps(cfg.path("train_checkpoints"))
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folders in {cfg.path('train_checkpoints')}: train with "
                                "train.save_steps > 0 to keep checkpoints")
    rows = []
    for step, folder in found:
        with progress_bar(f"checkpoint-{step}", sum(map(len, plan.values())) * len(cfg.eval.modes)) as advance:
            scores, _, _ = evaluate(folder, cfg, advance, plan=plan)
        flat = _flat_scores(scores)
        with mlflow.start_run(run_name=f"checkpoint-{step}", nested=True,
                              tags={"arft.stage": "checkpoint-eval", "arft.checkpoint.step": str(step),
                                    FINGERPRINT: fingerprint}):
            mlflow.log_param("checkpoint.step", step)
            mlflow.log_param("checkpoint.path", str(folder))
            mlflow.log_metrics(flat, step=step)
        mlflow.log_metrics({f"checkpoint.{k}": v for k, v in flat.items()}, step=step)  # the stage run's chart
        rows.append({"step": step, **{k.replace(".avg", ""): v for k, v in flat.items()
                                      if k.endswith((".avg.f1", ".avg.em"))}})
    out = cfg.path("checkpoint_eval")
    write_text_atomic(out / "checkpoints.csv", _csv(rows))
    plot = _plot_f1(rows, out / "f1_vs_step.png")
    mlflow.log_artifacts(str(out), artifact_path="checkpoints")
    for row in rows:
        print("checkpoint-{step}: ".format(**row) + "  ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                             if k.endswith(".f1")))
    print(f"F1 vs step: {plot}")
    return rows


def _flat_scores(scores: dict) -> dict[str, float]:
    """eval.json as MLflow metrics: `<bench>.<mode>.<split>.<metric>`."""
    return {f"{bench}.{mode}.{split}.{m}": float(v) for bench, modes in scores.items() for mode, s in modes.items()
            for split, d in s.items() if isinstance(d, dict) and "f1" in d
            for m, v in d.items() if isinstance(v, (int, float))}


def _csv(rows: list[dict]) -> str:
    columns = list(rows[0]) if rows else ["step"]
    return "\n".join([",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]) + "\n"


def _plot_f1(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for column in [c for c in rows[0] if c.endswith(".f1")]:
        ax.plot(steps, [r[column] for r in rows], marker="o", label=column.removesuffix(".f1"))
    ax.set(xlabel="training step", ylabel="F1 (%)", title="MAT F1 per checkpoint")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


STAGES: dict[str, Callable[[Config], dict]] = {
    "model": model_stage,
    "data": data_stage,
    "search_index": search_index_stage,
    "search_data": search_data_stage,
    "validate": validate_stage,
    "train": train_stage,
    "evaluate": evaluate_stage,
    "register": register_stage,
    "promote": promote_stage,
}

# The params sections each stage reads (logged as the stage run's params; dvc.yaml tracks the same sections).
SECTIONS: dict[str, list[str]] = {
    "model": ["model"],
    "data": ["data"],
    "search_index": ["search"],
    "search_data": ["search_data", "search"],
    "validate": ["validation"],
    "train": ["train", "model", "agent"],
    "evaluate": ["eval", "agent", "search"],
    "register": ["tracking"],
    "promote": ["tracking"],
}


def run_stage(name: str, cfg: Config) -> dict:
    """Run one stage inside its MLflow run; returns the stage's summary (also logged as metrics)."""
    from arft_core.tracking import log_metrics, stage_run

    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    with stage_run(cfg, name, SECTIONS[name]):
        summary = STAGES[name](cfg)
        log_metrics(summary)
    return summary
