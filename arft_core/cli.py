"""`arft`: one subcommand per pipeline stage, `arft pipeline` for the whole chain, and helpers.

An interface module: it parses arguments and prints; the work is in arft_core.stages (via the Prefect flows). The
stage commands are made from the stage registry (`arft_core.stages.STAGES`: each stage's command words and help);
dvc.yaml's `cmd` of a stage is its command here.

Failures: every command ends a known failure (`_KNOWN_ERRORS`: a bad config, a locked or corrupted MLflow store, a
failed stage, a busy project...) with one `error:` line and exit 1, from one handler at the root (`_Root.invoke`);
Prefect's console logs drop their tracebacks too. `arft --debug <command>` (or ARFT_DEBUG=1) shows them all.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from arft_core.stages import STAGES, Stage

DEBUG_ENV = "ARFT_DEBUG"


# Failures with a message for the user, not a bug: shown as one `error:` line. By module and name, so that nothing
# is imported to check: an exception of a class whose module was never imported cannot have been raised.
_KNOWN_ERRORS = (
    ("arft_core.config", "ConfigError"), ("arft_core.tracking", "TrackingStoreError"),
    ("flows.pipeline", "StageFailed"), ("flows.session", "PipelineBusy"),
    ("arft_core.validation", "ValidationFailed"), ("arft_core.search.base", "SearchError"),
    ("arft_core.sandbox.pool", "SandboxError"), ("arft_core.stack", "StackError"),
    ("arft_core.integrity", "IntegrityError"),
    ("mlflow.exceptions", "MlflowException"),
    ("dvc.exceptions", "DvcException"),  # DVC's own errors are written for its users (not a DVC repository...)
)


def _known_error(exc: BaseException) -> bool:
    return any(isinstance(exc, getattr(sys.modules[module], name)) for module, name in _KNOWN_ERRORS
               if module in sys.modules)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


class _Root(typer.core.TyperGroup):
    """The `arft` group: the one place where a known failure of any command becomes its `error:` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if _debug() or not _known_error(exc):
                raise  # a bug (or --debug): the whole traceback
            _fail(str(exc))


class _WithoutTraceback(logging.Formatter):
    """Formats like `inner`, leaving out the exception's traceback (its one-line summary stays in the message)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # for this handler only: restored below
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _QuietPrefectConsole(logging.Filter):
    """Prefect prints a failed flow or task run's traceback on the console before the exception reaches `_Root`.
    Prefect configures its handlers on import, which most commands never do: so on the first record of a Prefect
    logger, its console handlers stop printing tracebacks (the API handler keeps them, for the Prefect UI)."""

    LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs")

    def filter(self, record: logging.LogRecord) -> bool:
        loggers = [logging.getLogger(name) for name in self.LOGGERS] + [logging.getLogger()]
        for handler in {h for logger in loggers for h in logger.handlers}:
            if type(handler).__name__ == "PrefectConsoleHandler" and not isinstance(handler.formatter,
                                                                                    _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter))
        return True


_QUIET_PREFECT = _QuietPrefectConsole()  # one instance: adding it again (each in-process invocation) is a no-op


app = typer.Typer(help="arft: Visual Agentic Reinforcement Fine-Tuning pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=_Root)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ParamsOption = typer.Option(None, "--params", "-p", help="params.yaml to use (default: found from the working "
                            "directory upwards).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", envvar=DEBUG_ENV, help="Show the full traceback of a "
                                     "failure (also in Prefect's logs and in the stage commands the pipeline "
                                     "runs), instead of one `error:` line.")) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"  # inherited by the stage commands that `arft pipeline` starts
        return
    for name in _QuietPrefectConsole.LOGGERS:
        logging.getLogger(name).addFilter(_QUIET_PREFECT)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _config(params: Optional[Path]):
    """The typed config (a ConfigError ends the command with its `error:` line, at the root)."""
    from arft_core.config import load_config

    return load_config(params)


def _run_stage(stage: str, params: Optional[Path]) -> None:
    """Run a stage through its Prefect flow; a known failure is one clean error line (exit 1)."""
    from flows.stages import STAGE_FLOWS

    cfg = _config(params)  # a config error ends here, in a second, before Prefect starts a server and a flow run
    try:
        summary = STAGE_FLOWS[stage](params=str(params) if params else None)
    except (FileNotFoundError, ValueError) as exc:  # a stage's missing or bad input (the rest: `_Root`)
        _fail(str(exc))
    console.print(f"[green]{stage} done[/]: {json.dumps(summary)}", highlight=False)
    report = STAGES[stage].report
    if report:
        typer.echo(cfg.path(report).read_text())


def _experiment_id(uri: str, name: str) -> str:
    import mlflow

    experiment = mlflow.MlflowClient(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else "0"


def _stage_help(stage: Stage) -> str:
    """A stage command's help: the stage function's docstring, naming the stage when the command is another word."""
    suffix = "" if stage.command == (stage.name,) else f"\n\nThe `{stage.name}` stage of dvc.yaml."
    return stage.help + suffix


def train_cmd(show_config: bool = typer.Option(False, "--show-config", help="Print the resolved train settings "
                                               "(preset applied) as YAML, headed by the run's length, and exit."),
              params: Optional[Path] = ParamsOption) -> None:
    if show_config:
        import yaml

        train = _config(params).train
        typer.echo(f"# training length: {train.length()}\n"
                   + yaml.safe_dump({"train": train.model_dump(mode="json")}, sort_keys=False))
        return
    import os

    from arft_core.stages.train import MACHINE_RANK_ENV, machine_rank, train_node

    if os.environ.get(MACHINE_RANK_ENV, "0").strip() in ("", "0"):  # one machine, or the main node
        _run_stage("train", params)
        return
    cfg = _config(params)
    try:  # another node of a multi-node launch: its ranks only (no flow run, no MLflow run, no outputs)
        node = machine_rank(cfg)
        train_node(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    console.print(f"[green]train done[/] on node {node} (the main node logs the run and writes the model)")


_WITH_OPTIONS = {"train": train_cmd}  # stage commands with options of their own; the rest take only -p


def _stage_command(stage: Stage) -> None:
    """`arft <stage.command>`: runs the stage's Prefect flow with the params file of `-p` (default: found)."""
    def command(params: Optional[Path] = ParamsOption) -> None:
        _run_stage(stage.name, params)

    *group, name = stage.command
    group_app = _GROUPS[group[0]] if group else app
    group_app.command(name=name, help=_stage_help(stage))(_WITH_OPTIONS.get(stage.name, command))


data_app = typer.Typer(help="Data generation and import.", no_args_is_help=True)
app.add_typer(data_app, name="data")
_GROUPS = {"data": data_app}  # command groups that stage commands live in (`arft data coding`)

for _stage in STAGES.values():
    _stage_command(_stage)


@app.command()
def pipeline(params: Optional[Path] = ParamsOption) -> None:
    """Run the whole chain (dvc.yaml's stages in order, unchanged stages skipped) as one Prefect flow run. With a
    params file other than the project's params.yaml, DVC cannot tell what changed: every stage runs, in this
    process, and dvc.lock is left untouched."""
    from flows.pipeline import pipeline_flow, prefect_api
    from flows.session import pipeline_session

    cfg = _config(params)
    with pipeline_session(cfg), prefect_api() as api:
        console.print(f"Prefect API: {api}", highlight=False)
        result = pipeline_flow(params=str(cfg.source))
    uri = cfg.tracking_uri()
    console.rule("arft pipeline finished")
    for stage, status in result["stages"].items():
        console.print(f"  {stage:<13} {status}")
    console.print(f"MLflow tracking URI: {uri}", highlight=False)
    console.print(f"MLflow parent run:   {result['mlflow_run_id']}", highlight=False)
    console.print(f"Browse the runs:     mlflow ui --backend-store-uri {uri}", highlight=False)
    # MLflow 3's UI opens on its GenAI views unless asked for model training (its workflow switch).
    experiment = _experiment_id(uri, cfg.tracking.experiment)
    console.print(f"  then open:         http://127.0.0.1:5000/#/experiments/{experiment}"
                  "?workflowType=machine_learning", highlight=False)
    console.print(f"  checkpoints:       http://127.0.0.1:5000/#/experiments/{experiment}/models"
                  "?workflowType=machine_learning  (the Models tab)", highlight=False)
    for name in ("validation_report", "eval_metrics", "eval_report", "predictions", "registration", "promotion"):
        console.print(f"{name + ':':<20} {cfg.path(name)}", highlight=False)


@app.command()
def retrain(params: Optional[Path] = ParamsOption) -> None:
    """One retraining run, as the schedule fires it: skip when no input changed, else run the chain (promotion
    included) and record the new dvc.lock."""
    from flows.pipeline import prefect_api
    from flows.retrain import retrain_flow
    from flows.session import pipeline_session

    cfg = _config(params)
    with pipeline_session(cfg), prefect_api():
        result = retrain_flow(params=str(cfg.source))
    typer.echo(json.dumps(result))


@app.command()
def deploy(serve: bool = typer.Option(False, "--serve", help="Serve the deployments from this process (one "
                                      "machine, no workers) until interrupted, instead of registering them for "
                                      "the work pools' workers."),
           params: Optional[Path] = ParamsOption) -> None:
    """Create the Prefect deployments: scheduled retraining (retrain.cron) and evaluation on the CPU pool, training
    on the GPU pool. Needs a Prefect server (PREFECT_API_URL)."""
    import os

    from flows.deployments import apply_deployments, serve_deployments

    cfg = _config(params)
    if not os.environ.get("PREFECT_API_URL"):
        _fail("PREFECT_API_URL is not set: start a server (`prefect server start`, or the team stack in "
              "infra/compose.yaml) and export its API URL")
    if serve:
        console.print(f"serving arft-retrain/scheduled (cron {cfg.retrain.cron!r} {cfg.retrain.timezone}), "
                      "arft-train/gpu, arft-evaluate/cpu; Ctrl-C stops", highlight=False)
        serve_deployments(cfg)
        return
    for line in apply_deployments(cfg):
        console.print(f"deployed {line}", highlight=False)
    console.print(f"start workers: prefect worker start --pool {cfg.retrain.cpu_pool} (and --pool "
                  f"{cfg.retrain.gpu_pool} on GPU machines); `arft stack up` runs both", highlight=False)


@app.command("search")
def search_cmd(query: str = typer.Argument(..., help="What to search for."),
               backend: Optional[str] = typer.Option(None, "--backend", "-b", help="local, serper or brave "
                                                     "(default: search.backend)."),
               k: Optional[int] = typer.Option(None, "-k", help="Results (default: search.top_k)."),
               mode: Optional[str] = typer.Option(None, "--mode", help="live, record or replay (default: "
                                                  "search.mode)."),
               params: Optional[Path] = ParamsOption) -> None:
    """Search with the configured tool (through the cache) and print the results as JSON."""
    from dataclasses import asdict

    from arft_core.stages.data import open_search

    cfg = _config(params)
    try:
        updates = {k_: v for k_, v in (("backend", backend), ("mode", mode), ("top_k", k)) if v is not None}
        cfg.search = type(cfg.search).model_validate({**cfg.search.model_dump(), **updates})
        results = open_search(cfg).search(query, cfg.search.top_k)
    except (ValueError, FileNotFoundError) as exc:  # (a SearchError: `_Root`)
        _fail(str(exc))
    typer.echo(json.dumps([asdict(r) for r in results], ensure_ascii=False))


@app.command("prompt")
def prompt_cmd(benchmark: str = typer.Option(..., "--benchmark", help="mat-coding, mat-search or multihop."),
               mode: str = typer.Option("agent", "--mode", help="agent (the tool loop) or direct (the baseline)."),
               protocol: Optional[str] = typer.Option(None, "--protocol", help="arft or paper (default: "
                                                      "agent.protocol)."),
               question: str = typer.Option(..., "--question", help="The item's question."),
               labels: Optional[list[str]] = typer.Option(None, "--labels", help="MAT-Coding: the diagnosed "
                                                          "labels of the scripted first step (repeat the option)."),
               after_tool: bool = typer.Option(False, "--after-tool", help="The second turn's messages, after a "
                                               "first step that calls a tool (<problem> or <search>)."),
               output: Optional[str] = typer.Option(None, "--output", help="That first step's text (default: a "
                                                    "scripted <problem> with --labels, or <search> the question)."),
               snippets: Optional[list[str]] = typer.Option(None, "--snippet", help="Search results the first "
                                                            "step gets (repeat; default: two placeholders)."),
               rendered: bool = typer.Option(False, "--rendered", help="Print the chat-template text the model "
                                             "reads instead of the messages."),
               params: Optional[Path] = ParamsOption) -> None:
    """Print, as JSON, the exact messages the model receives (text verbatim, images as {"type": "image"}) on an
    item's first turn, or its second with --after-tool; --rendered prints the chat-template text."""
    from arft_core.agent.preview import preview_messages

    cfg = _config(params)
    try:
        messages = preview_messages(benchmark, mode, protocol or cfg.agent.protocol, question, labels, after_tool,
                                    output, snippets)
    except ValueError as exc:
        _fail(str(exc))
    if not rendered:
        typer.echo(json.dumps(messages, ensure_ascii=False, indent=2))
        return
    # The chat template is the tokenizer's: the checkpoint's own, or the embedded model's Qwen tokenizer.
    if cfg.model.name_or_path == "embedded":
        from arft_core.model.tokenizer import build_qwen_tokenizer

        template = build_qwen_tokenizer(cfg.model.embedded.vocab_size)
    else:
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(Path(cfg.model.name_or_path).expanduser())
    typer.echo(template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), nl=False)


@app.command()
def models(params: Optional[Path] = ParamsOption) -> None:
    """List the registered versions with their aliases and promotion scores."""
    from arft_core.registry import list_versions
    from arft_core.tracking import configure

    cfg = _config(params)
    configure(cfg)
    table = Table("version", "aliases", "score", "git commit", "run")
    for row in list_versions(cfg.tracking.registered_model, cfg.tracking.promotion_metrics):
        score = "-" if row["score"] is None else f"{row['score']:.4f}"
        table.add_row(row["version"], ", ".join(row["aliases"]), score, row["git_commit"][:10], row["run_id"] or "")
    console.print(table)


@app.command("train-worker", hidden=True)
def train_worker_cmd(params: Optional[Path] = ParamsOption) -> None:
    """One rank of `train.launcher: accelerate` (started by `accelerate launch`, not by hand)."""
    from arft_core.stages.train import train_worker

    train_worker(_config(params))


@app.command("eval")
def eval_cmd(model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder or registered version "
                                                  "(models:/arft-agent@champion); default: the trained model, "
                                                  "paths.trained_model."),
             benchmark: list[str] = typer.Option([], "--benchmark", "-b", help="mat-coding, mat-search, multihop "
                                                 "(repeatable; default: eval.benchmarks)."),
             mode: list[str] = typer.Option([], "--mode", help="agent or direct (repeatable; default: eval.modes)."),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval.json, eval_report.html "
                                                "and predictions/ (default: the pipeline's paths)."),
             checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="all: also evaluate every "
                                                       "checkpoint the last training saved, each an MLflow "
                                                       "LoggedModel, and plot F1 vs step; none: not them "
                                                       "(default: eval.checkpoints)."),
             show_config: bool = typer.Option(False, "--show-config", help="Print the resolved eval and agent "
                                              "settings (preset, --benchmark and --mode applied), the model's "
                                              "dtype and pixel budget, and the decoding values used (the "
                                              "checkpoint's under decoding: checkpoint) as YAML, and exit."),
             params: Optional[Path] = ParamsOption) -> None:
    """Evaluate any model (the trained one, a base checkpoint, a registered version, every training checkpoint)
    with tools and/or the direct baseline."""
    if show_config:
        import yaml

        from arft_core.stages.evaluate import eval_overrides

        from arft_core.stages.evaluate import shown_settings

        cfg = eval_overrides(_config(params), benchmarks=benchmark or None, modes=mode or None)
        folder = Path(model) if model and not model.startswith("models:/") else None
        typer.echo(yaml.safe_dump(shown_settings(cfg, folder), sort_keys=False))
        return
    from mlflow.exceptions import MlflowException

    from flows.stages import evaluate_flow

    if model is not None and not model.startswith("models:/") and not Path(model).is_dir():
        _fail(f"--model {model}: not a folder (nor a models:/ URI)")
    if checkpoints not in (None, "all", "none"):
        _fail(f"--checkpoints {checkpoints}: expected all or none")
    _config(params)  # config errors before Prefect starts
    try:
        summary = evaluate_flow(params=str(params) if params else None, model=model,
                                benchmarks=benchmark or None, modes=mode or None, out=str(out) if out else None,
                                checkpoints=checkpoints)
    except (FileNotFoundError, ValueError, MlflowException) as exc:
        _fail(str(exc))
    console.print(f"[green]eval done[/]: {json.dumps(summary)}", highlight=False)


@app.command()
def score(file: Path = typer.Argument(..., help="Prediction file: a JSON list of {id?, gt, pred_answer, split?}."),
          benchmark: str = typer.Option(..., "--benchmark", "-b", help="mat-coding, mat-search or multihop.")) -> None:
    """Score a prediction file in the authors' released format; print one JSON object (percentages)."""
    from arft_core.metrics import score_predictions

    if not file.is_file():
        _fail(f"{file}: no such file")
    try:
        rows = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        _fail(f"{file}: not JSON ({exc})")
    if not isinstance(rows, list):
        _fail(f"{file}: expected a JSON list of predictions, got {type(rows).__name__}")
    try:
        result = score_predictions(rows, benchmark)
    except ValueError as exc:
        _fail(f"{file}: {exc}")
    print(json.dumps(result))


@app.command("stages")
def stages_cmd(write_deps: bool = typer.Option(False, "--write-deps", help="Rewrite each stage's code deps in "
                                               "dvc.yaml from the import closure of its code (after moving or "
                                               "adding modules; tests/test_dag.py fails until they match)."),
               params: Optional[Path] = ParamsOption) -> None:
    """List the stages in the order the pipeline runs them (from dvc.yaml), each with its command."""
    from arft_core.dag import stage_order, write_code_deps

    root = _config(params).root
    if write_deps:
        changed = write_code_deps(root, {name: stage.run for name, stage in STAGES.items()})
        console.print(f"dvc.yaml: code deps rewritten for {', '.join(changed)}" if changed else
                      "dvc.yaml: code deps already match the code", highlight=False)
        return
    for name in stage_order(root):
        console.print(f"{name:<13} {STAGES[name].cmd}", highlight=False)


@app.command("config")
def show_config(params: Optional[Path] = ParamsOption,
                values: bool = typer.Option(False, "--values", help="Print the resolved values of params.yaml.")) -> None:
    """Document every params.yaml key (default and help), or print the resolved values."""
    from arft_core.config import describe

    if values:
        console.print_json(json.dumps(_config(params).model_dump(mode="json")))
        return
    table = Table("key", "default", "help")
    for key, default, help_text in describe():
        table.add_row(key, default, help_text)
    console.print(table)


@data_app.command("import-coding")
def data_import_coding(
    manifest: Path = typer.Argument(..., help="The paper's MAT-Coding JSON (id, question, answers, "
                                    "ori_image_path, processed_image_path, type, split)."),
    images: Path = typer.Option(..., "--images", help="Folder the JSON's image paths are relative to."),
    out: Path = typer.Option(..., "--out", help="Folder for the imported test.json, images/ and quarantine.json."),
    params: Optional[Path] = ParamsOption,
) -> None:
    """Import MAT-Coding items (e.g. the real benchmark): invalid items are quarantined with a reason, valid ones
    are copied into OUT and validated with the same Great Expectations suite as generated data."""
    from arft_core.config import ConfigError, ValidationConfig, load_config
    from arft_core.data.importers import import_mat_coding
    from arft_core.io import write_json_atomic
    from arft_core.validation import format_report, validate_manifests

    try:
        cfg = load_config(params).validation
    except ConfigError:
        cfg = ValidationConfig()
    try:
        result = import_mat_coding(manifest, images, out, cfg)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc), 2)
    write_json_atomic(out / "test.json", result.items)
    result.write_quarantine(out / "quarantine.json")
    for q in result.quarantined:
        err.print(f"quarantined: {q['reason']}", highlight=False)
    report = validate_manifests({"test": result.items}, out, cfg)
    console.print(format_report(report), highlight=False)
    console.print(f"imported {len(result.items)} items, quarantined {len(result.quarantined)} "
                  f"({out / 'quarantine.json'})", highlight=False)
    if not report["success"]:
        raise typer.Exit(1)


sandbox_app = typer.Typer(help="The code tool's sandbox.", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("run")
def sandbox_run(code: Path = typer.Argument(..., help="Python file to run (may use numpy, Pillow, OpenCV)."),
                image: list[Path] = typer.Option([], "--image", "-i", help="Input image(s): the first is "
                                                 "path_to_input_image.jpg, the next path_to_input_image_1.jpg..."),
                out: Path = typer.Option(..., "--out", "-o", help="Folder for the output images."),
                params: Optional[Path] = ParamsOption) -> None:
    """Run CODE in the sandbox and print one JSON object; exit 0 whenever the sandbox itself worked."""
    from arft_core.config import ConfigError, SandboxConfig, load_config
    from arft_core.sandbox import SandboxError, SandboxPool

    try:
        cfg = load_config(params).sandbox
    except ConfigError as exc:
        if params is not None:
            _fail(str(exc), 2)
        cfg = SandboxConfig()  # outside a project: the documented defaults
    for path in [code, *image]:
        if not path.is_file():
            _fail(f"no such file: {path}", 2)
    try:
        with SandboxPool(cfg.model_copy(update={"workers": 1})) as pool:
            result = pool.run(code.read_text(), image, out)
    except SandboxError as exc:
        _fail(f"sandbox could not run: {exc}", 3)
    typer.echo(json.dumps(result.to_json()))


@sandbox_app.command("probe")
def sandbox_probe(params: Optional[Path] = ParamsOption) -> None:
    """Start one sandbox and report which isolation layers work on this machine."""
    from arft_core.config import ConfigError, SandboxConfig, load_config
    from arft_core.sandbox import SandboxError, SandboxPool
    from arft_core.sandbox.pool import LAYERS

    try:
        cfg = load_config(params).sandbox
    except ConfigError:
        cfg = SandboxConfig()
    try:
        with SandboxPool(cfg.model_copy(update={"workers": 1, "isolation": "auto"})) as pool:
            layers = pool.layers
    except SandboxError as exc:
        _fail(f"sandbox could not start: {exc}", 3)
    for name, on in layers.items():
        console.print(f"{'[green]yes[/]' if on else '[red]NO[/] '}  {name}: {LAYERS[name]}")
    typer.echo(json.dumps(layers))


stack_app = typer.Typer(help="The team stack of infra/compose.yaml as local processes on loopback: PostgreSQL, S3 "
                        "(moto), MLflow, Prefect, a CPU-pool and a GPU-pool worker.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")


def _stack(action, params: Optional[Path], **kwargs):
    return action(_config(params), **kwargs)


@stack_app.command("up")
def stack_up(params: Optional[Path] = ParamsOption) -> None:
    """Start what is not running (the databases persist in stack.home between runs); then print where each
    service answers and what a client exports (`eval "$(arft stack env)"`)."""
    from arft_core.stack import up

    p = _stack(up, params, echo=lambda line: console.print(line, highlight=False))
    console.print(f"MLflow {p.url('mlflow')}   Prefect {p.url('prefect')}/dashboard   S3 {p.url('minio')}",
                  highlight=False)
    console.print("clients: eval \"$(arft stack env)\"; workers run flow runs in "
                  f"{p.service('cpu-worker').cwd}", highlight=False)


@stack_app.command("down")
def stack_down(volumes: bool = typer.Option(False, "--volumes", "-v", help="Also delete stack.home (the "
                                            "PostgreSQL databases, the S3 objects), like `docker compose down -v`."),
               params: Optional[Path] = ParamsOption) -> None:
    """Stop every process of the stack, workers' flow runs included. The S3 server's objects (held in memory) are
    saved to stack.home first; the next `up` restores them."""
    from arft_core.stack import down

    _stack(down, params, volumes=volumes, echo=lambda line: console.print(line, highlight=False))


@stack_app.command("status")
def stack_status(params: Optional[Path] = ParamsOption) -> None:
    """Which services run (exit 0 when all do, 3 when some do not)."""
    from arft_core.stack import status

    rows = _stack(status, params)
    table = Table("service", "state", "pid", "port")
    for row in rows:
        table.add_row(row["service"], "[green]running[/]" if row["running"] else "[red]stopped[/]",
                      str(row["pid"] or ""), str(row["port"] or ""))
    console.print(table)
    if not all(row["running"] for row in rows):
        raise typer.Exit(3)


@stack_app.command("env")
def stack_env(params: Optional[Path] = ParamsOption) -> None:
    """Shell exports for a client of the stack (the environment compose gives a worker). Secrets are printed as
    references to the variables holding them, never as values."""
    import shlex

    from arft_core.stack import client_env, plan

    for key, value in _stack(lambda cfg: client_env(plan(cfg, secrets=False)), params).items():
        shown = f'"{value}"' if value.startswith("${") else shlex.quote(value)
        typer.echo(f"export {key}={shown}")


@app.command("serve")
def serve_cmd(model: str = typer.Argument(..., help="Registered version to serve: models:/NAME@ALIAS, "
                                          "models:/NAME/VERSION or models:/MODEL_ID."),
              host: str = typer.Option("127.0.0.1", "--host", "-h", help="Address to bind. The scoring server "
                                       "has no authentication: keep loopback, or put an authenticating proxy in "
                                       "front (docs/serving.md)."),
              port: int = typer.Option(5001, "--port", "-p", help="Port to bind."),
              params: Optional[Path] = ParamsOption) -> None:
    """Serve a registered agent over REST (`mlflow models serve` of a checked copy): every file of the version is
    checked against the manifest logged with it before anything of it is loaded."""
    import shutil
    import subprocess
    import sys
    import tempfile

    import mlflow

    from arft_core.integrity import download_verified
    from arft_core.tracking import store_errors

    if not model.startswith("models:/"):
        _fail(f"{model}: not a models:/ URI (a local folder is served by `mlflow models serve -m FOLDER`)")
    cfg = _config(params)
    scratch = Path(tempfile.mkdtemp(prefix="arft-serve-"))
    try:
        mlflow.set_tracking_uri(cfg.tracking_uri())
        with store_errors():  # an IntegrityError names the changed file (`_Root` prints it)
            folder = download_verified(model, scratch)
        err.print(f"{model}: every file matches its logged manifest; serving on http://{host}:{port}")
        # `mlflow models serve` execs uvicorn from PATH: this environment's bin first.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(folder),
                                 "--env-manager", "local", "-h", host, "-p", str(port)], env=env)
        try:
            raise typer.Exit(proc.wait())
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C: the server shuts down, then its checked copy is removed
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every clean-up runs: stage processes stopped, the temporary Prefect
    server shut down, MLflow runs ended KILLED."""


def _terminated(signum, frame) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    app()


if __name__ == "__main__":
    main()
