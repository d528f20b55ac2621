"""Hostile programs against the sandbox: each must be contained, and the host and the pool stay healthy.

The checks are on the host side: the secret is never echoed, canary files never appear outside the job folder,
the loopback servers started here never see a connection, and bombs end within the configured limits. The second
half attacks the host through the worker: forged and flooded replies, planted links, a worker taken over.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from arft_core.config import SandboxConfig
from arft_core.sandbox import SandboxPool
from arft_core.sandbox.pool import _Worker, valid_image_name
from conftest import ROOT

SECRET = "arft-secret-7f3a9c"
LIMITS = SandboxConfig(workers=2, wall_time_s=3.0, cpu_time_s=2, memory_mb=256, file_size_mb=8, open_files=32,
                       max_output_pixels=4_000_000, max_output_bytes=2048)


class Listener:
    """A loopback TCP and a UNIX-socket server counting every connection they accept."""

    def __init__(self, folder: Path):
        self.connections = 0
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.unix_path = str(folder / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        for server in (self.tcp, self.unix):
            threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server):
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.tcp.close()
        self.unix.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    os.environ["ARFT_TEST_SECRET"] = SECRET  # in the host's environment when the pool starts
    listener = Listener(outside)
    pool = SandboxPool(LIMITS)
    yield {"pool": pool, "outside": outside, "listener": listener}
    pool.close()
    listener.close()
    os.environ.pop("ARFT_TEST_SECRET", None)


def blocked(r) -> bool:
    return not r.ok and r.error is not None


# (name, code template, check(result, env) -> bool).
# Templates get {outside}, {port}, {unix}, {root}, {hostpid}, {home}, {hosttmp}.
ATTACKS = [
    ("read /etc/shadow", "print(open('/etc/shadow').read())", lambda r, e: blocked(r)),
    ("read /etc/passwd", "print(open('/etc/passwd').read())", lambda r, e: blocked(r) and "root:" not in r.stdout),
    ("read the host home", "import os; print(os.listdir('{home}'))", lambda r, e: blocked(r)),
    ("read the project", "print(open('{root}/params.yaml').read())", lambda r, e: blocked(r)),
    ("list the project", "import os; print(os.listdir('{root}'))", lambda r, e: blocked(r)),
    ("read a host secret file", "print(open('{outside}/secret.txt').read())", lambda r, e: blocked(r)),
    ("write the host temp folder", "open('{hosttmp}/arft-pwned', 'w').write('x')",
     lambda r, e: blocked(r) and not (Path(tempfile.gettempdir()) / "arft-pwned").exists()),
    ("write beside the secret", "open('{outside}/pwned', 'w').write('x')",
     lambda r, e: blocked(r) and not (e["outside"] / "pwned").exists()),
    ("write into the runtime", "open('/opt/site/pwned.py', 'w').write('x')", lambda r, e: blocked(r)),
    ("write into /usr", "open('/usr/pwned', 'w').write('x')", lambda r, e: blocked(r)),
    ("write /dev/shm", "open('/dev/shm/pwned', 'w').write('x')", lambda r, e: blocked(r)),
    ("tcp to loopback server", "import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
     lambda r, e: blocked(r)),
    ("udp to loopback", "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
     "s.sendto(b'x', ('127.0.0.1', {port}))", lambda r, e: blocked(r)),
    ("http to loopback", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}', timeout=1)",
     lambda r, e: blocked(r)),
    ("unix socket to host", "import socket; s = socket.socket(socket.AF_UNIX); s.connect('{unix}')",
     lambda r, e: blocked(r)),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", lambda r, e: blocked(r)),
    ("subprocess", "import subprocess; print(subprocess.run(['id'], capture_output=True).stdout)",
     lambda r, e: blocked(r)),
    ("os.system", "import os; rc = os.system('id > /job/id.txt'); assert rc == 0, rc", lambda r, e: blocked(r)),
    ("execv a shell", "import os; os.execv('/bin/sh', ['sh', '-c', 'id'])", lambda r, e: blocked(r)),
    ("multiprocessing", "import multiprocessing as mp; p = mp.Process(target=print); p.start(); p.join()",
     lambda r, e: blocked(r)),
    ("thread bomb", "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
     lambda r, e: blocked(r)),
    ("memory bomb", "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))", lambda r, e: blocked(r)),
    ("numpy memory bomb", "import numpy as np; a = np.ones((60000, 60000))", lambda r, e: blocked(r)),
    ("cpu-bound infinite loop", "while True:\n    pass", lambda r, e: blocked(r) and "limit" in r.error),
    ("sleep forever", "import time; time.sleep(3600)", lambda r, e: blocked(r) and "wall time" in r.error),
    ("huge stdout", "while True:\n    print('x' * 10000)",
     lambda r, e: blocked(r) and "File too large" in r.error and len(r.stdout) < 2 * LIMITS.max_output_bytes),
    ("huge file", "f = open('big.bin', 'wb')\nwhile True:\n    f.write(b'0' * (1 << 20))",
     lambda r, e: blocked(r) and "File too large" in r.error),
    ("huge output image", "from PIL import Image; Image.new('L', (3000, 3000)).save('path_to_output_image.png')",
     lambda r, e: not r.images and "rejected" in (r.error or "")),
    ("environment secrets", "import os; print(dict(os.environ))", lambda r, e: r.ok and SECRET not in r.stdout),
    ("/proc/1/environ", "print(open('/proc/1/environ').read())", lambda r, e: SECRET not in r.stdout),
    ("host process via /proc", "print(open('/proc/{hostpid}/environ').read())",
     lambda r, e: blocked(r) and SECRET not in r.stdout),
    ("/proc listing", "import os; print(sorted(p for p in os.listdir('/proc') if p.isdigit()))",
     lambda r, e: r.ok and str(os.getpid()) not in r.stdout.split("'")),
    ("signal the parent", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)", lambda r, e: True),
    ("signal pid 1 and everyone", "import os, signal\nfor pid in (1, -1):\n    try:\n        os.kill(pid, 9)\n"
     "    except OSError:\n        pass", lambda r, e: True),
    ("ctypes segfault", "import ctypes; ctypes.string_at(0)", lambda r, e: blocked(r) and "SIGSEGV" in r.error),
    ("ctypes raw socket syscall", "import ctypes; fd = ctypes.CDLL(None).syscall(41, 2, 1, 0); assert fd < 0, fd",
     lambda r, e: r.ok),
    ("ptrace pid 1", "import ctypes; rc = ctypes.CDLL(None).ptrace(16, 1, 0, 0); assert rc == 0, rc",
     lambda r, e: blocked(r)),
    ("import the project", "import arft_core", lambda r, e: blocked(r) and "No module named" in r.error),
    ("become root", "import os; os.setuid(0)", lambda r, e: blocked(r)),
    ("new user namespace", "import ctypes; rc = ctypes.CDLL(None).unshare(0x10000000); assert rc == 0, rc",
     lambda r, e: blocked(r)),
    ("chroot", "import os; os.chroot('/job')", lambda r, e: blocked(r) and "not permitted" in r.error),
    ("too many files", "fs = [open('/dev/null') for _ in range(1000)]", lambda r, e: blocked(r)),
    ("symlink a host file as output", "import os; os.symlink('/etc/hostname', 'path_to_output_image.png')",
     lambda r, e: not r.images),
    ("lock the worker out of /job", "import os; os.chmod('/job', 0)", lambda r, e: r.ok),
    ("garble its own result pipe", "import os, stat\nfor fd in range(3, 64):\n    try:\n"
     "        if stat.S_ISFIFO(os.fstat(fd).st_mode):\n            os.write(fd, b'[1]')\n    except OSError:\n"
     "        pass\nos._exit(0)", lambda r, e: blocked(r) and "could not be read" in r.error),
    ("huge exit message", "import sys; sys.exit('x' * 10_000_000)",
     lambda r, e: blocked(r) and len(r.error) <= LIMITS.max_output_bytes),
]


@pytest.mark.parametrize("name,code,check", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(env, name, code, check):
    pool, listener = env["pool"], env["listener"]
    source = code.format(outside=env["outside"], port=listener.port, unix=listener.unix_path, root=ROOT,
                         hostpid=os.getpid(), home=Path.home(), hosttmp=tempfile.gettempdir())
    started = time.monotonic()
    result = pool.run(source, [], env["outside"].parent / "out")
    elapsed = time.monotonic() - started
    assert check(result, env), f"{name}: ok={result.ok} error={result.error!r} stdout={result.stdout[:300]!r}"
    assert SECRET not in result.stdout + result.stderr + (result.error or "")
    assert listener.connections == 0
    assert sorted(p.name for p in env["outside"].iterdir()) == ["host.sock", "secret.txt"]
    # Bombs and loops end within the limits (the job, then at most the image check).
    assert elapsed < 2 * LIMITS.wall_time_s + 2
    # The pool is still healthy: every worker alive and a normal job still works.
    assert pool.healthy()
    ok = pool.run("print(6 * 7)")
    assert ok.ok and ok.stdout.strip() == "42"


def test_suite_is_large_enough():
    assert len(ATTACKS) >= 30


# ---------------------------------------------------------------- attacks on the host through the worker
WRITE_IMAGE = "from PIL import Image; Image.new('RGB', (4, 3), (9, 8, 7)).save('path_to_output_image.png')"


@pytest.fixture(scope="module")
def solo():
    """One worker, so the job after an attack runs on the same slot (where forged replies used to land)."""
    with SandboxPool(LIMITS.model_copy(update={"workers": 1})) as pool:
        yield pool


def memory_mb() -> tuple[float, float]:
    """(current resident set, peak resident set) of this process, in MB."""
    status = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]
    return int(status) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def assert_next_jobs_are_their_own(pool: SandboxPool, out: Path) -> None:
    """After an attack, a failing job fails and a working one returns its own image."""
    failing = pool.run("1 / 0")
    assert not failing.ok and failing.error.endswith("ZeroDivisionError: division by zero"), failing.error
    working = pool.run(WRITE_IMAGE, [], out)
    assert working.ok, working.error
    assert working.images == [out / "output.png"] and not working.images[0].is_symlink()
    assert Image.open(working.images[0]).size == (4, 3)
    assert pool.healthy()


def escape_setup(pool: SandboxPool, tmp_path: Path) -> tuple[Path, Path, str, Path]:
    """A 0600 victim file, an output folder, a name that, joined to the job folder, reaches the victim and,
    joined to the output folder, reaches the canary path outside it (the red-team finding, in a temp folder)."""
    victim = tmp_path / "victim" / "secret.png"
    victim.parent.mkdir()
    victim.write_bytes(b"root-only bytes")
    victim.chmod(0o600)
    ups = len(pool._workers[0].job_dir.parts) - 1  # job folder -> /
    out = tmp_path / "o1" / "o2" / "o3" / "o4" / "out"
    out.mkdir(parents=True)
    name = "../" * ups + str(victim).lstrip("/")
    canary = out.parents[ups - 1] / str(victim).lstrip("/")  # where out/name lands
    canary.parent.mkdir(parents=True, exist_ok=True)
    assert canary != victim
    return victim, out, name, canary


FORGE = """import gc, json, os, stat
# The job can read the worker's memory (it is a fork), so it finds the request and its id.
ids = [o["id"] for o in gc.get_objects() if isinstance(o, dict) and isinstance(o.get("id"), str) and "code" in o]
reply = {"id": (ids or [None])[0], "ok": True, "error": None, "stdout": "forged", "stderr": "", "warnings": [],
         "exec_ms": 1.0, "images": [{"name": n, "width": 1, "height": 1} for n in NAMES]}
line = (json.dumps(reply) + "\\n").encode() * 3
fds = list(range(65))
for path in [f"/proc/1/fd/{fd}" for fd in range(65)]:  # the worker's own descriptors
    try:
        fds.append(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass
hits = []
for fd in fds:
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, line)
            hits.append(fd)
    except OSError:
        pass
print("wrote to", hits)
"""


def test_forged_reply_is_not_taken(solo, tmp_path):
    victim, out, name, canary = escape_setup(solo, tmp_path)
    names = [name, "../../../x.png", "/x.png"]
    result = solo.run(f"NAMES = {names!r}\n" + FORGE, [], out)
    # Its own result: the forged line reached at most its own result pipe, which garbles that result.
    assert result.stdout != "forged" and result.images == [], result
    assert not result.ok and "could not be read" in result.error, result.error
    assert "wrote to [" in result.stdout and not canary.exists() and list(out.iterdir()) == []
    assert victim.read_bytes() == b"root-only bytes" and victim.stat().st_mode & 0o777 == 0o600
    assert_next_jobs_are_their_own(solo, out)


FLOOD = """import os, stat
chunk = b"x" * (1 << 20)
fds = list(range(3, 65))
for path in [f"/proc/1/fd/{fd}" for fd in range(65)]:
    try:
        fds.append(os.open(path, os.O_WRONLY))
    except OSError:
        pass
for fd in fds:
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            for _ in range(1024):  # 1 GiB, no newline
                os.write(fd, chunk)
    except OSError:
        pass
"""


def test_pipe_flood_is_bounded(solo, tmp_path):
    rss, peak = memory_mb()
    result = solo.run(FLOOD, [], tmp_path)
    assert not result.ok and "could not be read" in result.error, result.error
    now, now_peak = memory_mb()
    assert now - rss < 100 and now_peak - peak < 100, (rss, now, peak, now_peak)
    assert_next_jobs_are_their_own(solo, tmp_path)


def test_planted_links_in_the_output_folder_are_replaced_not_followed(env, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim bytes")
    out = tmp_path / "out"
    out.mkdir()
    (out / "output.png").symlink_to(victim)
    (out / "output_1.png").symlink_to(tmp_path / "created.png")  # dangling: writing through it would create it
    code = WRITE_IMAGE + "\nImage.new('L', (2, 2)).save('path_to_output_image_1.png')"
    result = env["pool"].run(code, [], out)
    assert result.ok, result.error
    assert victim.read_bytes() == b"victim bytes" and not (tmp_path / "created.png").exists()
    assert result.images == [out / "output.png", out / "output_1.png"]
    for path in result.images:
        assert path.is_file() and not path.is_symlink()
    assert Image.open(out / "output.png").size == (4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["output.png", "output_1.png"]  # no temp files left


def test_longest_output_name_is_copied(env, tmp_path):
    name = "x" * 251 + ".png"  # the longest a file name can be: the copy's temporary name must still fit
    result = env["pool"].run(f"from PIL import Image; Image.new('L', (2, 2)).save({name!r})", [], tmp_path)
    assert result.ok and result.images == [tmp_path / name], result.error
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name", ["../x.png", "/etc/shadow", "a/b.png", ".hidden.png", "x.txt", "x\0.png", "..",
                                  "", "../../../etc/shadow", "..png", "x.png/", None, 7, "x" * 252 + ".png"])
def test_bad_image_names_are_rejected(name):
    assert not valid_image_name(name)


def test_plain_image_names_are_accepted():
    for name in ("output.png", "output_3.JPG", "a..b.webp", "x.tiff"):
        assert valid_image_name(name)


# A stand-in for a worker the job took over: it answers the hand-shake, then misbehaves on its first job.
FAKE_WORKER = """import json, os, sys
mode, job_dir, victim = sys.argv[1:4]
out = sys.stdout.buffer
out.write(json.dumps({"ready": True, "layers": {}, "pid": os.getpid()}).encode() + b"\\n")
out.flush()
job = json.loads(sys.stdin.buffer.readline())
reply = {"id": job["id"], "ok": True, "error": None, "stdout": "", "stderr": "", "images": [], "warnings": [],
         "exec_ms": 1.0, "total_ms": 1.0}
line = lambda: json.dumps(reply).encode() + b"\\n"
if mode == "flood":
    chunk = b"x" * (1 << 20)
    for _ in range(1024):  # 1 GiB, no newline
        out.write(chunk)
elif mode == "wrong id":
    reply["id"] = "0" * 32
    out.write(line())
elif mode == "no id":
    del reply["id"]
    out.write(line())
elif mode == "escaping name":
    reply["images"] = [{"name": "../" * 12 + victim.lstrip("/"), "width": 1, "height": 1}]
    out.write(line())
elif mode == "linked output":
    os.symlink(victim, os.path.join(job_dir, "output.png"))
    reply["images"] = [{"name": "output.png", "width": 1, "height": 1}]
    out.write(line())
elif mode == "not json":
    out.write(b"{not json\\n")
elif mode == "wrong types":
    reply["stdout"] = ["x"]
    out.write(line())
elif mode == "two replies":
    out.write(line() + line())
out.flush()
sys.stdin.buffer.readline()  # stays until killed
"""
FAKE_MODES = ["flood", "wrong id", "no id", "escaping name", "linked output", "not json", "wrong types",
              "two replies"]


@pytest.mark.parametrize("mode", FAKE_MODES)
def test_a_misbehaving_worker_is_replaced(solo, tmp_path, monkeypatch, mode):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"victim bytes")
    victim.chmod(0o600)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(_Worker, "_command", lambda self, bwrap: [sys.executable, "-c", FAKE_WORKER, mode,
                                                                str(self.job_dir), str(victim)])
        fake = _Worker(solo.cfg, solo.root, 0, solo.bwrap)
    real = solo._idle.get()  # swap the pool's worker for the fake one
    real.kill()
    solo._workers[solo._workers.index(real)] = fake
    solo._idle.put(fake)

    rss, peak = memory_mb()
    result = solo.run("print(1)", [], out)
    now, now_peak = memory_mb()
    assert not result.ok and result.error.startswith("sandbox worker misbehaved and was replaced"), result.error
    assert result.images == [] and not out.exists()
    assert now - rss < 100 and now_peak - peak < 100, (rss, now, peak, now_peak)
    assert not fake.alive() and fake not in solo._workers  # never trusted again
    assert victim.read_bytes() == b"victim bytes"
    assert_next_jobs_are_their_own(solo, tmp_path / "next")
