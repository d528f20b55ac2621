"""Hostile programs against the sandbox: each must be contained, and the host and the pool stay healthy.

The checks are on the host side: the secret is never echoed, canary files never appear outside the job folder,
the loopback servers started here never see a connection, and bombs end within the configured limits.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from arft_core.config import SandboxConfig
from arft_core.sandbox import SandboxPool
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
