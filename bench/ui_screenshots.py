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


def shot(url: str, path: Path, size: str = "1600,1000", wait_ms: int = 20000) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=120)
    print(f"{path}: {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None)
    parser.add_argument("--out", default="docs/images")
    parser.add_argument("--trace-id", default=None, help="trace to show (default: one with a TOOL span)")
    args = parser.parse_args()

    import mlflow

    from arft_core.config import load_config
    from arft_core.tracking import configure

    cfg = load_config(args.params)
    uri = configure(cfg)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    trace_id = args.trace_id
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
        shot(f"{base}/#/experiments/{eid}/models", out / "mlflow_models_tab.png")
        shot(f"{base}/#/experiments/{eid}/traces?selectedEvaluationId={trace_id}", out / "mlflow_trace.png")
        shot(f"{base}/#/models/{version.name}/versions/{version.version}", out / "mlflow_model_version.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
