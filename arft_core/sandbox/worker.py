"""Fork-server that runs inside the sandbox (bubblewrap). Standalone on purpose: it imports nothing from
arft_core, which is not visible inside the sandbox.

Start-up: import numpy/PIL/cv2 once, drop to the unprivileged uid, report the isolation layers it can see.
Per job (one JSON line on stdin): fork a child that gets its own process group, rlimits and a seccomp filter,
then runs the model's code in /job; a second forked child checks the images it wrote. One JSON line goes back,
carrying the job's `id`. The children are forks, not execs: each closes every inherited descriptor but its own
result pipe, so a job can neither write the worker's reply channel nor read the next request.
"""

import ctypes
import errno
import json
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback

JOB_DIR = "/job"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CLONE_THREAD = 0x00010000
RESULT_CAP = 1 << 16  # bytes a child may send back; a child saying more is killed and its result dropped

# ---------------------------------------------------------------- seccomp (libseccomp through ctypes)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7


def SCMP_ACT_ERRNO(err):
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


# Denied outright (EPERM): network, new programs and processes, other processes' memory, kernel state.
DENIED = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "execve", "execveat", "fork",
    "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon", "swapoff", "syslog",
    "acct", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "personality", "tkill",
    "name_to_handle_at", "open_by_handle_at", "quotactl", "mknod", "mknodat", "ioperm", "iopl", "settimeofday",
    "clock_settime", "sethostname", "setdomainname", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
)


def load_libseccomp():
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2


class SeccompFilter:
    """Default-allow filter with the deny list above (threads yes, processes no), compiled to BPF once in the
    worker so that each job only pays two prctl calls.

    Signals need no rule: in the private pid namespace a job sees only itself and the worker, which is PID 1
    there, and the kernel drops signals to PID 1 that it has no handler for (SIGINT is ignored in main()).
    """

    def __init__(self, lib):
        ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
        if not ctx:
            raise OSError("seccomp_init failed")
        eperm = SCMP_ACT_ERRNO(errno.EPERM)
        for name in DENIED:
            self._rule(lib, ctx, eperm, name)
        self._rule(lib, ctx, eperm, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, 0))  # not a thread
        self._rule(lib, ctx, SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")  # glibc falls back to clone(), above
        r, w = os.pipe()
        rc = lib.seccomp_export_bpf(ctx, w)
        os.close(w)
        bpf = b""
        while chunk := os.read(r, 1 << 16):
            bpf += chunk
        os.close(r)
        lib.seccomp_release(ctx)
        if rc < 0 or not bpf:
            raise OSError(-rc, "seccomp_export_bpf failed")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.addressof(self._buf))
        self._libc = ctypes.CDLL(None, use_errno=True)

    @staticmethod
    def _rule(lib, ctx, action, name, *cmps):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # syscall unknown on this architecture
        arr = (_ArgCmp * max(1, len(cmps)))(*cmps)
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name} failed")

    def install(self):
        if self._libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
        if self._libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP failed")


# ---------------------------------------------------------------- limits and privileges
def vm_size_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def apply_limits(limits, base_vm):
    mb = 1024 * 1024
    for name, soft, hard in (
        ("RLIMIT_CPU", limits["cpu_time_s"], limits["cpu_time_s"] + 1),
        ("RLIMIT_AS", base_vm + limits["memory_mb"] * mb, base_vm + limits["memory_mb"] * mb),
        ("RLIMIT_FSIZE", limits["file_size_mb"] * mb, limits["file_size_mb"] * mb),
        ("RLIMIT_NOFILE", limits["open_files"], limits["open_files"]),
        ("RLIMIT_NPROC", limits["max_processes"], limits["max_processes"]),
        ("RLIMIT_CORE", 0, 0),
    ):
        resource.setrlimit(getattr(resource, name), (soft, hard))


def drop_privileges(uid):
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    # Jobs run as this same uid: non-dumpable, the worker's /proc/1/fd (its protocol pipes) and /proc/1/mem are
    # closed to them. The uid switch above already does this; an unprivileged (rootless) worker needs it said.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_DUMPABLE failed")


# ---------------------------------------------------------------- one job
def is_output_name(name):
    """A plain image file name: no folder part, not hidden, an image extension. The host checks the same."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".") and "/" not in name
            and "\0" not in name and name.lower().endswith(IMAGE_EXTS))


def _read_capped(path, cap):
    # The job may have swapped the file for a link (to a device, or to /proc/self/fd/...): regular files only.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        size, data = st.st_size, os.read(fd, cap)
    except OSError:
        return ""
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace")
    return text + (f"\n... [truncated: {size} bytes in all]" if size > cap else "")


def _user_traceback(exc, cap):
    """The traceback restricted to the model's own code, so the error fed back is about its code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<model-code>"]
    lines = [f"line {f.lineno}: {f.line}" for f in frames[-3:] if f.line]
    msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return ("\n".join(lines + [msg]))[:cap]


def _close_inherited_fds(keep):
    """In a forked child: close every descriptor above stderr except `keep` (its own result pipe). This takes
    the worker's request and reply pipes away from the job; close-on-exec would not, as nothing is exec'd."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:  # the descriptor listdir itself used
                pass


def _fork_limited(limits, base_vm, seccomp, body):
    """Run body() in a child with its own process group, rlimits and seccomp; returns (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        result = {"error": None}
        try:
            _close_inherited_fds(w)  # first of all, before any of the job's code can run
            os.setpgid(0, 0)
            os.chdir(JOB_DIR)
            for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
                out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(out, fd)
                os.close(out)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversized writes raise instead of killing
            apply_limits(limits, base_vm)
            if seccomp is not None:
                seccomp.install()
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            result.update(body() or {})
        except SystemExit as exc:
            if exc.code not in (None, 0):
                result["error"] = f"SystemExit: {exc.code}"[: limits["max_output_bytes"]]
        except BaseException as exc:  # the model's code may raise anything; it becomes the error text
            result["error"] = _user_traceback(exc, limits["max_output_bytes"])
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # e.g. the file-size limit hit by a flood of output; already reported
                pass
        try:
            os.write(w, json.dumps(result).encode()[:RESULT_CAP])
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _wait(pid, r, deadline):
    """Wait for the child until `deadline`; kill its whole process group on time-out or when it sends more than
    RESULT_CAP bytes. Returns (status, timed_out, result dict or None)."""
    # The child holds the pipe's write end until it exits: EOF on it means the job is over.
    timed_out, flooded, data = False, False, b""
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            timed_out = True
            break
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        data += chunk
        if len(data) > RESULT_CAP:
            flooded = True
            break
    os.close(r)
    if timed_out or flooded:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    try:
        os.killpg(pid, signal.SIGKILL)  # nothing of the job may outlive it
    except (ProcessLookupError, PermissionError):
        pass
    if not data:
        return status, timed_out, None
    # The job's own code can write this pipe too: whatever it sent, an object with a text `error` or nothing.
    try:
        result = None if flooded else json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: deeply nested brackets
        result = None
    if not isinstance(result, dict) or not isinstance(result.get("error"), (str, type(None))):
        result = {"error": "the job's result could not be read (garbled or oversized)"}
    return status, timed_out, result


def _death_reason(status, timed_out, limits):
    if timed_out:
        return f"killed: wall time limit of {limits['wall_time_s']} s exceeded"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return f"killed: CPU time limit of {limits['cpu_time_s']} s exceeded (signal {signal.Signals(sig).name})"
        return f"crashed: signal {signal.Signals(sig).name}"
    return f"exited abnormally (status {status})"


def run_job(job, limits, base_vm, seccomp):
    inputs = set(job["inputs"]) | {"stdout.txt", "stderr.txt"} | {job.get("alias_inputs") or ""}
    started = time.perf_counter()
    code = job["code"]

    def execute():
        import linecache

        linecache.cache["<model-code>"] = (len(code), None, code.splitlines(True), "<model-code>")
        compiled = compile(code, "<model-code>", "exec")
        exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})  # sandboxed child process

    pid, r = _fork_limited(limits, base_vm, seccomp, execute)
    status, timed_out, result = _wait(pid, r, time.monotonic() + limits["wall_time_s"])
    exec_ms = (time.perf_counter() - started) * 1000
    try:
        os.chmod(JOB_DIR, 0o700)  # the job owns /job and may have locked the worker out of it
    except OSError:
        pass
    error = result.get("error") if result is not None else _death_reason(status, timed_out, limits)
    if result is not None and isinstance(error, str) and error.startswith("MemoryError"):
        error = f"{error} (memory limit {limits['memory_mb']} MB)"
    stdout = _read_capped(os.path.join(JOB_DIR, "stdout.txt"), limits["max_output_bytes"])
    stderr = _read_capped(os.path.join(JOB_DIR, "stderr.txt"), limits["max_output_bytes"])

    written = sorted(n for n in os.listdir(JOB_DIR) if is_output_name(n) and n not in inputs
                     and stat.S_ISREG(os.lstat(os.path.join(JOB_DIR, n)).st_mode))  # no links, no folders

    def check_images():
        # A fresh child decodes the outputs, so the host only ever receives images proven to decode.
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = limits["max_output_pixels"]
        images, problems = [], []
        for name in written[: limits["max_output_images"]]:
            try:
                with Image.open(name) as im:
                    w, h = im.size
                    if w * h > limits["max_output_pixels"]:
                        raise ValueError(f"{w}x{h} exceeds {limits['max_output_pixels']} pixels")
                    im.load()
                images.append({"name": name, "width": w, "height": h})
            except Exception as exc:  # undecodable or oversized output
                problems.append(f"output image {name} rejected: {type(exc).__name__}: {exc}"[:300])
        if len(written) > limits["max_output_images"]:
            problems.append(f"only the first {limits['max_output_images']} of {len(written)} images were kept")
        return {"images": images, "problems": problems}

    images, problems = [], []
    if written:
        pid, r = _fork_limited(limits, base_vm, seccomp, check_images)
        status, timed_out, checked = _wait(pid, r, time.monotonic() + limits["wall_time_s"])
        if checked is not None and checked.get("error") is None:
            images, problems = checked.get("images") or [], checked.get("problems") or []
        else:
            problems = ["output images could not be checked: "
                        + ((checked or {}).get("error") or _death_reason(status, timed_out, limits))]
    if error is None and problems and not images:
        error = "; ".join(problems)
    return {"ok": error is None, "error": error, "stdout": stdout, "stderr": stderr, "images": images,
            "warnings": problems, "exec_ms": round(exec_ms, 3),
            "total_ms": round((time.perf_counter() - started) * 1000, 3)}


# ---------------------------------------------------------------- start-up and loop
def _in_child(check):
    """True when check() returns True in a forked child (so that a probe changes nothing in the worker)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if check() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def probe_layers(canaries, seccomp, limits, base_vm):
    """What this process can observe of its own isolation (reported to the host at start-up). Every layer is
    checked here; one that cannot be checked is reported absent (no canaries: the host filesystem is not hidden)."""

    def limits_hold():
        apply_limits(limits, base_vm)
        return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] == limits["open_files"]
                and resource.getrlimit(resource.RLIMIT_CPU)[0] == limits["cpu_time_s"])

    layers = {
        "unprivileged_uid": os.geteuid() != 0,
        "no_network": _interfaces() <= {"lo"},
        "private_pids": os.getpid() <= 2,
        "host_fs_hidden": bool(canaries) and not any(os.path.exists(c) for c in canaries),
        "rlimits": _in_child(limits_hold),
        "seccomp": False,
    }
    if seccomp is not None:
        def socket_blocked():
            seccomp.install()
            return ctypes.CDLL(None).socket(2, 1, 0) < 0

        layers["seccomp"] = _in_child(socket_blocked)
    return layers


def _interfaces():
    """Network interfaces visible here; a fresh network namespace has only `lo` (and it is down)."""
    with open("/proc/net/dev") as f:
        return {line.split(":")[0].strip() for line in f.readlines()[2:] if ":" in line}


def main():
    config = json.loads(sys.argv[1])
    limits = config["limits"]
    for module in config.get("preload", []):
        __import__(module)
    try:
        import cv2

        cv2.setNumThreads(1)  # one job, one core: the pool gives parallelism
    except ImportError:
        pass
    try:
        from PIL import Image

        Image.init()  # load every format plugin once here, not in each forked job (~15 ms each time)
    except ImportError:
        pass
    lib = load_libseccomp() if config.get("seccomp", True) else None
    seccomp = SeccompFilter(lib) if lib is not None else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as PID 1, only handled signals could reach the worker
    drop_privileges(config["uid"])
    base_vm = vm_size_bytes()
    # The protocol moves off fds 0/1 (each job child closes everything above 2 but its own result pipe).
    requests = os.fdopen(os.dup(0), "r")
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # stray prints of the worker itself must not corrupt the protocol stream
    layers = probe_layers(config.get("canaries", []), seccomp, limits, base_vm)
    proto_out.write(json.dumps({"ready": True, "layers": layers, "pid": os.getpid()}) + "\n")
    for line in requests:
        job = json.loads(line)
        try:
            result = run_job(job, limits, base_vm, seccomp)
        except Exception as exc:  # a worker fault must reach the host as a result, not as silence
            result = {"ok": False, "error": f"sandbox worker fault: {type(exc).__name__}: {exc}", "stdout": "",
                      "stderr": "", "images": [], "warnings": [], "exec_ms": 0.0, "total_ms": 0.0, "fault": True}
        result["id"] = job.get("id")  # ties the reply to its request: the host drops a worker whose id is off
        proto_out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
