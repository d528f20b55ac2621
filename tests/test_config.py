import time
from pathlib import Path

import pytest
import yaml

from arft_core.config import (METRIC_SPLITS, REWARD_FUNCS, Config, ConfigError, SchedulerName, describe, load_config,
                              pipeline_errors)
from conftest import ROOT, arft, write_params


def test_project_params_match_schema_defaults_but_the_marked_embedded_values():
    cfg = load_config(ROOT / "params.yaml")
    # params.yaml spells out every setting; it agrees with the documented defaults (the real-model values) except
    # where a line is marked [embedded] (the offline default run's short values). The train presets are written
    # only there (the schema has none), so that the paper's settings have one definition.
    dumped, defaults = cfg.model_dump(), Config().model_dump()
    assert {"paper", "paper-coding", "paper-search"} <= set(dumped.pop("train_presets"))
    assert defaults.pop("train_presets") == {}

    def leaves(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("max_new_tokens",)
                               else {f"{prefix}{k}": v}).items()}

    mine, theirs = leaves(dumped), leaves(defaults)
    differ = {k for k in mine if mine[k] != theirs.get(k)}
    marked, stack = set(), []  # (indent, key) of the sections above the current line
    for line in (ROOT / "params.yaml").read_text().splitlines():
        body = line.split("#")[0]
        if not body.strip() or ":" not in body or body.strip().startswith("-"):
            continue
        indent = len(line) - len(line.lstrip())
        stack = [(i, k) for i, k in stack if i < indent]
        key = body.split(":")[0].strip()
        if "[embedded]" in line:
            marked.add(".".join([k for _, k in stack] + [key]))
        if not body.split(":", 1)[1].strip():
            stack.append((indent, key))
    assert differ == marked == {"train.max_steps", "eval.max_new_tokens", "model.embedded.vocab_size",
                                "train.sft.max_steps", "train.sft.learning_rate", "train.sft.batch_size",
                                "train.sft.save_steps"}
    assert (cfg.train.max_steps, cfg.eval.max_new_tokens) == (2, {"mat-coding": 64, "mat-search": 64, "multihop": 64})
    assert (Config().train.max_steps, Config().eval.max_new_tokens) == (
        None, {"mat-coding": 1024, "mat-search": 2048, "multihop": 2048})
    assert cfg.root == ROOT and cfg.source == ROOT / "params.yaml" and cfg.dvc_tracks_params


def test_unknown_key_is_named(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"learning_rte": 1e-5}}))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert "train.learning_rte: unknown key" in str(exc.value)


def test_mistyped_value_is_named(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"max_steps": "many"}, "data": {"n_test": 0}}))
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "params.yaml")
    assert "train.max_steps" in str(exc.value) and "'many'" in str(exc.value)
    assert "data.n_test" in str(exc.value)


def test_dvc_style_float_string_is_read_as_float(tmp_path: Path):
    # `dvc exp run -S train.learning_rate=2e-6` writes 2e-06, which PyYAML reads as a string.
    (tmp_path / "params.yaml").write_text("train:\n  learning_rate: 2e-06\n")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["learning_rate"] == "2e-06"
    assert load_config(tmp_path / "params.yaml").train.learning_rate == pytest.approx(2e-6)


def test_relative_sqlite_uri_resolves_under_project(tmp_path: Path, monkeypatch):
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(tmp_path)
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/tracking/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 40
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_cli_reports_config_errors(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("evals:\n  batch_size: 2\n")
    proc = arft("config", "--values", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "evals: unknown key" in proc.stderr


def test_multi_node_launch_commands(tmp_path):
    from arft_core.config import load_config
    from arft_core.stages.train import launch_command

    params = write_params(tmp_path, {"train": {"launcher": "torchrun", "num_processes": 8, "num_machines": 2,
                                               "main_process_ip": "10.0.0.1"}})
    cfg = load_config(params)
    cmd = launch_command(cfg, machine_rank=1)
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and "--standalone" not in cmd
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[-3:] == ["train-worker", "--params", str(params)]
    (tmp_path / "zero3.yaml").write_text("distributed_type: DEEPSPEED\n")
    cfg.train.launcher, cfg.train.accelerate_config = "accelerate", "zero3.yaml"
    cmd = launch_command(cfg, machine_rank=0)
    assert cmd[cmd.index("--num_processes") + 1] == "16"  # accelerate counts all nodes' processes
    assert cmd[cmd.index("--machine_rank") + 1] == "0" and cmd[cmd.index("--main_process_port") + 1] == "29500"
    cfg.train.main_process_ip = None
    with pytest.raises(ValueError, match="main_process_ip"):
        launch_command(cfg)
    cfg.train.num_machines = 1
    assert "--num_machines" not in launch_command(cfg)


@pytest.mark.parametrize("rank", ["2", "one", "-1"])
def test_a_node_rank_outside_the_launch_is_refused_before_anything_starts(tmp_path, monkeypatch, rank):
    write_params(tmp_path, {"train": {"launcher": "torchrun", "num_machines": 2, "main_process_ip": "10.0.0.1"}})
    monkeypatch.setenv("ARFT_MACHINE_RANK", rank)
    proc = arft("train", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"ARFT_MACHINE_RANK={rank!r}: must be a node rank from 0 to 1" in proc.stderr
    assert not (tmp_path / "tracking").exists()  # no run was started


# ---- every value that can be checked without running fails at load, naming the key and the value (issue 13)
def load_error(folder: Path, overrides: dict | None = None, text: str | None = None) -> str:
    """The ConfigError of a params.yaml built from the project's (one value changed), or of `text`; loading must
    fail at once and leave nothing but the params file behind."""
    path = write_params(folder, overrides) if text is None else folder / "params.yaml"
    if text is not None:
        path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert time.perf_counter() - start < 5
    assert [p.name for p in folder.iterdir()] == ["params.yaml"]
    message = str(exc.value)
    assert "Traceback" not in message and "\n  :" not in message
    return message


BAD_VALUES = {
    # the cases
    "unknown corruption": ({"data": {"simple": ["dark", "blurr"]}}, "data.simple.1: unknown corruption", "'blurr'"),
    "reward_weights length": ({"train": {"reward_weights": [1.0, 1.0, 1.0]}}, "train.reward_weights: needs 2 values",
                              "[1.0, 1.0, 1.0]"),
    "lr_scheduler_type": ({"train": {"lr_scheduler_type": "cosine_annealing"}}, "train.lr_scheduler_type: Input "
                          "should be 'linear'", "'cosine_annealing'"),
    "promotion benchmark": ({"eval": {"benchmarks": ["mat-coding", "multihop"]}}, "tracking.promotion_metrics: "
                            "benchmark 'mat-search' is not in eval.benchmarks", "'eval.mat-search.agent.avg.f1'"),
    "unknown preset": ({"train": {"preset": "papr"}}, "train.preset: unknown preset; train_presets defines: paper, "
                       "paper-coding, paper-search", "'papr'"),
    # more corruption lists
    "unknown hard corruption": ({"data": {"hard": [["rotation90", "drak"]]}}, "data.hard.0.1: unknown corruption",
                                "'drak'"),
    "crop combined": ({"data": {"hard": [["crop", "dark"]]}}, "data.hard.0: a hard type is one or more corruptions, "
                      "or crop alone", "['crop', 'dark']"),
    "duplicate type": ({"data": {"simple": ["dark", "dark"]}}, "data.simple: a type is listed twice",
                       "['dark', 'dark']"),
    "psnr gain key": ({"data": {"teacher": {"min_psnr_gain_db": {"drak": 3.0}}}},
                      "data.teacher.min_psnr_gain_db.drak: not a photometric corruption", "'drak'"),
    "known label": ({"validation": {"known_labels": ["dark", "rotate90"]}}, "validation.known_labels.1: unknown",
                    "'rotate90'"),
    # more reward / promotion / preset checks
    "agentic reward_weights": ({"train": {"mode": "agentic", "reward_weights": [1.0]}},
                               "train.reward_weights: needs 2 values, one per reward function of train.mode 'agentic'",
                               "[1.0]"),
    "promotion mode": ({"eval": {"modes": ["direct"]}}, "tracking.promotion_metrics: mode 'agent' is not in eval.modes",
                       "'eval.mat-coding.agent.avg.f1'"),
    "promotion split": ({"tracking": {"promotion_metrics": ["eval.multihop.agent.hard.f1"]}},
                        "tracking.promotion_metrics: multihop scores only the splits ['avg']",
                        "'eval.multihop.agent.hard.f1'"),
    "promotion tag shape": ({"tracking": {"promotion_metrics": ["mat-coding.agent.avg.f1"]}},
                            "tracking.promotion_metrics: not an eval.<benchmark>", "'mat-coding.agent.avg.f1'"),
    "no promotion metric": ({"tracking": {"promotion_metrics": []}}, "tracking.promotion_metrics: List should have at "
                            "least 1 item", "[]"),
    "no benchmark": ({"eval": {"benchmarks": []}}, "eval.benchmarks: List should have at least 1 item", "[]"),
    "bad preset value": ({"train_presets": {"fast": {"train": {"loss_type": "ppo"}}}},
                         "train_presets.fast.train.loss_type: Input should be", "'ppo'"),
    "preset unknown key": ({"train_presets": {"fast": {"train": {"learning_rte": 1.0}}}},
                           "train_presets.fast.train.learning_rte: unknown key", None),
    "preset flat train key": ({"train_presets": {"fast": {"learning_rate": 1.0}}}, "train_presets.fast.learning_rate: "
                              "not a section a preset sets (train, eval, agent)", "1.0"),
    "preset paths": ({"train_presets": {"fast": {"paths": {"base_model": "x"}}}}, "train_presets.fast.paths: not a "
                     "section a preset sets", "'base_model': 'x'"),
    "preset bad eval value": ({"train_presets": {"fast": {"eval": {"decoding": "greedy"}}}},
                              "train_presets.fast.eval.decoding: Input should be 'explicit' or 'checkpoint'",
                              "'greedy'"),
    "preset unknown base": ({"train_presets": {"fast": {"extends": "papr"}}}, "train_presets.fast.extends: unknown "
                            "preset; train_presets defines: paper, paper-coding, paper-search, fast", "'papr'"),
    "preset cycle": ({"train_presets": {"a": {"extends": "b"}, "b": {"extends": "a"}}},
                     "train_presets.b.extends: extends itself: a -> b -> a", "'a'"),
    "preset by_task task": ({"train_presets": {"fast": {"by_task": {"vision": {"train": {}}}}}},
                            "train_presets.fast.by_task.vision: not a train.task; known: coding, search", "'vision'"),
    "preset selects preset": ({"train_presets": {"fast": {"train": {"preset": "paper"}}}},
                              "train_presets.fast.train.preset: a preset cannot select another", "'paper'"),
    "used preset bad value": ({"train": {"preset": "fast"}, "train_presets": {"fast": {"eval": {"top_k": -1}}}},
                              "train_presets.fast.eval.top_k: Input should be greater than or equal to 0", "-1"),
    "max_new_tokens benchmark": ({"eval": {"max_new_tokens": {"mat-codin": 64}}}, "eval.max_new_tokens.mat-codin: not "
                                "a benchmark; known: mat-coding, mat-search, multihop", "64"),
    "max_new_tokens zero": ({"eval": {"max_new_tokens": {"multihop": 0}}}, "eval.max_new_tokens.multihop: at least 1 "
                            "token", "0"),
    "checkpoint after the end": ({"train": {"max_steps": 4, "checkpoint_step": 10}}, "train.checkpoint_step: after "
                                 "the last step, train.max_steps (4)", "10"),
    # cross-field bounds and requirements
    "range order": ({"data": {"ranges": {"blur_radius": [3.0, 1.5]}}}, "data.ranges.blur_radius: a range is [low, "
                    "high]", "[3.0, 1.5]"),
    "no source": ({"data": {"sources": {"synthetic": 0.0}}}, "data.sources: every source weight is 0",
                  "'synthetic': 0.0"),
    "pdf without paths": ({"data": {"sources": {"pdf": 1.0}}}, "data.pdf_paths: data.sources.pdf > 0 needs", "[]"),
    "model pixels": ({"model": {"min_pixels": 500_000}}, "model.min_pixels: larger than model.max_pixels (401408)",
                     "500000"),
    "train pixels": ({"train": {"min_pixels": 10_000, "max_pixels": 5_000}}, "train.min_pixels: larger than "
                     "train.max_pixels (5000)", "10000"),
    "image sides": ({"validation": {"min_side": 5000}}, "validation.min_side: larger than validation.max_side", "5000"),
    "missing accelerate config": ({"train": {"launcher": "accelerate", "accelerate_config": "infra/zero9.yaml"}},
                                  "train.accelerate_config: no such file", "'infra/zero9.yaml'"),
    "multi-node without address": ({"train": {"launcher": "torchrun", "num_machines": 2}},
                                   "train.main_process_ip: a multi-node launch", "None"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_fails_at_load_naming_key_and_value(tmp_path: Path, case: str):
    overrides, key_and_message, value = BAD_VALUES[case]
    message = load_error(tmp_path, overrides)
    line = next((ln for ln in message.splitlines() if key_and_message in ln), None)
    assert line is not None, message
    if value is not None:
        assert value in line, line


def test_unknown_preset_names_the_key_without_dumping_the_config(tmp_path: Path):
    message = load_error(tmp_path, {"train": {"preset": "papr"}})
    assert message.splitlines()[1] == ("  train.preset: unknown preset; train_presets defines: paper, paper-coding, "
                                       "paper-search (got 'papr')")
    assert len(message.splitlines()) == 2 and "learning_rate" not in message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("  n_train:"))
    lines[n] = "\t" + lines[n].lstrip()
    message = load_error(tmp_path, text="\n".join(lines) + "\n")
    assert message.startswith(f"{tmp_path / 'params.yaml'}:{n + 1}:1: YAML error: ")
    assert "found character '\\t' that cannot start any token" in message and "<unicode string>" not in message


def test_yaml_missing_colon_names_the_broken_line(tmp_path: Path):
    """PyYAML notices a key without its `:` one line later; the message quotes the line it belongs to (issue 26)."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("  learning_rate:"))
    lines[n] = lines[n].replace(":", "", 1)
    message = load_error(tmp_path, text="\n".join(lines) + "\n")
    assert message.splitlines() == [
        f"{tmp_path / 'params.yaml'}:{n + 2}:3: YAML error: while scanning a simple key; could not find expected ':'",
        f"  line {n + 1}: {lines[n][:100]!r} (while scanning a simple key)",
        f"  line {n + 2}: {lines[n + 1][:100]!r} (could not find expected ':')",
    ]


def test_yaml_missing_colon_on_a_sections_first_key_names_the_broken_line(tmp_path: Path):
    """The first key of a section (here with a comment after it): PyYAML takes the line for the section's value
    and reports only the next line, with the section's start as the context."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("train:")) + 1
    while not lines[n].strip() or lines[n].lstrip().startswith("#"):
        n += 1
    lines[n] = lines[n].replace(":", "", 1)
    message = load_error(tmp_path, text="\n".join(lines) + "\n")
    head, *shown = message.splitlines()
    assert head == (f"{tmp_path / 'params.yaml'}:{n + 2}:3: YAML error: while parsing a block mapping; expected "
                    "<block end>, but found '<block mapping start>'")
    note = f"the last value before line {n + 2}: is a `:` missing after the key?"
    assert f"  line {n + 1}: {lines[n][:100]!r} ({note})" in shown


@pytest.mark.parametrize("quote", ['"', "'"])
def test_yaml_unclosed_quote_names_the_broken_line(tmp_path: Path, quote: str):
    """An unclosed quote is noticed where a later quote closes it, lines further down: the message names the line
    where the string opens (issue 26)."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if ln.startswith("  max_prompt_tokens:"))
    lines[n] = lines[n].replace(": ", ": " + quote, 1)
    message = load_error(tmp_path, text="\n".join(lines) + "\n")
    head, *shown = message.splitlines()
    noticed = int(head.split(":")[1])  # the line PyYAML reports: past the broken one
    assert noticed > n + 1 and head.startswith(f"{tmp_path / 'params.yaml'}:{noticed}:")
    assert (f"  line {n + 1}: {lines[n][:100]!r} (a quoted string opens here and runs on to line {noticed}: is its "
            "closing quote missing?)") in shown
    assert shown[-1].startswith(f"  line {noticed}: {lines[noticed - 1][:100]!r} (expected <block end>, but found")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text() + "train:\n  max_steps: 2\n"
    message = load_error(tmp_path, text=text)
    assert message.startswith(f"{tmp_path / 'params.yaml'}:{text.count(chr(10)) - 1}:1: YAML error: ")
    assert "key 'train' given twice" in message


def test_project_and_paper_preset_load(tmp_path: Path):
    assert load_config(write_params(tmp_path, {"train": {"preset": "paper"}})).train.num_generations == 8
    cfg = load_config(write_params(tmp_path, {"train": {"mode": "agentic", "task": "search"},
                                              "eval": {"benchmarks": ["mat-search"], "modes": ["agent"]},
                                              "tracking": {"promotion_metrics": ["eval.mat-search.agent.hard.em"]}}))
    assert pipeline_errors(cfg) == []


def test_cli_reports_bad_value_without_traceback(tmp_path: Path):
    write_params(tmp_path, {"train": {"preset": "papr"}})
    start = time.perf_counter()
    proc = arft("config", "--values", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and time.perf_counter() - start < 10
    stderr = " ".join(proc.stderr.split())  # rich wraps long lines
    assert "train.preset: unknown preset" in stderr and "(got 'papr')" in stderr and "Traceback" not in stderr


# ---- the lists config.py keeps to stay light agree with the modules that own the facts
def test_corruption_names_match_the_problem_labels():
    from arft_core.config import _corruption_names
    from arft_core.protocol import PROBLEM_LABELS

    assert sorted(_corruption_names()) == sorted(PROBLEM_LABELS)


def test_scheduler_names_are_transformers_scheduler_types():
    from typing import get_args

    from transformers.trainer_utils import SchedulerType

    assert set(get_args(SchedulerName)) <= {s.value for s in SchedulerType}


def test_reward_function_counts_match_training():
    from arft_core.agent.grpo import TRAJECTORY_REWARDS
    from arft_core.rewards import VARIANTS, make_reward_funcs

    for task in ("coding", "search"):
        for variant in VARIANTS:
            names = [f.__name__.removesuffix("_reward") for f in make_reward_funcs(task, variant)]
            assert tuple(names) == REWARD_FUNCS["step"], (task, variant)
    names = [f.__name__.removeprefix("trajectory_").removesuffix("_reward") for f in TRAJECTORY_REWARDS]
    assert tuple(names) == REWARD_FUNCS["agentic"]


def test_promotion_check_accepts_exactly_the_tags_the_evaluation_writes():
    from arft_core.metrics import BENCHMARKS
    from arft_core.stages.release import score_tags

    assert set(METRIC_SPLITS) == set(BENCHMARKS)
    split = {"n": 1, "f1": 50.0, "em": 0.0}
    scores = {b: {m: {s: split for s in ("avg", "simple", "hard") if b != "multihop" or s == "avg"}
                  for m in ("agent", "direct")} for b in BENCHMARKS}
    every = sorted(f"eval.{b}.{m}.{s}.{k}" for b in BENCHMARKS for m in ("agent", "direct")
                   for s in (("avg",) if b == "multihop" else ("avg", "simple", "hard")) for k in ("f1", "em"))
    # A version is tagged with the Avg scores and whatever the promotion gate reads; the gate accepts them all.
    assert sorted(score_tags(scores)) == [t for t in every if ".avg." in t] and len(every) == 2 * (3 + 3 + 1) * 2
    assert sorted(score_tags(scores, keep=every)) == every
    cfg = Config.model_validate({"tracking": {"promotion_metrics": every}})
    assert pipeline_errors(cfg) == []


# ---- presets: complete recipes (train length, checkpoint, evaluation) behind the one switch train.preset
PAPER_EVAL = {"decoding": "checkpoint", "max_new_tokens": {"mat-coding": 1024, "mat-search": 2048, "multihop": 2048}}


@pytest.mark.parametrize("preset, task, epochs, step", [("paper-coding", "coding", 10, 1400),
                                                        ("paper-search", "search", 400, 200),
                                                        ("paper", "coding", 10, 1400)])
def test_paper_presets_pin_length_checkpoint_and_evaluation(tmp_path: Path, preset, task, epochs, step):
    cfg = load_config(write_params(tmp_path, {"train": {"preset": preset}}))  # over the tiny max_steps 1, 8 tokens
    t = cfg.train
    assert (t.task, t.max_steps, t.num_train_epochs, t.checkpoint_step, t.save_steps) == (task, None, epochs, step, 100)
    assert (t.num_generations, t.learning_rate, t.gradient_accumulation_steps, t.sft.enabled) == (8, 1e-6, 2, False)
    assert {k: getattr(cfg.eval, k) for k in PAPER_EVAL} == PAPER_EVAL
    assert (cfg.agent.protocol, cfg.agent.max_turns) == ("paper", 5)
    assert cfg.eval.batch_size == 1  # one item at a time, as their harness
    assert cfg.eval.multihop_limit == 2  # what the preset leaves alone stays


def test_paper_preset_takes_the_length_of_the_chosen_task(tmp_path: Path):
    cfg = load_config(write_params(tmp_path, {"train": {"preset": "paper", "task": "search"}}))
    assert (cfg.train.task, cfg.train.num_train_epochs, cfg.train.checkpoint_step) == ("search", 400, 200)
    # paper-coding pins its task: the preset wins over the train section
    cfg = load_config(write_params(tmp_path, {"train": {"preset": "paper-coding", "task": "search"}}))
    assert (cfg.train.task, cfg.train.num_train_epochs) == ("coding", 10)


def test_preset_extends_and_merges_nested_values(tmp_path: Path):
    presets = {"short": {"extends": "paper-search", "train": {"checkpoint_step": 50, "sft": {"max_steps": 9}},
                         "eval": {"max_new_tokens": {"multihop": 64}}}}
    cfg = load_config(write_params(tmp_path, {"train": {"preset": "short"}, "train_presets": presets}))
    assert (cfg.train.task, cfg.train.num_train_epochs, cfg.train.checkpoint_step) == ("search", 400, 50)
    assert (cfg.train.sft.enabled, cfg.train.sft.max_steps, cfg.train.sft.batch_size) == (False, 9, 4)
    assert cfg.eval.max_new_tokens == {"mat-coding": 1024, "mat-search": 2048, "multihop": 64}


def test_max_new_tokens_one_number_or_some_benchmarks():
    from arft_core.config import EvalConfig

    assert EvalConfig(max_new_tokens=64).max_new_tokens == {"mat-coding": 64, "mat-search": 64, "multihop": 64}
    assert EvalConfig(max_new_tokens="96").max_new_tokens["multihop"] == 96  # `dvc exp run -S` writes strings
    assert EvalConfig(max_new_tokens={"mat-coding": 8}).max_new_tokens == {"mat-coding": 8, "mat-search": 2048,
                                                                          "multihop": 2048}


def test_show_config_prints_the_length_and_the_paper_evaluation(tmp_path: Path):
    write_params(tmp_path, {"train": {"preset": "paper-search"}})
    shown = arft("train", "--show-config", cwd=tmp_path).stdout
    assert shown.splitlines()[0] == ("# training length: learning-rate schedule over 400 epochs, stopping at step "
                                     "200 (train.checkpoint_step), a checkpoint every 100 steps")
    train = yaml.safe_load(shown)["train"]
    assert (train["max_steps"], train["num_train_epochs"], train["checkpoint_step"]) == (None, 400.0, 200)
    shown = yaml.safe_load(arft("eval", "--show-config", "-b", "mat-search", cwd=tmp_path).stdout)
    assert shown["eval"]["decoding"] == "checkpoint" and shown["eval"]["benchmarks"] == ["mat-search"]
    assert shown["eval"]["max_new_tokens"] == {"mat-coding": 1024, "mat-search": 2048, "multihop": 2048}
    assert shown["agent"]["protocol"] == "paper" and shown["model"]["max_pixels"] == 401408
    assert not (tmp_path / "tracking").exists()  # nothing ran
