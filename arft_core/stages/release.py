"""The release stages: register the trained model in MLflow, and the promotion gate (re-scoring the champion on
this evaluation when it was scored on another one)."""

from __future__ import annotations

import json
import os
import shutil

from arft_core.config import Config
from arft_core.io import write_json_atomic
from arft_core.stages.evaluate import eval_search, flat_scores, registered_model_dir


def register_stage(cfg: Config) -> dict:
    """Register the trained model in MLflow with its scores, evaluation fingerprint, data hashes, config and commit
    as tags, and set the candidate alias."""
    import mlflow

    from arft_core.evaluation import eval_fingerprint, load_benchmark
    from arft_core.registry import FINGERPRINT, register_model
    from arft_core.tracking import content_hash, flatten, git_tags, input_hashes, locked_out_hashes

    scores = json.loads(cfg.path("eval_metrics").read_text())
    data_paths = {cfg.paths.mat_coding, cfg.paths.mat_search, cfg.paths.base_model}
    plan = {b: load_benchmark(b, cfg) for b in scores}
    # What a version is: its scores, the frozen evaluation they come from, its data (DVC's hashes: from dvc.lock
    # when DVC tracked this run, else computed), code, config. Input hashes only when DVC tracks this params file.
    locked = locked_out_hashes(cfg.root) if cfg.dvc_tracks_params else {}
    dvc = {f"dvc.data.{p}": locked.get(p) or content_hash(cfg.root / p) for p in sorted(data_paths)}
    if cfg.dvc_tracks_params:
        dvc.update({f"dvc.input.{k}": v for k, v in input_hashes(cfg.root, "register").items()})
    tags = {**git_tags(cfg.root), **dvc,
            **{f"config.{k}": v[:5000]
               for k, v in flatten(cfg.model_dump(mode="json", include={"train", "model"})).items()},
            **score_tags(scores), FINGERPRINT: eval_fingerprint(cfg, plan)}
    result = register_model(cfg.path("trained_model"), cfg.tracking.registered_model, cfg.tracking.alias, tags)
    if cfg.source:
        mlflow.log_artifact(str(cfg.source))
    write_json_atomic(cfg.path("registration"), result)
    print(f"registered {result['name']} version {result['version']} as @{result['alias']}")
    return {"version": int(result["version"])}


def score_tags(scores: dict) -> dict[str, str]:
    """eval.json's Simple/Hard/Avg F1 and EM as version tags: `eval.<bench>.<mode>.<split>.<f1|em>`."""
    return {f"eval.{k}": str(v) for k, v in flat_scores(scores).items()
            if k.split(".")[2] in ("avg", "simple", "hard") and k.split(".")[3] in ("f1", "em")}


def promote_stage(cfg: Config) -> dict:
    """Move the champion alias to the candidate when it scores better by tracking.promotion_margin on the same
    evaluation (a champion scored on another evaluation is re-scored first); the decision and both scores go to
    the promotion report, the version's tags and an MLflow run."""
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
                       rescore=lambda version: rescore_version(cfg, version))
    write_json_atomic(cfg.path("promotion"), decision)
    mlflow.set_tags({f"promotion.{k}": str(decision[k]) for k in ("promoted", "reason", "candidate_version",
                                                                  "champion_version", "champion_now")})
    mlflow.log_dict(decision, "promotion.json")
    verb = "promoted" if decision["promoted"] else "kept"
    print(f"{verb}: @{t.champion_alias} -> version {decision['champion_now']} ({decision['reason']})")
    return {k: float(decision[k]) for k in ("candidate_score", "champion_score", "promoted")
            if decision[k] is not None}


def rescore_version(cfg: Config, version) -> dict[str, str]:
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
