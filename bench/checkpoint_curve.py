"""The checkpoint comparison of the last pipeline run, read back from MLflow the way a user would: the LoggedModels of
the latest train run (`mlflow.search_logged_models`), each with the evaluation metrics linked to it at its step.

    python bench/checkpoint_curve.py [--params params.yaml] [--metric mat-coding.agent.avg.valid_action_rate ...]

Prints a markdown table (step, phase, one column per metric; paste into docs/benchmarks.md), whether each metric
rises from the first checkpoint to the last, and one JSON line.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_METRICS = ["mat-coding.agent.avg.valid_action_rate", "mat-search.agent.avg.valid_action_rate",
                   "multihop.agent.avg.valid_action_rate", "mat-coding.agent.avg.no_answer_rate",
                   "mat-coding.agent.avg.f1", "mat-search.agent.avg.f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, help="params file (default: the project's params.yaml)")
    parser.add_argument("--metric", action="append", help="linked metric to show (repeatable)")
    args = parser.parse_args()

    import mlflow

    from arft_core.config import load_config
    from arft_core.stages.evaluate import STEP_TAG, training_record
    from arft_core.tracking import configure

    cfg = load_config(args.params)
    configure(cfg)
    run_id = training_record(cfg).get("run_id")
    if not run_id:
        raise SystemExit(f"{cfg.path('train_metrics')}: no train run recorded (run the pipeline first)")
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    models = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    models.sort(key=lambda m: int(m.tags[STEP_TAG]))
    metrics = args.metric or DEFAULT_METRICS
    rows = []
    for m in models:
        linked = {x.key: x.value for x in m.metrics if x.key in metrics}
        rows.append({"step": int(m.tags[STEP_TAG]), "phase": m.tags.get("arft.phase"), "model_id": m.model_id,
                     **{k: linked.get(k) for k in metrics}})
    print("| step | phase | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 2) + "|")
    for r in rows:
        print(f"| {r['step']} | {r['phase']} | " + " | ".join("" if r[k] is None else f"{r[k]:g}" for k in metrics)
              + " |")
    rises = {k: rows[-1][k] > rows[0][k] for k in metrics
             if len(rows) > 1 and rows[0][k] is not None and rows[-1][k] is not None}
    print("rises from the first checkpoint to the last: " + ", ".join(k for k, v in rises.items() if v) or "none")
    print(json.dumps({"train_run": run_id, "models": rows, "rises": rises}))


if __name__ == "__main__":
    main()
