"""The release stages: register the trained model in MLflow, and the promotion gate (re-scoring the champion on
this evaluation when it was scored on another one)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from arft_core.config import Config
from arft_core.io import write_json_atomic
from arft_core.stages.evaluate import eval_search, flat_scores, registered_model_dir

INPUTS_TAG = "dvc.inputs"  # version tag: one digest of the register stage's input hashes (each a run tag)
RESOLVED_CONFIG = "config/resolved_params.json"  # the register run's artifact: the whole config as it ran
REGISTER_RUN_TAG = "arft.register_run"  # version tag: the register run (resolved config, every input's hash)


def register_stage(cfg: Config) -> dict:
    """Register the trained model in MLflow with its scores, evaluation fingerprint, data hashes and commit as tags
    (at most a few dozen), the resolved config as an artifact, and set the candidate alias."""
    import mlflow

    from arft_core.evaluation import eval_fingerprint, load_benchmark
    from arft_core.registry import FINGERPRINT, register_model
    from arft_core.stages.evaluate import evaluated_model
    from arft_core.tracking import content_hash, git_tags, input_hashes, locked_out_hashes

    scores = json.loads(cfg.path("eval_metrics").read_text())
    data_paths = {cfg.paths.mat_coding, cfg.paths.mat_search, cfg.paths.base_model}
    plan = {b: load_benchmark(b, cfg) for b in scores}
    # What a version is: its scores, the frozen evaluation they come from, its data (DVC's hashes: from dvc.lock
    # when DVC tracked this run, else computed), code, config. Input hashes only when DVC tracks this params file.
    locked = locked_out_hashes(cfg.root) if cfg.dvc_tracks_params else {}
    dvc = {f"dvc.data.{p}": locked.get(p) or content_hash(cfg.root / p) for p in sorted(data_paths)}
    # Every input's hash (code files included) is a tag of the register run; the version carries one digest of
    # them, so that its page shows scores, decision, fingerprint, data and code version, not a hundred hashes.
    inputs = input_hashes(cfg.root, "register") if cfg.dvc_tracks_params else {}
    if inputs:
        dvc[INPUTS_TAG] = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    # The version's run is the train run (its LoggedModel's source); this run, with the resolved config and the
    # input hashes, is named by a tag.
    tags = {**git_tags(cfg.root), **dvc, **score_tags(scores, cfg.tracking.promotion_metrics),
            FINGERPRINT: eval_fingerprint(cfg, plan), REGISTER_RUN_TAG: mlflow.active_run().info.run_id}
    # The LoggedModel the evaluate stage scored: the agent as evaluated (weights, loop, tools, settings).
    result = register_model(f"models:/{evaluated_model(cfg)['model_id']}", cfg.tracking.registered_model,
                            cfg.tracking.alias, tags)
    # The full resolved config (presets applied), one artifact of this run instead of a tag per key.
    mlflow.log_dict(cfg.model_dump(mode="json"), RESOLVED_CONFIG)
    if inputs:
        mlflow.log_dict(inputs, "dvc_inputs.json")
    if cfg.source:
        mlflow.log_artifact(str(cfg.source))
    write_json_atomic(cfg.path("registration"), result)
    print(f"registered {result['name']} version {result['version']} as @{result['alias']}")
    return {"version": int(result["version"])}


def score_tags(scores: dict, keep: list[str] = ()) -> dict[str, str]:
    """eval.json's Avg F1 and EM per benchmark and mode as version tags (`eval.<bench>.<mode>.avg.<f1|em>`), plus
    the metrics named in `keep` (the promotion metrics); every other figure stays in the evaluation run."""
    return {f"eval.{k}": str(v) for k, v in flat_scores(scores).items()
            if (k.split(".")[2] == "avg" and k.split(".")[3] in ("f1", "em")) or f"eval.{k}" in keep}


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
    return score_tags(scores, cfg.tracking.promotion_metrics)
