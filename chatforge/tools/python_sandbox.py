"""The Python tool: run model-written code under operating-system isolation the code cannot undo.

    >>> r = run_python("x = 6*7\\nprint('hi')\\nx")
    >>> r.stdout, r.error
    ('hi\\n42\\n', '')

What comes back (`SandboxResult.text()`, what the model sees): stdout, then the repr of the last
expression if it is not None (like the REPL), then the error: the traceback of the model's own code,
or a one-line reason the process was stopped (timeout, CPU limit, memory, output size). Every run
gets a fresh interpreter; nothing persists between calls.

Isolation (issue #10): every run is a bubblewrap sandbox (`bwrap`, Debian package `bubblewrap`, the
sandbox Flatpak is built on). The protections come from the kernel, set up before the code starts:

| what | how |
| --- | --- |
| its own user | host uid `nobody` (65534) when the host runs as root, else the caller's own uid; no capabilities, no new privileges (setuid bits do nothing), no nested user namespaces |
| processes and signals | its own pid namespace: it sees and can signal only its own processes; its own /proc (the host's environments are not there); the whole tree dies when the call ends, times out, or the calling process dies (`--die-with-parent`) |
| files | a read-only view of /usr, the /lib* links, a short list of /etc files, and the interpreter's own folders (prefix, venv); nothing else of the host exists inside: no /root, /home, /work, data dir, repository, /sys; a private writable /tmp (tmpfs of `scratch_mb`, also its cwd and HOME) that vanishes with the sandbox |
| network | its own network namespace with nothing but its own loopback (`network=True` shares the host's) |
| resources | hard rlimits set before the code runs (CPU seconds, address space, processes, file size, open files; an unprivileged process cannot raise them); a pids cgroup where the host allows one; the parent reads at most `max_output_bytes` and kills the rest; a wall-clock timeout kills everything |
| environment | cleared; a minimal PATH/HOME/LANG/thread-cap set |

Why a root host needs a helper: bwrap run by root would map the sandbox to host uid 0 (no
capabilities, but still the owner of every root-owned file it can see). So root drops to `nobody`
first. But the interpreter often lives under /root (mode 0700), which `nobody` cannot reach, and
bwrap resolves every bind source with its caller's permissions (even `--ro-bind-fd`: it realpath()s
/proc/self/fd/N). So a small helper, still root, bind-mounts the needed folders into a tmpfs in a
throwaway mount namespace of its own (nothing changes on the host), then switches to `nobody` and
execs bwrap, which runs unprivileged as it does for any user. `CHATFORGE_BWRAP` names another bwrap
binary (default: `bwrap` on PATH).

Where bubblewrap cannot run (not installed, user namespaces disabled, not Linux) the tool refuses
with `SandboxUnavailable`, naming the fix, unless the caller opts in to running model code WITHOUT
isolation: `SandboxLimits(unsafe_no_isolation=True)` or the environment variable
`CHATFORGE_UNSAFE_PYTHON_TOOL=1`. Then only rlimits, a scrubbed environment, a scratch folder and
the audit hook apply, and the code acts on the host with the caller's rights.

The audit hook (PEP 578, `audit_hook=True`) is a courtesy layer: it turns `os.system`, `subprocess`,
sockets and writes outside the scratch folder into a clear `PermissionError` for confused models. Any
code can switch it off; the isolation above never depends on it.

`protections()` reports what holds on the current machine; `cleanup_leftovers()` (run before every
call) removes scratch folders and cgroups left by a process that crashed mid-call.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

UNSAFE_ENV = "CHATFORGE_UNSAFE_PYTHON_TOOL"
NOBODY = 65534  # the conventional unprivileged uid/gid; also the uid the code sees inside the sandbox
_SCRATCH_PREFIX = "chatforge-py-"  # unsafe mode's host scratch folders: chatforge-py-<pid>-XXXX
_CGROUP_PREFIX = "chatforge-sandbox-"  # per-run cgroups: chatforge-sandbox-<pid>-<n>
_STALE_AFTER_S = 1.0  # a leftover must be at least this old (its creator locks it right after mkdir)


class SandboxUnavailable(RuntimeError):
    """No operating-system isolation on this machine and no opt-in to run without it."""


@dataclass
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock for the whole run
    cpu_s: int = 5  # RLIMIT_CPU (the kernel sends SIGXCPU, then SIGKILL a second later)
    memory_mb: int = 1024  # RLIMIT_AS per process: virtual address space (Python + numpy fit in ~300 MB)
    max_processes: int = 16  # RLIMIT_NPROC inside the sandbox's own user namespace (threads count) + pids cgroup
    max_file_mb: int = 16  # RLIMIT_FSIZE: largest file the code may write
    max_open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 64_000  # stop reading (and kill) after this much stdout+stderr
    max_output_chars: int = 4_000  # what goes back to the model (head and tail kept)
    scratch_mb: int = 64  # size of the private writable /tmp (a tmpfs: RAM, gone after the call)
    network: bool = False  # True shares the host's network (and binds /etc/resolv.conf, /etc/ssl)
    audit_hook: bool = True  # the courtesy layer (clear errors for os.system, sockets, ...); never the protection
    user: str = ""  # host user the sandbox runs as when the host is root ('' = nobody); name or uid
    # where bubblewrap cannot run, run anyway WITHOUT isolation (same as $CHATFORGE_UNSAFE_PYTHON_TOOL=1)
    unsafe_no_isolation: bool = False


@dataclass
class SandboxResult:
    stdout: str = ""
    error: str = ""  # stderr: traceback of the code, or why it was stopped
    returncode: int | None = None
    timed_out: bool = False
    truncated: bool = False
    seconds: float = 0.0
    killed_reason: str = ""
    isolated: bool = True  # False when it ran without isolation (the unsafe opt-in)
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
# The child: `python -I -B -c BOOT LIMITS_JSON`; it reads the code from stdin. It sets the hard
# rlimits before anything of the model's runs (without CAP_SYS_RESOURCE, which nothing in the sandbox
# has, a hard limit can only go down), then arms the courtesy hook and runs the code REPL-style.

_BOOT = r'''
import ast, json, os, resource, sys, traceback
def _setup():
    lim = json.loads(sys.argv[1])
    mb = 1024 * 1024
    for name, value in (("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
                        ("RLIMIT_AS", (lim["memory_mb"] * mb,) * 2),
                        ("RLIMIT_FSIZE", (lim["max_file_mb"] * mb,) * 2),
                        ("RLIMIT_NOFILE", (lim["max_open_files"],) * 2),
                        ("RLIMIT_NPROC", (lim["max_processes"],) * 2),
                        ("RLIMIT_CORE", (0, 0))):
        try:
            resource.setrlimit(getattr(resource, name), value)
        except (ValueError, OSError, AttributeError) as e:
            if lim["strict"]:  # isolated runs refuse rather than run without a limit
                sys.stderr.write(f"[sandbox] could not set {name}: {e}; refusing to run\n")
                os._exit(125)
    code = sys.stdin.read()
    sys.stdin.close()
    if not lim["audit_hook"]:
        return code
    home = os.path.realpath(os.getcwd())
    nonet = not lim["network"]
    deny = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.call_function", "os.chroot", "os.setuid", "sys.addaudithook"}
    netev = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
             "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request"}
    pathev = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
              "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    real, fspath, str_ = os.path.realpath, os.fspath, str
    exists, dirname, access, W_OK = os.path.exists, os.path.dirname, os.access, os.W_OK

    def inside(p):
        try:
            p = real(fspath(p))
        except Exception:
            return False
        if not (p == home or p.startswith(home + "/")):
            return False
        # Under the scratch folder, but maybe inside a read-only bind of the interpreter's folders (a venv
        # that lives under /tmp on the host shows up under the sandbox's /tmp too): writable only where
        # the nearest existing folder is.
        d = p
        while d != home and not exists(d):
            d = dirname(d)
        return access(d, W_OK)

    def hook(event, args):
        if event in deny:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if nonet and event in netev:
            raise PermissionError(f"sandbox: network access ({event}) is not allowed")
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if (any(c in str_(mode) for c in "wax+") or flags & write) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing outside the working folder is not allowed: {args[0]}")
        if event in pathev:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p):
                    raise PermissionError(f"sandbox: {event} outside the working folder is not allowed: {p}")
    import ctypes  # ctypes dlopens the interpreter itself at import (numpy needs it); do it before the hook
    sys.addaudithook(hook)
    return code
code = _setup()
del _setup
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

# The launcher: `python -I -S -c HELPER SPEC_JSON`, a fresh single-threaded process (no preexec_fn,
# which is unsafe in a threaded engine). It joins the run's cgroups; as root it stages the bind
# sources (see the module docstring) and drops to the sandbox user; then it execs bwrap (or, in the
# unsafe mode, the interpreter). Exit 126 with one line on stderr when a step fails.
_HELPER = r'''
import json, os, sys
spec = json.loads(sys.argv[1])
def fail(what, e):
    sys.stderr.write(f"[sandbox] {what}: {e}\n")
    os._exit(126)
for cg in spec["cgroups"]:
    try:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        fail(f"could not join the cgroup {cg}", e)
if spec["stage"] is not None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x20000, 2, 4, 4096, 16384, 1 << 18
    def ok(rc, what):
        if rc != 0:
            fail(what, os.strerror(ctypes.get_errno()))
    ok(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")  # a mount namespace of this process alone
    ok(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")  # nothing propagates to the host
    try:  # opened before the tmpfs covers the staging folder: a source may live under it
        fds = [os.open(src, os.O_PATH) for src in spec["stage"]]
    except OSError as e:
        fail("could not open a folder to share", e)
    stage = spec["stage_dir"].encode()
    ok(libc.mount(b"chatforge-stage", stage, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k"), "staging tmpfs")
    for i, fd in enumerate(fds):
        dst = os.path.join(spec["stage_dir"], str(i))
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(dst)
        else:
            open(dst, "w").close()
        ok(libc.mount(f"/proc/self/fd/{fd}".encode(), dst.encode(), None, MS_BIND | MS_REC, None),
           f"bind-mounting {spec['stage'][i]}")
        os.close(fd)
if spec["setuid"] is not None:
    uid, gid = spec["setuid"]
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        fail(f"could not switch to uid {uid}", e)
try:
    os.execv(spec["argv"][0], spec["argv"])
except OSError as e:
    fail(f"could not run {spec['argv'][0]}", e)
'''

_STAGE_DIR = "/tmp"  # covered by a tmpfs in the helper's private mount namespace only


# ----------------------------------------------------------------------------------------------
# What the sandbox sees of the host.

# /etc entries the interpreter and common libraries read (dynamic linker cache, users and groups for
# getpwuid, time zone, MIME types, fonts for matplotlib). Not /etc as a whole: it holds secrets
# (/etc/shadow, ssh host keys, /etc/ssl/private, application credentials).
_ETC = ["passwd", "group", "nsswitch.conf", "hosts", "localtime", "timezone", "ld.so.cache", "ld.so.conf",
        "ld.so.conf.d", "alternatives", "mime.types", "fonts", "os-release"]
_ETC_NET = ["resolv.conf", "gai.conf", "ssl/certs", "ca-certificates", "ca-certificates.conf", "protocols",
            "services"]


def _python_dirs() -> list[str]:
    """The folders this interpreter needs at the same paths inside: its prefix (a venv), the base
    installation, and the real paths behind symlinks on the way to the executable."""
    dirs = []
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        dirs += [os.path.abspath(p), os.path.realpath(p)]
    exe = os.path.abspath(sys.executable)
    seen = set()
    while os.path.islink(exe) and exe not in seen:  # venv/bin/python -> .../bin/python3 -> python3.11
        seen.add(exe)
        exe = os.path.join(os.path.dirname(exe), os.readlink(exe))
        dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
    out = []
    for d in dirs:
        d = os.path.normpath(d)
        if d not in out and os.path.isdir(d):
            out.append(d)
    private = [str(Path.home())] + ([os.environ["CHATFORGE_DATA_DIR"]] if os.environ.get("CHATFORGE_DATA_DIR") else [])
    for d in out:
        for p in private + ["/"]:
            p = os.path.realpath(p)
            if d == "/" or p == d or p.startswith(d.rstrip("/") + "/"):
                raise SandboxUnavailable(
                    f"python tool refused: the interpreter's folder {d} holds {p}, and the sandbox must see the "
                    f"interpreter's folders. Run chatforge from a venv or an interpreter installed in a folder of its own")
    return out


def _mounts(network: bool) -> list[tuple[str, str, str]]:
    """(kind, source, destination) for bwrap, kind in {"ro", "symlink"}; sources as on the host."""
    out: list[tuple[str, str, str]] = []
    if os.path.isdir("/usr"):
        out.append(("ro", "/usr", "/usr"))
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):  # merged /usr: /lib -> usr/lib
            out.append(("symlink", os.readlink(d), d))
        elif os.path.isdir(d):
            out.append(("ro", d, d))
    for name in _ETC + (_ETC_NET if network else []):
        p = os.path.join("/etc", name)
        if os.path.exists(p):
            out.append(("ro", os.path.realpath(p), p))
    for d in _python_dirs():
        if not any(k == "ro" and s == t and (d == t or d.startswith(t.rstrip("/") + "/")) for k, s, t in out):
            out.append(("ro", os.path.realpath(d), d))
    return out


def _bwrap_argv(bwrap: str, limits: SandboxLimits, staged: bool, info_fd: int) -> tuple[list[str], list[str]]:
    """The bwrap command line, and the sources the root helper must stage (in the order it numbers them)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp"}
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--hostname", "sandbox", "--uid", str(NOBODY), "--gid", str(NOBODY), "--clearenv"]
    if limits.network:
        argv.append("--share-net")
    for k, v in env.items():
        argv += ["--setenv", k, v]
    # Its own /proc (bwrap covers /proc/sys and friends read-only), a device folder with only null,
    # zero, random, tty...; read-only so it cannot fill RAM through /dev, with a small /dev/shm.
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(8 << 20), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--perms", "1777", "--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp"]
    stage: list[str] = []
    for kind, src, dst in _mounts(limits.network):
        if kind == "symlink":
            argv += ["--symlink", src, dst]
        else:
            if staged:
                stage.append(src)
                src = f"{_STAGE_DIR}/{len(stage) - 1}"
            argv += ["--ro-bind", src, dst]
    argv += ["--remount-ro", "/", "--chdir", "/tmp", "--info-fd", str(info_fd), "--"]
    return argv, stage


# ----------------------------------------------------------------------------------------------
# cgroups (root only): a pids cgroup per run, a child of this process's own cgroup, so the sandbox
# never leaves the limits the host put on us.


_CGROUP_PARENTS: list[Path] | None = None
_PROBE_LOCK = threading.Lock()  # the engine runs tools from threads: probe once, not once per thread


def _cgroup_parents() -> list[Path]:
    """Folders where this process may create per-run pids cgroups (cgroup v1 pids, or v2); probed once."""
    global _CGROUP_PARENTS
    with _PROBE_LOCK:
        if _CGROUP_PARENTS is None:
            _CGROUP_PARENTS = _find_cgroup_parents()
        return _CGROUP_PARENTS


def _find_cgroup_parents() -> list[Path]:
    if sys.platform != "linux" or os.geteuid() != 0:
        return []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "pids" in ctrls.split(","):
            cand = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        elif ctrls == "" and (Path("/sys/fs/cgroup") / "cgroup.controllers").exists():
            cand = Path("/sys/fs/cgroup") / path.lstrip("/")
        else:
            continue
        probe = cand / f"{_CGROUP_PREFIX}probe-{os.getpid()}"
        try:
            probe.mkdir()
            ok = (probe / "pids.max").exists()
            probe.rmdir()
        except OSError:
            continue
        if ok:
            return [cand]
    return []


def _lock_dir(path: Path) -> int:
    """Open `path` and hold an exclusive flock on it while the run lasts: a leftover whose lock can be
    taken belongs to a process that is gone (flock works across pid namespaces)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _kill_cgroup(cg: Path, wait_s: float = 2.0) -> None:
    """SIGKILL everything in cgroup `cg` until it is empty (or `wait_s` passes)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            pids = [int(x) for x in (cg / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _rmdir_cgroup(cg: Path) -> bool:
    for _ in range(100):
        try:
            cg.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            _kill_cgroup(cg, 0.05)
            time.sleep(0.02)
    return False


def cleanup_leftovers() -> list[str]:
    """Remove the scratch folders and cgroups of runs whose process died mid-call (crash, SIGKILL).
    A leftover is one nobody holds a lock on; live runs of other processes are never touched.
    Returns what was removed."""
    removed = []
    candidates = list(Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}[0-9]*-*"))
    for parent in _cgroup_parents():
        candidates += list(parent.glob(f"{_CGROUP_PREFIX}[0-9]*-[0-9]*"))
    for path in candidates:
        if not re.fullmatch(r"\d+-\w+", path.name.split("-", 2)[-1]):
            continue
        try:
            if time.time() - path.stat().st_mtime < _STALE_AFTER_S:
                continue
            fd = _lock_dir(path)
        except OSError:  # locked (alive), gone, or not ours to open
            continue
        try:
            if str(path).startswith("/sys/fs/cgroup"):
                _kill_cgroup(path)
                if _rmdir_cgroup(path):
                    removed.append(str(path))
            else:
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    removed.append(str(path))
        finally:
            os.close(fd)
    return removed


# ----------------------------------------------------------------------------------------------
# Is isolation available here?

_PROBE: dict[str, str] = {}
_ISOLATION_LOCK = threading.Lock()


def _find_bwrap() -> str:
    return os.environ.get("CHATFORGE_BWRAP") or shutil.which("bwrap") or (
        "/usr/bin/bwrap" if os.path.exists("/usr/bin/bwrap") else "")


def _probe(bwrap: str) -> str:
    """'' when a bwrap sandbox works on this machine, else why not (one line)."""
    if sys.platform != "linux":
        return f"operating-system isolation needs Linux namespaces (bubblewrap); this is {sys.platform}"
    if not bwrap or not os.access(bwrap, os.X_OK):
        return f"bubblewrap ({bwrap or 'bwrap'}) is not installed"
    try:
        r = _run(bwrap, "print(6*7)", SandboxLimits(audit_hook=False, timeout_s=30, cpu_s=30))
    except SandboxUnavailable as e:
        return str(e)
    if r.stdout == "42\n":
        return ""
    why = next((ln for ln in r.error.splitlines() if ln.startswith(("bwrap:", "[sandbox]"))), r.error.strip()[-300:])
    return f"bubblewrap could not start a sandbox: {why or f'exit status {r.returncode}'}"


def _isolation_problem() -> str:
    """Cached per process and per bwrap path: '' or the reason there is no isolation."""
    bwrap = _find_bwrap()
    _cgroup_parents()  # (takes the lock itself; the probe below runs a sandbox, which needs it)
    with _ISOLATION_LOCK:
        if bwrap not in _PROBE:
            _PROBE[bwrap] = _probe(bwrap)
        return _PROBE[bwrap]


def _unavailable_message(reason: str) -> str:
    return (f"python tool refused: no operating-system isolation on this machine ({reason}). Install bubblewrap "
            f"(Debian/Ubuntu: apt-get install bubblewrap) on Linux with user namespaces enabled, or accept "
            f"running model code WITHOUT isolation, with the rights of this process, by setting "
            f"{UNSAFE_ENV}=1 or SandboxLimits(unsafe_no_isolation=True)")


def protections() -> dict[str, str]:
    """What enforces each protection on this machine (the isolation probe runs once per process)."""
    problem = _isolation_problem()
    cg = _cgroup_parents()
    if problem:
        return {"isolation": f"NONE: {problem}; refusing to run unless {UNSAFE_ENV}=1",
                "network": "unsafe mode: audit hook only", "fork": "unsafe mode: RLIMIT_NPROC (not for root)"
                + (f" + pids cgroup under {cg[0]}" if cg else ""),
                "memory": "RLIMIT_AS", "cpu": "RLIMIT_CPU + wall-clock kill", "files": "unsafe mode: audit hook only",
                "user": "unsafe mode: the caller's own user"}
    user = f"host uid {NOBODY} (nobody), staged binds" if os.geteuid() == 0 else f"host uid {os.getuid()} (the caller)"
    return {"isolation": f"bubblewrap ({_find_bwrap()}): user, pid, network, ipc, uts, cgroup and mount namespaces",
            "network": "hard: own network namespace (loopback only)",
            "fork": "hard: RLIMIT_NPROC in its own user namespace" + (f" + pids cgroup under {cg[0]}" if cg else ""),
            "memory": "hard: RLIMIT_AS per process; /tmp is a tmpfs of scratch_mb",
            "cpu": "hard: RLIMIT_CPU + wall-clock kill of the whole pid namespace",
            "files": "hard: read-only /usr, /lib*, some /etc, the interpreter; private tmpfs /tmp; nothing else",
            "signals": "hard: own pid namespace and /proc", "user": f"hard: {user}, no capabilities, no_new_privs"}


# ----------------------------------------------------------------------------------------------
# Running


def _sandbox_user(limits: SandboxLimits) -> tuple[int, int] | None:
    """(uid, gid) the root helper switches to; None when the host is not root (bwrap maps the caller)."""
    if os.geteuid() != 0:
        if limits.user:
            raise ValueError("SandboxLimits.user needs the host to run as root")
        return None
    if not limits.user:
        return NOBODY, NOBODY
    try:
        pw = pwd.getpwuid(int(limits.user)) if limits.user.isdigit() else pwd.getpwnam(limits.user)
    except KeyError:
        raise ValueError(f"SandboxLimits.user: no user {limits.user!r} on this host") from None
    if pw.pw_uid == 0:
        raise ValueError("SandboxLimits.user: the sandbox must not run as root; leave it empty for nobody")
    return pw.pw_uid, pw.pw_gid


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Wait until host pid `pid` has exited (a zombie counts as gone). The sandbox's pid 1 only
    finishes exiting after the kernel has killed every other process of its pid namespace."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        time.sleep(0.01)


def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a fresh isolated interpreter (see the module docstring) and collect its output.
    Raises SandboxUnavailable where there is no isolation and no opt-in to run without it."""
    limits = limits or SandboxLimits()
    cleanup_leftovers()
    problem = _isolation_problem()
    if not problem:
        return _run(_find_bwrap(), code, limits)
    if not (limits.unsafe_no_isolation or os.environ.get(UNSAFE_ENV) == "1"):
        raise SandboxUnavailable(_unavailable_message(problem))
    warnings.warn(f"python tool: running model code WITHOUT isolation ({problem}); it acts on this host "
                  f"with this process's rights", RuntimeWarning, stacklevel=2)
    return _run("", code, limits)


_RUNS = iter(range(1 << 62))


def _run(bwrap: str, code: str, limits: SandboxLimits) -> SandboxResult:
    """One run: isolated under `bwrap`, or (bwrap == '') the unsafe mode."""
    res = SandboxResult(limits=limits, isolated=bool(bwrap))
    user = _sandbox_user(limits) if bwrap else None
    boot_limits = json.dumps({**asdict(limits), "strict": bool(bwrap)})
    locks: list[int] = []
    cgroups: list[Path] = []
    scratch: Path | None = None
    info = list(os.pipe())  # bwrap's --info-fd: the host pid of the sandbox's pid 1; [read, write], -1 once closed
    try:
        tag = f"{os.getpid()}-{next(_RUNS)}"
        for parent in _cgroup_parents():
            cg = parent / f"{_CGROUP_PREFIX}{tag}"
            try:
                cg.mkdir()
                locks.append(_lock_dir(cg))
                # + the bwrap monitor and the sandbox's pid 1, which the helper brings in with it
                (cg / "pids.max").write_text(str(limits.max_processes + 2))
                cgroups.append(cg)
            except OSError:
                _rmdir_cgroup(cg)
        if bwrap:
            argv, stage = _bwrap_argv(bwrap, limits, staged=user is not None, info_fd=info[1])
            argv += [sys.executable, "-I", "-B", "-c", _BOOT, boot_limits]
            cwd = "/"
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        else:
            scratch = Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{tag}-"))
            locks.append(_lock_dir(scratch))
            argv, stage = [sys.executable, "-I", "-B", "-c", _BOOT, boot_limits], None
            cwd = str(scratch)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
                   "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
                   "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        spec = {"cgroups": [str(c) for c in cgroups], "stage": stage if user is not None else None,
                "stage_dir": _STAGE_DIR, "setuid": list(user) if user else None, "argv": argv}
        return _supervise([sys.executable, "-I", "-S", "-c", _HELPER, json.dumps(spec)], code, limits, res,
                          cwd, env, info, cgroups)
    finally:
        for fd in info:
            if fd >= 0:
                os.close(fd)
        for cg in cgroups:
            _kill_cgroup(cg)
            _rmdir_cgroup(cg)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        for fd in locks:
            os.close(fd)


def _supervise(argv: list[str], code: str, limits: SandboxLimits, res: SandboxResult, cwd: str, env: dict,
               info_pipe: list[int], cgroups: list[Path]) -> SandboxResult:
    """Start the helper, feed the code, read capped output until exit or deadline, kill the tree."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, env=env, start_new_session=True, close_fds=True,
                                pass_fds=info_pipe[1:] if res.isolated else ())
    except (OSError, subprocess.SubprocessError) as e:
        res.error = f"[sandbox] could not start the interpreter ({e})\n"
        return res
    os.close(info_pipe[1])  # bwrap holds the only writer now
    info_pipe[1] = -1
    info_r, info = info_pipe[0], bytearray()

    def kill_all():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the bwrap monitor: --die-with-parent takes the sandbox with it
        except (ProcessLookupError, PermissionError):
            pass
        for cg in cgroups:
            _kill_cgroup(cg)

    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    try:
        try:
            proc.stdin.write(code.encode("utf-8", errors="replace"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        sel = selectors.DefaultSelector()
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        sel.register(info_r, selectors.EVENT_READ)
        open_streams = set(bufs)
        deadline = t0 + limits.timeout_s
        total = 0
        while open_streams:
            left = deadline - time.monotonic()
            if left <= 0:
                res.timed_out = True
                res.killed_reason = f"timed out after {limits.timeout_s:g} s (wall clock); the process was killed"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams.discard(key.fileobj)
                    continue
                if key.fd == info_r:
                    info += chunk[:4096]
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
            kill_all()
        try:
            proc.wait(timeout=max(0.5, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its pipes but kept running
            res.timed_out = True
            res.killed_reason = f"timed out after {limits.timeout_s:g} s (wall clock); the process was killed"
            kill_all()
            proc.wait()
        kill_all()  # leftovers never outlive a call
        try:
            os.set_blocking(info_r, False)
            info += os.read(info_r, 4096)
        except OSError:
            pass
        try:
            child_pid = int(json.loads(info.decode() or "{}").get("child-pid", 0))
        except (ValueError, AttributeError):
            child_pid = 0
        if child_pid:
            _wait_gone(child_pid, 5.0)
    finally:
        for f in (proc.stdout, proc.stderr):
            f.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res.seconds = time.monotonic() - t0
    res.returncode = rc = proc.returncode
    res.stdout = bufs[proc.stdout].decode("utf-8", errors="replace")
    res.error = bufs[proc.stderr].decode("utf-8", errors="replace")
    # bwrap exits with 128 + N when the code died of signal N; the unsafe mode reports -N directly.
    sig = -rc if rc is not None and rc < 0 else rc - 128 if res.isolated and rc is not None and 128 < rc < 128 + 65 else 0
    if not res.killed_reason and sig:
        res.killed_reason = {
            signal.SIGXCPU: f"CPU time limit ({limits.cpu_s} s) exceeded; the process was killed",
            signal.SIGKILL: f"killed (CPU limit {limits.cpu_s} s or memory limit {limits.memory_mb} MB)",
            signal.SIGXFSZ: f"file size limit ({limits.max_file_mb} MB) exceeded",
            signal.SIGSEGV: "crashed (segmentation fault)",
        }.get(sig, f"killed by signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}")
    if res.killed_reason:
        res.error = (res.error + ("\n" if res.error and not res.error.endswith("\n") else "")
                     + f"[sandbox] {res.killed_reason}\n")
    return res


def python_tool(limits: SandboxLimits | None = None):
    """The `python` Tool for the registry: runs the call text as code, returns `SandboxResult.text()`.
    Where there is no isolation (and no opt-in), every call answers with the refusal as an error."""
    from chatforge.tools import Tool, ToolError

    lim = limits or SandboxLimits()

    def run(code: str) -> str:
        try:
            return run_python(code, lim).text()
        except SandboxUnavailable as e:
            raise ToolError(str(e)) from None

    return Tool("python", "run Python code in a sandbox; prints stdout and the value of the last expression",
                run, timeout_s=lim.timeout_s + 10)
