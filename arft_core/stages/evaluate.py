"""The evaluate stage, ad-hoc evaluations (another model folder or registered version, benchmarks, modes, outputs)
and the checkpoint sweep."""

from __future__ import annotations

from pathlib import Path

from arft_core.config import Config
from arft_core.io import write_json_atomic, write_text_atomic
from arft_core.progress import progress_bar


def evaluate_stage(cfg: Config) -> dict:
    """Evaluate the trained policy on MAT-Coding, MAT-Search and multi-hop QA, with tools (agent) and without
    (direct); F1/EM (multi-hop: per dataset, `multihop.<mode>.<dataset>.f1`), predictions and an HTML report."""
    import mlflow

    from arft_core.evaluation import eval_fingerprint, eval_generator, evaluate, generation_settings, load_benchmark

    # The evaluation's searches go through their own cache (an output of this stage), so that the frozen answers
    # of one evaluation can be replayed and the search_data stage's cache is never modified behind DVC's back.
    cfg = cfg.model_copy(update={"search": eval_search(cfg)})
    plan = {b: load_benchmark(b, cfg) for b in cfg.eval.benchmarks}
    total = sum(map(len, plan.values())) * len(cfg.eval.modes)
    with progress_bar(f"evaluating {', '.join(cfg.eval.benchmarks)} ({', '.join(cfg.eval.modes)})", total) as advance:
        generator = eval_generator(cfg.path("trained_model"), cfg)
        # Logged before generating: under `eval.decoding: checkpoint` the values come from the model folder.
        mlflow.log_params(generation_settings(generator, cfg))
        scores, predictions, report = evaluate(cfg.path("trained_model"), cfg, advance, generator=generator,
                                               plan=plan)
    out = cfg.path("predictions")
    for name, rows in predictions.items():
        write_json_atomic(out / f"{name}.json", rows)
    write_json_atomic(cfg.path("eval_metrics"), scores)
    write_text_atomic(cfg.path("eval_report"), report)
    flat = flat_scores(scores)
    mlflow.log_metrics(flat)
    fingerprint = eval_fingerprint(cfg, plan)
    mlflow.set_tag("eval.fingerprint", fingerprint)
    mlflow.log_artifact(str(cfg.path("eval_report")))
    mlflow.log_artifacts(str(out), artifact_path="predictions")
    for bench, modes in scores.items():
        for mode, s in modes.items():
            # multi-hop: its avg (the datasets' mean), then each dataset
            shown = ["avg"] + ([k for k in s if k != "avg" and isinstance(s[k], dict) and "f1" in s[k]]
                               if bench == "multihop" else [])
            for row in shown:
                label = bench if row == "avg" else f"  {row}"
                print(f"{label:<11} {mode:<7} F1 {s[row]['f1']:6.2f}  EM {s[row]['em']:6.2f}  "
                      f"no answer {s[row]['no_answer_rate']:6.2f}%  (n={s[row]['n']})")
    print(f"report: {cfg.path('eval_report')}")
    rows = evaluate_checkpoints(cfg, plan, fingerprint) if cfg.eval.checkpoints == "all" else []
    if not rows:  # the DVC plot file exists either way
        write_text_atomic(cfg.path("checkpoint_eval") / "checkpoints.csv", _csv([]))
    return {k: v for k, v in flat.items() if k.endswith(".avg.f1") or k.endswith(".avg.em")}


def eval_search(cfg: Config, mode: str | None = None, cache_path: str | None = None):
    """The search settings of an evaluation: its own cache (`paths.eval_search_cache` unless `cache_path`),
    optionally another mode."""
    return cfg.search.model_copy(update={"cache_path": cache_path or cfg.paths.eval_search_cache,
                                         "mode": mode or cfg.search.mode})


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
    return Config.from_dict(data, root=cfg.root, source=cfg.source)  # the params file, with these overrides on top


def shown_settings(cfg: Config, model_dir: Path | None = None) -> dict:
    """What an evaluation would run with (`arft eval --show-config`): eval, agent (transcript resolved for
    train.mode), the model's dtype and pixel budget, and `generation`: the decoding values actually used, under
    `decoding: checkpoint` read from the model folder's generation_config.json (`model_dir`, else the trained
    model, else the base model), with the protocol's stop strings."""
    from arft_core.agent.generation import folder_generation_config, resolve_decoding
    from arft_core.evaluation import generation_eval
    from arft_core.model.embedded import REFERENCE_FILE
    from arft_core.protocol import stop_sequences

    decoding = generation_eval(cfg)
    generation: dict = {"source": decoding.decoding}
    if decoding.decoding == "checkpoint":
        folders = [model_dir] if model_dir else [cfg.path("trained_model"), cfg.path("base_model")]
        found = next((f for f in folders if (f / "config.json").is_file() or (f / REFERENCE_FILE).is_file()), None)
        if found is None:
            generation["values"] = "from the model folder's generation_config.json (no model yet: run `arft model`)"
        else:
            generation["folder"] = str(found)
            generation["values"] = resolve_decoding(decoding, folder_generation_config(found))
    else:
        generation["values"] = resolve_decoding(decoding)
    generation["stop_sequences"] = list(stop_sequences(cfg.agent.protocol))
    return {"eval": cfg.eval.model_dump(mode="json"),
            "agent": cfg.agent.for_training_mode(cfg.train.mode).model_dump(mode="json"),
            "model": cfg.model.model_dump(mode="json", include={"dtype", "min_pixels", "max_pixels"}),
            "generation": generation}


def registered_model_dir(uri: str) -> Path:
    """Download a registered version (`models:/<name>@<alias>` or `models:/<name>/<version>`) and return the model
    folder inside its pyfunc (what `evaluate` loads)."""
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(uri))
    found = [p.parent for p in folder.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not found:
        raise FileNotFoundError(f"{uri}: no model weights in the registered artifacts")
    return found[0]


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
        flat = flat_scores(scores)
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


def flat_scores(scores: dict) -> dict[str, float]:
    """eval.json as MLflow metrics: `<bench>.<mode>.<split>.<metric>`; multi-hop's splits are its datasets
    (`multihop.agent.hotpotqa.f1`) and its avg their mean."""
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
