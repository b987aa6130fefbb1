"""The Python tool: run model-written code in a separate, limited process.

    >>> r = run_python("x = 6*7\\nprint('hi')\\nx")
    >>> r.stdout, r.error
    ('hi\\n42\\n', '')

What comes back (`SandboxResult.text()`, what the model sees): stdout, then the repr of the last
expression if it is not None (like the REPL), then the error: the traceback of the model's own code,
or a one-line reason the process was stopped (timeout, CPU limit, memory, output size). Every run
gets a fresh interpreter; nothing persists between calls.

Protections, and which layer enforces them. "Hard" means the kernel enforces it whatever the code
does; "soft" means a Python audit hook (PEP 578) in the child refuses the operation: it stops
ordinary code (`os.system`, `socket`, `open('/x', 'w')`, `os.fork`), but code that reaches libc
without Python's audited entry points (ctypes is blocked too, but a C extension that was already
importable is not) could get past it. Treat soft layers as a guard against accidents and confused
models, and run untrusted *adversarial* code in a container or VM on top of this.

| threat | hard (kernel) | soft (audit hook) |
| --- | --- | --- |
| infinite loop | wall-clock timeout: the parent kills the process group (and the pids cgroup); RLIMIT_CPU | - |
| allocate 10 GB | RLIMIT_AS (virtual memory) -> MemoryError | - |
| print 100 MB | the parent stops reading at `max_output_bytes`, kills the child, truncates | - |
| fork bomb | a pids cgroup with pids.max (root with a writable cgroup fs), else RLIMIT_NPROC (non-root only: root ignores it) | os.fork / subprocess / os.system / exec refused |
| network | a new network namespace with no interfaces (root, or an unprivileged user namespace where the kernel allows it) | socket creation / connect refused |
| write outside its folder | RLIMIT_FSIZE caps file size; as root nothing else (see below) | open-for-write / remove / rename / mkdir outside the private folder refused |
| read secrets from env | the environment is replaced (PATH, HOME=its folder, LANG, thread caps) | - |
| huge files in its folder | RLIMIT_FSIZE; the folder is deleted afterwards | - |

Why not drop root privileges: on this machine Python lives under /root (mode 700), which the
`nobody` user cannot execute, so switching users would break the interpreter. When the interpreter
is reachable by `nobody` (a system Python), set `user="nobody"` and file writes outside world-writable
places become a hard protection too. `protections()` reports what is active on the current machine.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


@dataclass
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock for the whole run
    cpu_s: int = 5  # RLIMIT_CPU (the kernel sends SIGXCPU, then SIGKILL a second later)
    memory_mb: int = 1024  # RLIMIT_AS: virtual address space (Python + numpy fit in ~300 MB)
    max_processes: int = 16  # pids cgroup / RLIMIT_NPROC
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the code may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 64_000  # stop reading (and kill) after this much stdout+stderr
    max_output_chars: int = 4_000  # what goes back to the model (head and tail kept)
    network: bool = False  # True skips the network namespace and the socket hook
    audit_hook: bool = True  # the soft layer; tests switch it off to check the hard layers alone
    user: str = ""  # run as this user (root only), e.g. "nobody"; see the module docstring


@dataclass
class SandboxResult:
    stdout: str = ""
    error: str = ""  # stderr: traceback of the code, or why it was stopped
    returncode: int | None = None
    timed_out: bool = False
    truncated: bool = False
    seconds: float = 0.0
    killed_reason: str = ""
    limits: SandboxLimits = field(default_factory=SandboxLimits)

    def text(self) -> str:
        """What the model sees: stdout, then the error, cut to max_output_chars (head and tail)."""
        out = self.stdout
        if self.error:
            out = (out + ("\n" if out and not out.endswith("\n") else "") + self.error)
        n = self.limits.max_output_chars
        if len(out) > n:
            head, tail = out[: n * 3 // 4], out[-(n // 4):]
            out = f"{head}\n...[{len(out) - len(head) - len(tail)} characters cut]...\n{tail}"
        return out if out.strip() else "(no output)"


# ----------------------------------------------------------------------------------------------
# The child: a bootstrap run with `python -I -B -c BOOT`; it reads the code from stdin.

_BOOT = r'''
import ast, os, sys, traceback
code = sys.stdin.read()
sys.stdin.close()
HOME = os.path.realpath(os.getcwd())
if sys.argv[1:2] == ["hook"]:
    NET = sys.argv[2:3] == ["nonet"]
    DENY = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.call_function", "os.chroot", "os.setuid", "sys.addaudithook"}
    NETEV = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
             "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request"}
    PATHEV = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
              "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _real, _fspath, _str = os.path.realpath, os.fspath, str
    def inside(p):
        try:
            p = _real(_fspath(p))
        except Exception:
            return False
        return p == HOME or p.startswith(HOME + "/")
    armed = [False]
    def hook(event, args):
        if not armed[0]:
            return
        if event in DENY:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if NET and event in NETEV:
            raise PermissionError(f"sandbox: network access ({event}) is not allowed")
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in _str(mode) for c in "wax+") or flags & WRITE) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {args[0]}")
        if event in PATHEV:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    raise PermissionError(f"sandbox: {event} outside the working folder is not allowed: {p}")
    import ctypes  # ctypes dlopens the interpreter itself at import (numpy needs it); do it before arming
    sys.addaudithook(hook)
    armed[0] = True
try:
    tree = ast.parse(code, "<code>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(tree, "<code>", "exec"), g)
    if last is not None:
        value = eval(compile(last, "<code>", "eval"), g)
        if value is not None:
            print(repr(value))
except BaseException as e:
    if isinstance(e, SystemExit) and e.code in (None, 0):
        sys.exit(0)
    # Show the model its own code's frames only (not the bootstrap's, the hook's or the library's).
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<code>"]
    lines = (["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else [])
    lines += traceback.format_exception_only(type(e), e)
    sys.stdout.flush()
    sys.stderr.write("".join(lines))
    sys.stderr.flush()
    os._exit(1)
'''


# ----------------------------------------------------------------------------------------------
# What the kernel can do for us here.


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _can_unshare_net() -> str:
    """'root', 'userns' or '' : how (or whether) a child can get its own empty network namespace."""
    if sys.platform != "linux":
        return ""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    try:  # try it in a throwaway child
        r = subprocess.run([sys.executable, "-c", f"import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare({flags}))"],
                           capture_output=True, timeout=10)
        return ("root" if os.geteuid() == 0 else "userns") if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _pids_cgroup_root() -> Path | None:
    """A cgroup folder where we may create children with a pids.max (v1 pids hierarchy or v2)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return None
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
        if not (root / "cgroup.procs").exists() or not os.access(root, os.W_OK):
            continue
        if root.name != "pids":  # cgroup v2: pids must be enabled for the children of the root
            ctl = root / "cgroup.subtree_control"
            if not ctl.exists() or "pids" not in ctl.read_text().split():
                continue
        probe = root / f"chatforge-probe-{os.getpid()}"
        try:
            probe.mkdir()
            ok = (probe / "pids.max").exists()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return root
    return None


_CAPS: dict | None = None


def protections() -> dict[str, str]:
    """What enforces each limit on this machine (computed once per process)."""
    global _CAPS
    if _CAPS is None:
        net = _can_unshare_net()
        cg = _pids_cgroup_root()
        _CAPS = {
            "network": f"hard: network namespace ({net})" if net else "soft: audit hook only",
            "fork": (f"hard: pids cgroup under {cg}" if cg else
                     "hard: RLIMIT_NPROC" if os.geteuid() != 0 else "soft: audit hook only (root ignores RLIMIT_NPROC)"),
            "memory": "hard: RLIMIT_AS",
            "cpu": "hard: RLIMIT_CPU + wall-clock kill",
            "files": "soft: audit hook (writes outside the folder); hard: RLIMIT_FSIZE",
            "_net": net, "_cgroup": str(cg or ""),
        }
    return _CAPS


# ----------------------------------------------------------------------------------------------
# Running


def _count_user_processes(uid: int) -> int:
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if d.stat().st_uid == uid:
                    n += len(list((d / "task").iterdir()))
            except OSError:
                pass
    return n


def _preexec(limits: SandboxLimits, net_mode: str, cgroup: Path | None, user: pwd.struct_passwd | None,
             nproc: int):
    """Runs in the child between fork and exec: join the cgroup, leave the network, set rlimits,
    drop privileges. Only async-signal-safe-ish work: no imports, no locks."""
    import resource

    def run():
        if cgroup is not None:
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        if net_mode == "root":
            if _libc().unshare(CLONE_NEWNET) != 0:
                os._exit(97)
        elif net_mode == "userns":
            uid, gid = os.getuid(), os.getgid()
            if _libc().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
                os._exit(97)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb * mb, limits.max_file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return run


def _kill_all(proc: subprocess.Popen, cgroup: Path | None) -> None:
    """SIGKILL the child's process group and everything in its cgroup (children that left the group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        for _ in range(50):
            try:
                pids = [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a fresh limited interpreter (see the module docstring) and collect its output."""
    limits = limits or SandboxLimits()
    caps = protections()
    net_mode = "" if limits.network else caps["_net"]
    res = SandboxResult(limits=limits)
    user = None
    if limits.user:
        if os.geteuid() != 0:
            raise ValueError("SandboxLimits.user needs the host to run as root")
        user = pwd.getpwnam(limits.user)
    workdir = Path(tempfile.mkdtemp(prefix="chatforge-py-"))
    cgroup = None
    if caps["_cgroup"]:
        cgroup = Path(caps["_cgroup"]) / f"chatforge-sandbox-{os.getpid()}-{workdir.name}"
        try:
            cgroup.mkdir()
            (cgroup / "pids.max").write_text(str(limits.max_processes))
        except OSError:
            cgroup = None
    nproc = 0
    if os.geteuid() != 0 or user is not None:  # root ignores RLIMIT_NPROC; it counts all the user's tasks
        uid = user.pw_uid if user is not None else os.getuid()
        nproc = _count_user_processes(uid) + limits.max_processes
    if user is not None:
        os.chown(workdir, user.pw_uid, user.pw_gid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
           "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    argv = [sys.executable, "-I", "-B", "-c", _BOOT]
    if limits.audit_hook:
        argv += ["hook", "nonet" if not limits.network else "net"]
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=env, start_new_session=True, close_fds=True,
                                preexec_fn=_preexec(limits, net_mode, cgroup, user, nproc))
    except (OSError, subprocess.SubprocessError) as e:
        shutil.rmtree(workdir, ignore_errors=True)
        if cgroup is not None:
            cgroup.rmdir()
        res.error = f"sandbox: could not start the interpreter ({e})"
        return res
    try:
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        sel = selectors.DefaultSelector()
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        deadline = t0 + limits.timeout_s
        total = 0
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                res.timed_out = True
                res.killed_reason = f"timed out after {limits.timeout_s:g} s (wall clock); the process was killed"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                take = max(0, limits.max_output_bytes - total)
                bufs[key.fileobj] += chunk[:take]
                total += len(chunk)
                if total > limits.max_output_bytes:
                    res.truncated = True
                    res.killed_reason = (f"output exceeded {limits.max_output_bytes:,} bytes; the process was "
                                         f"stopped and its output truncated")
                    break
            if res.truncated:
                break
        sel.close()
        if res.killed_reason:
            _kill_all(proc, cgroup)
        try:
            proc.wait(timeout=max(0.5, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            res.timed_out = True
            res.killed_reason = f"timed out after {limits.timeout_s:g} s (wall clock); the process was killed"
            _kill_all(proc, cgroup)
            proc.wait()
        _kill_all(proc, cgroup)  # leftovers (grandchildren) never outlive a call
    finally:
        for f in (proc.stdout, proc.stderr):
            f.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        if cgroup is not None:
            for _ in range(100):
                try:
                    cgroup.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)
    res.seconds = time.monotonic() - t0
    res.returncode = proc.returncode
    res.stdout = bufs[proc.stdout].decode("utf-8", errors="replace")
    res.error = bufs[proc.stderr].decode("utf-8", errors="replace")
    rc = proc.returncode
    if not res.killed_reason and rc is not None and rc < 0:
        sig = -rc
        res.killed_reason = {
            signal.SIGXCPU: f"CPU time limit ({limits.cpu_s} s) exceeded; the process was killed",
            signal.SIGKILL: f"killed (CPU limit {limits.cpu_s} s or memory limit {limits.memory_mb} MB)",
            signal.SIGXFSZ: f"file size limit ({limits.max_file_mb} MB) exceeded",
            signal.SIGSEGV: "crashed (segmentation fault)",
        }.get(sig, f"killed by signal {signal.Signals(sig).name}")
    if rc == 97 and not res.stdout:
        res.killed_reason = "sandbox: could not isolate the network; refusing to run"
    if res.killed_reason:
        res.error = (res.error + ("\n" if res.error and not res.error.endswith("\n") else "")
                     + f"[sandbox] {res.killed_reason}\n")
    return res


def python_tool(limits: SandboxLimits | None = None):
    """The `python` Tool for the registry: runs the call text as code, returns `SandboxResult.text()`."""
    from chatforge.tools import Tool

    lim = limits or SandboxLimits()
    return Tool("python", "run Python code in a sandbox; prints stdout and the value of the last expression",
                lambda code: run_python(code, lim).text(), timeout_s=lim.timeout_s + 10)
