"""The evaluate stage, ad-hoc evaluations (another model folder or registered version, benchmarks, modes, outputs)
and the checkpoint sweep."""

from __future__ import annotations

from pathlib import Path

from arft_core.config import Config
from arft_core.io import write_json_atomic, write_text_atomic
from arft_core.progress import progress_bar


STEP_TAG, PHASE_TAG = "arft.step", "arft.phase"  # a LoggedModel's training step; sft, grpo or final
SHOWN = (".f1", "token_accuracy")  # the columns printed and plotted per step (percentages)
COMPARED = ("f1", "em", "no_answer_rate", "valid_action_rate")  # the Avg metrics linked to each LoggedModel
MODELS_FILE = "models.json"  # in paths.checkpoint_eval: the LoggedModel of each evaluated model


def evaluate_stage(cfg: Config) -> dict:
    """Evaluate the trained policy on MAT-Coding, MAT-Search and multi-hop QA, with tools (agent) and without
    (direct); F1/EM (multi-hop: per dataset, `multihop.<mode>.<dataset>.f1`), predictions and an HTML report. Each
    evaluated model is an MLflow LoggedModel of the train run (the agent, loadable and servable) with its metrics
    linked to it and each item's trajectory as a trace; with eval.checkpoints all, every saved checkpoint too."""
    import mlflow

    from arft_core.evaluation import (eval_fingerprint, eval_engine, evaluate, generation_settings, load_benchmark,
                                      teacher_forced)

    # The evaluation's searches go through their own cache (an output of this stage), so that the frozen answers
    # of one evaluation can be replayed and the search_data stage's cache is never modified behind DVC's back.
    cfg = cfg.model_copy(update={"search": eval_search(cfg)})
    plan = {b: load_benchmark(b, cfg) for b in cfg.eval.benchmarks}
    fingerprint = eval_fingerprint(cfg, plan)
    mlflow.set_tag("eval.fingerprint", fingerprint)
    record = training_record(cfg)
    saved = [{**m, "run_id": record.get("run_id")} for m in record.get("models", [])]  # each a model of that run
    final = saved[-1] if saved and cfg.path("trained_model") == (cfg.root / saved[-1]["folder"]).resolve() else None
    total = sum(map(len, plan.values())) * len(cfg.eval.modes)
    with progress_bar(f"evaluating {', '.join(cfg.eval.benchmarks)} ({', '.join(cfg.eval.modes)})", total) as advance:
        engine = eval_engine(cfg.path("trained_model"), cfg)
        # Logged before generating: under `eval.decoding: checkpoint` the values come from the model folder.
        mlflow.log_params(generation_settings(engine, cfg))
        model_id = new_logged_model(cfg, final) if final else None
        scores, predictions, report = evaluate(cfg.path("trained_model"), cfg, advance, engine=engine,
                                               plan=plan, tracer=_tracer(model_id))
        teacher = teacher_forced(engine, cfg) if "mat-coding" in plan else None
    out = cfg.path("predictions")
    for name, rows in predictions.items():
        write_json_atomic(out / f"{name}.json", rows)
    write_json_atomic(cfg.path("eval_metrics"), scores)
    write_text_atomic(cfg.path("eval_report"), report)
    flat = flat_scores(scores)
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
    if teacher:
        print(f"mat-coding teacher-forced: token accuracy {teacher['token_accuracy']:.2f}%  NLL {teacher['nll']:.3f}  "
              f"(n={teacher['n']} held-out teacher steps)")
    print(f"report: {cfg.path('eval_report')}")
    # The final model is one of them when another model was evaluated above (`arft eval --model`).
    checkpoints = [m for m in saved if m is not final] if cfg.eval.checkpoints == "all" else []
    if cfg.eval.checkpoints == "all" and not checkpoints:
        print("eval.checkpoints all: no checkpoints saved (train.save_steps, train.sft.save_steps)")
    logged: list[dict] = []  # {step, phase, model_id} of each LoggedModel, for the register stage
    rows = evaluate_checkpoints(cfg, plan, checkpoints, logged) if checkpoints else []
    # Last, at the largest step: the run's latest value of each metric is the final model's.
    if final:
        record_model(cfg, plan, final, model_id, scores, teacher, logged, rows)
    else:  # another model than the training's (`arft eval --model`): its metrics in the run only
        log_linked_metrics(scores, plan, cfg, None, None, teacher)
    write_text_atomic(cfg.path("checkpoint_eval") / "checkpoints.csv", _csv(rows))  # the DVC plot file, always
    write_json_atomic(cfg.path("checkpoint_eval") / MODELS_FILE, logged)
    if len(rows) > 1:
        print(f"metrics vs step: {_plot_f1(rows, cfg.path('checkpoint_eval') / 'f1_vs_step.png')}")
        mlflow.log_artifacts(str(cfg.path("checkpoint_eval")), artifact_path="checkpoints")
    return {k: v for k, v in flat.items() if k.endswith(".avg.f1") or k.endswith(".avg.em")}


def evaluated_model(cfg: Config) -> dict:
    """The final model's LoggedModel as the evaluate stage scored it ({step, phase, model_id})."""
    import json

    path = cfg.path("checkpoint_eval") / MODELS_FILE
    found = [m for m in json.loads(path.read_text()) if m["phase"] == "final"] if path.is_file() else []
    if not found:
        raise FileNotFoundError(f"{path}: no evaluated final model (run the evaluate stage first)")
    return found[0]


def training_record(cfg: Config) -> dict:
    """train.json of the last training: its MLflow run (`run_id`) and the models it saved (`models`: {step, phase,
    folder}, the final one last); empty when there is none (a model evaluated without this project's training)."""
    import json

    path = cfg.path("train_metrics")
    return json.loads(path.read_text()) if path.is_file() else {}


def new_logged_model(cfg: Config, model: dict) -> str:
    """A LoggedModel for one saved model, created before it is evaluated (its traces link to it): named
    `checkpoint-<step>`, a model of the train run, with the train settings as params and its step and phase as
    tags. The agent's files are logged into it once its evaluation is done (`log_agent_model`)."""
    import mlflow

    from arft_core.tracking import flatten

    params = flatten(cfg.model_dump(mode="json")["train"], "train.")
    logged = mlflow.initialize_logged_model(name=f"checkpoint-{model['step']}", source_run_id=model["run_id"],
                                            params=params, tags={STEP_TAG: str(model["step"]),
                                                                 PHASE_TAG: model["phase"]})
    return logged.model_id


def record_model(cfg: Config, plan: dict, model: dict, model_id: str, scores: dict, teacher: dict | None,
                 logged: list[dict], rows: list[dict]) -> None:
    """After a saved model's evaluation: its metrics linked to its LoggedModel at its step, the agent logged into
    it, and its entries in models.json (`logged`) and checkpoints.csv (`rows`)."""
    log_linked_metrics(scores, plan, cfg, model["step"], model_id, teacher)
    log_agent_model(cfg, model, model_id)
    logged.append({"step": model["step"], "phase": model["phase"], "model_id": model_id})
    rows.append({"step": model["step"], **_csv_row(flat_scores(scores), teacher)})


def log_agent_model(cfg: Config, model: dict, model_id: str) -> None:
    """The agent (weights, the settings it was evaluated with, the evaluation's search cache) into its LoggedModel,
    which is then ready to register, load and serve."""
    from arft_core.registry import log_agent

    # An output of the train run, so MLflow links the train run's metrics at this step (its loss, reward) to it.
    log_agent(cfg.root / model["folder"], cfg, step=model["step"], model_id=model_id, run_id=model["run_id"])


def benchmark_dataset(name: str, items: list):
    """A benchmark's test items as an MLflow dataset (id, question, answers, split), what metrics link to."""
    import mlflow
    import pandas as pd

    frame = pd.DataFrame([{"id": str(b.env.id), "question": b.env.question, "answers": " | ".join(b.env.answers),
                           "split": b.split or ""} for b in items])
    return mlflow.data.from_pandas(frame, name=f"{name}-test")


def log_linked_metrics(scores: dict, plan: dict, cfg: Config, step: int | None, model_id: str | None,
                       teacher: dict | None = None) -> None:
    """Every metric in the active run at `step`; with `model_id`, the comparison's (each benchmark and mode's Avg
    F1, EM, no-answer and valid-action rates, the teacher-forced scores) also linked to that LoggedModel and to
    the benchmark's dataset: the Models tab shows them side by side. `teacher`: the teacher-forced scores."""
    import mlflow

    for bench, modes in scores.items():
        # The teacher-forced scores first: the Models tab orders its columns as the metrics come.
        flat = {**(teacher_metrics(teacher) if bench == "mat-coding" else {}), **flat_scores({bench: modes})}
        linked = {k: v for k, v in flat.items() if model_id and (k.split(".")[1] == "teacher_forced" or (
            k.split(".")[2] == "avg" and k.split(".")[-1] in COMPARED))}
        if linked:
            mlflow.log_metrics(linked, step=step, model_id=model_id, dataset=benchmark_dataset(bench, plan[bench]))
        mlflow.log_metrics({k: v for k, v in flat.items() if k not in linked}, step=step)


def teacher_metrics(teacher: dict | None) -> dict[str, float]:
    """`evaluation.teacher_forced`'s scores as metrics: `mat-coding.teacher_forced.<token_accuracy|nll>`."""
    return {f"mat-coding.teacher_forced.{k}": float(teacher[k]) for k in ("token_accuracy", "nll")} if teacher else {}


def _tracer(model_id: str | None):
    """The evaluation's trace hook: every item's trajectory as an MLflow trace of the active run (and model)."""
    import mlflow

    from arft_core.traces import log_eval_traces

    run = mlflow.active_run()

    def trace(bench, mode, items, preds):
        log_eval_traces(items, preds, bench, mode, model_id=model_id, run_id=run.info.run_id if run else None)

    return trace


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
    """Download a registered version (`models:/<name>@<alias>` or `models:/<name>/<version>`), check every file
    against the manifest logged with it (integrity.IntegrityError names a changed one) and return the model folder
    inside its pyfunc (what `evaluate` loads)."""
    import atexit
    import shutil
    import tempfile

    from arft_core.integrity import download_verified

    # A private copy for this process (evaluations and re-scorings read it until they end), removed at its exit.
    scratch = tempfile.mkdtemp(prefix="arft-model-")
    atexit.register(shutil.rmtree, scratch, True)
    folder = download_verified(uri, Path(scratch))
    found = [p.parent for p in folder.rglob("config.json") if any(p.parent.glob("*.safetensors"))]
    if not found:
        raise FileNotFoundError(f"{uri}: no model weights in the registered artifacts")
    return found[0]


def evaluate_checkpoints(cfg: Config, plan: dict, checkpoints: list[dict], logged: list[dict]) -> list[dict]:
    """Every saved training checkpoint ({step, phase, folder}) on the same evaluation: each a LoggedModel with its
    metrics (at its step) and traces linked to it; returns the CSV rows (step, then Avg F1/EM per benchmark and
    mode)."""
    from arft_core.evaluation import eval_engine, evaluate, teacher_forced

    rows = []
    for model in checkpoints:
        model_id = new_logged_model(cfg, model)
        folder = cfg.root / model["folder"]
        with progress_bar(f"{model['phase']} checkpoint of step {model['step']}",
                          sum(map(len, plan.values())) * len(cfg.eval.modes)) as advance:
            engine = eval_engine(folder, cfg)
            scores, _, _ = evaluate(folder, cfg, advance, engine=engine, plan=plan, tracer=_tracer(model_id))
            teacher = teacher_forced(engine, cfg) if "mat-coding" in plan else None
        record_model(cfg, plan, model, model_id, scores, teacher, logged, rows)
        print(f"step {model['step']} ({model['phase']}): " + "  ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                                                       if k.endswith(SHOWN)))
    return rows


def _csv_row(flat: dict[str, float], teacher: dict | None = None) -> dict[str, float]:
    """checkpoints.csv's columns: Avg F1/EM and valid-action rate per benchmark and mode, teacher-forced scores."""
    return {**{k.replace(".avg", ""): v for k, v in flat.items()
               if k.endswith((".avg.f1", ".avg.em", ".avg.valid_action_rate"))}, **teacher_metrics(teacher)}


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
    for column in [c for c in rows[0] if c.endswith(SHOWN)]:
        ax.plot(steps, [r[column] for r in rows], marker="o", label=column)
    ax.set(xlabel="training step", ylabel="%", title="MAT F1 and held-out teacher-step token accuracy per model")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
