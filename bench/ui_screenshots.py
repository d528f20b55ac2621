"""Screenshots of what a user sees in the MLflow UI after `make run`, taken with headless Chromium (Debian package
`chromium`): the experiment's Models tab (the checkpoints side by side), a trace with a tool span, and the
registered version's page. They go to docs/images/.

    python bench/ui_screenshots.py [--params params.yaml] [--out docs/images] [--trace-id tr-...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run in each page before its screenshot: close MLflow's assistant side panel and first-visit tips.
TIDY_JS = """
for (const b of document.querySelectorAll('button')) {
  const id = b.getAttribute('data-component-id') || '';
  if (id.includes('assistant') && id.includes('close') || b.textContent.trim() === 'Got it') b.click();
}
"""


# The Models tab's chart view: the second option of its table/chart switch.
CHART_VIEW_JS = """
const g = document.querySelector('[data-component-id="mlflow.logged_model.list.view-mode"]');
if (g) { const o = g.querySelectorAll('input, button'); if (o.length) o[o.length - 1].click(); }
"""


def shot(url: str, path: Path, width: int = 1600, height: int = 1000, wait_s: float = 10.0, script: str = "") -> None:
    """A screenshot of `url` after it rendered, taken through Chromium's DevTools protocol so that the page can be
    tidied first (TIDY_JS) and, with `script`, acted on (e.g. a view switched)."""
    import base64
    import json

    from websockets.sync.client import connect

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    port = free_port()
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--remote-debugging-port={port}", f"--window-size={width},{height}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(60):
            try:
                pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(p for p in pages if p["type"] == "page")
                break
            except (OSError, StopIteration):
                time.sleep(0.5)
        with connect(page["webSocketDebuggerUrl"], max_size=2**26) as ws:
            counter = iter(range(1, 10**6))

            def call(method: str, **params):
                ident = next(counter)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == ident:
                        return msg.get("result", {})

            call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            call("Page.navigate", url=url)
            time.sleep(wait_s)
            call("Runtime.evaluate", expression=TIDY_JS + script)
            time.sleep(4 if script else 2)
            data = call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"{path}: {url}")


class TeacherReplay:
    """The agent's engine for a teacher replay: every model turn is scripted (the loop's `scripted`), so the engine
    is never asked; its processor (the base model's) renders the transcript as an evaluation does."""

    def __init__(self, processor):
        self.processor = processor

    def generate(self, ids, images, max_new_tokens, deadline=None):
        raise RuntimeError("teacher replay: every turn is the teacher's")


def teacher_replay_traces(cfg, n: int) -> list[str]:
    """n MAT-Coding test items run through the real agent loop (the evaluation's agent; the sandbox runs the
    teacher's code) with their teacher turns (problem, code, answer) as the model's turns, traced like an
    evaluation in a run `teacher-replay (docs)`: traces with TOOL spans to show, when the embedded model itself
    calls no tool."""
    import json
    import tempfile

    import mlflow

    from arft_core.agent.runner import open_tools
    from arft_core.agent.steps import teacher_turns
    from arft_core.evaluation import eval_agent, load_benchmark, score_run
    from arft_core.model.embedded import resolve_model_dir
    from arft_core.model.processor import load_processor
    from arft_core.traces import log_eval_traces

    manifest = json.loads((cfg.path("mat_coding") / "test.json").read_text())[:n]
    turns = {str(i["id"]): teacher_turns(i, "coding") for i in manifest}
    items = load_benchmark("mat-coding", cfg)[:n]
    processor = load_processor(resolve_model_dir(cfg.path("base_model")), cfg.model.min_pixels, cfg.model.max_pixels)
    agent = eval_agent(TeacherReplay(processor), cfg)

    def scripted(env, turn: int) -> str | None:
        script = turns[str(env.item.id)]
        return script[turn - 1] if turn <= len(script) else None

    with mlflow.start_run(run_name="teacher-replay (docs)", tags={"arft.stage": "docs"}) as run, \
            tempfile.TemporaryDirectory(prefix="arft-teacher-") as scratch, \
            open_tools(cfg.sandbox, code=True) as tools:
        episodes = agent.run("mat-coding", [b.env for b in items], tools, Path(scratch), scripted=scripted)
        _, predictions = score_run(items, [e.record for e in episodes], "mat-coding", "agent")
        # Traced while the tool images are still in the scratch folder.
        return log_eval_traces(items, predictions, "mat-coding", "agent", run_id=run.info.run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--trace-id", default=None, help="trace to show (default: one with a TOOL span)")
    parser.add_argument("--teacher-replay", type=int, default=0, help="first trace N MAT-Coding test items replayed "
                        "from their teacher steps (real sandbox), for a trace with tool spans")
    args = parser.parse_args()

    import mlflow

    from arft_core.config import load_config
    from arft_core.tracking import configure

    cfg = load_config(args.params)
    uri = configure(cfg)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    trace_id = args.trace_id
    if args.teacher_replay:
        replayed = teacher_replay_traces(cfg, args.teacher_replay)
        trace_id = trace_id or next(t for t in replayed if any(
            s.span_type == "TOOL" for s in mlflow.get_trace(t).data.spans))
    if trace_id is None:
        traces = mlflow.search_traces(locations=[exp.experiment_id], return_type="list", max_results=500,
                                      filter_string="tags.`arft.mode` = 'agent'")
        with_tool = [t for t in traces if any(s.span_type == "TOOL" for s in t.data.spans)]
        trace_id = (with_tool or traces)[0].info.trace_id
    version = mlflow.MlflowClient().get_model_version_by_alias(cfg.tracking.registered_model, cfg.tracking.alias)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        eid = exp.experiment_id
        shot(f"{base}/#/experiments/{eid}/models?workflowType=machine_learning", out / "mlflow_models_tab.png", width=2400, height=700)
        shot(f"{base}/#/experiments/{eid}/models?workflowType=machine_learning", out / "mlflow_models_charts.png",
             width=1600, height=1100, script=CHART_VIEW_JS)
        shot(f"{base}/#/experiments/{eid}/traces?workflowType=machine_learning&selectedEvaluationId={trace_id}", out / "mlflow_trace.png")
        shot(f"{base}/#/models/{version.name}/versions/{version.version}?workflowType=machine_learning", out / "mlflow_model_version.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
