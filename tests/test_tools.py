"""The python sandbox under escape and exhaustion attempts, and the tool registry. Every attempt
must end with a clear message while this (host) process carries on."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from chatforge.tools import Tool, dispatch, get_tool, list_tools, parse_call, register_tool, unregister_tool
from chatforge.tools import python_sandbox
from chatforge.tools.python_sandbox import (_STALE_AFTER_S, UNSAFE_ENV, SandboxLimits, SandboxUnavailable, cleanup_leftovers,
                                            protections, python_tool, run_python)

HARD = SandboxLimits(audit_hook=False)  # the kernel layers alone


def test_stdout_last_expression_and_errors():
    r = run_python("x = 6*7\nprint('hi')\nx")
    assert r.text() == "hi\n42\n" and r.returncode == 0
    assert run_python("None").text() == "(no output)"
    r = run_python("def f(x):\n    return 1/x\nf(0)")
    assert "ZeroDivisionError: division by zero" in r.text() and 'File "<code>", line 2' in r.text()
    assert "hook" not in r.text() and "<string>" not in r.text()  # only the model's own frames
    assert "SyntaxError" in run_python("print(6*").text()
    assert run_python("import numpy as np\nnp.arange(4).sum()").text().strip() in ("6", "np.int64(6)")


def test_private_folder_and_scrubbed_env():
    name = f"chatforge-scratch-{uuid.uuid4().hex}.txt"
    os.environ["CHATFORGE_TEST_SECRET"] = "hunter2"
    try:
        r = run_python(f"import os\nopen({name!r},'w').write('ok')\nprint(open({name!r}).read(), os.getcwd())\n"
                       "sorted(os.environ)")
    finally:
        del os.environ["CHATFORGE_TEST_SECRET"]
    assert r.stdout.startswith("ok /tmp\n"), r.text()  # its own writable /tmp, also its cwd
    assert "CHATFORGE_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    assert not (Path(tempfile.gettempdir()) / name).exists()  # not the host's /tmp
    r = run_python(f"import os; os.path.exists({name!r})")
    assert r.stdout == "False\n"  # nothing persists between calls


def test_os_system_and_subprocess_refused():
    for code in ("import os; os.system('echo pwned')", "import subprocess; subprocess.run(['echo', 'pwned'])",
                 "import os; os.execv('/bin/echo', ['echo', 'pwned'])"):
        r = run_python(code)
        assert "PermissionError: sandbox:" in r.text() and "pwned" not in r.stdout


def test_write_outside_folder_refused():
    """Writes outside the scratch /tmp: the courtesy hook names the rule; without it the kernel says
    read-only (the host-side effects are checked by the red-team tests below)."""
    site = sysconfig.get_paths()["purelib"]  # visible inside, read-only
    target = os.path.join(site, f"chatforge-{uuid.uuid4().hex}.txt")
    codes = (f"open({target!r}, 'w').write('x')", f"import os; os.remove({site + '/numpy/__init__.py'!r})",
             f"import pathlib; pathlib.Path({target!r}).write_text('x')", "open('../escaped.txt', 'w').write('x')")
    for code in codes:
        assert "outside the working folder" in run_python(code).text()
        assert "Read-only file system" in run_python(code, HARD).text()
    assert not os.path.exists(target) and os.path.exists(site + "/numpy/__init__.py")


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(1)
    hits = []

    def accept():
        try:
            hits.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    return srv, srv.getsockname()[1], hits, th


def test_network_blocked():
    srv, port, hits, th = _listener()
    try:
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"
        r = run_python(code)
        assert "network access" in r.text() and "connected" not in r.stdout
        if protections()["network"].startswith("hard"):  # the namespace alone also stops it
            r = run_python(code, HARD)
            assert "connected" not in r.stdout and ("unreachable" in r.text() or "refused" in r.text()), r.text()
    finally:
        srv.close()
        th.join()
    assert not hits


def test_infinite_loop_wall_clock_and_cpu():
    t = time.monotonic()
    r = run_python("while True: pass", SandboxLimits(timeout_s=1.5, cpu_s=10))
    assert r.timed_out and "timed out after 1.5 s" in r.text() and time.monotonic() - t < 5
    r = run_python("while True: pass", SandboxLimits(timeout_s=10, cpu_s=1))
    assert "CPU time limit (1 s)" in r.text() and r.seconds < 5
    # a sleeper that closes its pipes still dies at the deadline
    r = run_python("import os, time; os.close(1); os.close(2); time.sleep(60)", SandboxLimits(timeout_s=1))
    assert r.timed_out


def test_memory_limit():
    r = run_python("b = bytearray(10 * 2**30)\nprint('allocated')")
    assert "MemoryError" in r.text() and "allocated" not in r.stdout
    r = run_python("x = []\nwhile True: x.append(' ' * 10**7)", SandboxLimits(memory_mb=256))
    assert "MemoryError" in r.text() or "killed" in r.text()


def test_huge_output_truncated():
    t = time.monotonic()
    r = run_python("import sys\nfor _ in range(100): sys.stdout.write('x' * 1_000_000)")
    assert r.truncated and "output exceeded" in r.text() and time.monotonic() - t < 5
    assert len(r.text()) < 5000  # what the model sees is bounded too
    r = run_python("print('a' * 10_000)")
    assert "characters cut" in r.text() and len(r.text()) < 4200


def test_fork_bomb_contained():
    t = time.monotonic()
    r = run_python("import os\nwhile True: os.fork()")
    assert "os.fork is not allowed" in r.text()
    if protections()["fork"].startswith("hard"):  # the pids cgroup / RLIMIT_NPROC alone
        r = run_python("import os\nwhile True: os.fork()", SandboxLimits(audit_hook=False, timeout_s=5))
        assert "Resource temporarily unavailable" in r.text() or r.timed_out, r.text()
    assert time.monotonic() - t < 15
    time.sleep(0.2)
    # the host still has processes to spare: a bomb that escaped its limits would leave none
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True,
                          timeout=30).stdout == "42\n"


def test_file_size_limit():
    r = run_python("open('big', 'wb').write(b'x' * 50 * 2**20)", SandboxLimits(max_file_mb=1))
    assert "file size limit" in r.text() or "File too large" in r.text(), r.text()


# ----------------------------------------------------------------------------------------------
# No isolation: refuse, unless the caller opts in to unsafe execution.


def _refusal_checks(msg: str) -> None:
    assert "python tool refused" in msg and "apt-get install bubblewrap" in msg, msg
    assert UNSAFE_ENV in msg and "unsafe_no_isolation=True" in msg and "WITHOUT isolation" in msg, msg


def test_refuses_without_bubblewrap_unless_unsafe_opt_in(monkeypatch):
    monkeypatch.setenv("CHATFORGE_BWRAP", "/nonexistent/bwrap")
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable) as e:
        run_python("print(1)")
    _refusal_checks(str(e.value))
    assert "bubblewrap (/nonexistent/bwrap) is not installed" in str(e.value)
    assert protections()["isolation"].startswith("NONE")
    r = dispatch("python", "print(1)", {"python": python_tool()})  # what the model (and chat) sees
    assert r.error and r.output.startswith("error: python tool refused")
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        r = run_python("print(6*7)", SandboxLimits(unsafe_no_isolation=True))
    assert r.stdout == "42\n" and not r.isolated
    monkeypatch.setenv(UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        r = run_python("import os; os.getcwd()")
    cwd = r.stdout.strip().strip("'")
    assert cwd.startswith(os.path.join(tempfile.gettempdir(), f"chatforge-py-{os.getpid()}-")), r.text()
    assert not os.path.exists(cwd)  # the unsafe mode's host scratch folder is deleted after the run


def test_refuses_where_user_namespaces_are_disabled():
    """A real failure, not a simulated one: this test runs the tool inside a bubblewrap sandbox of its
    own that forbids further user namespaces (like a kernel with them switched off)."""
    code = ("from chatforge.tools.python_sandbox import *\n"
            "try:\n    run_python('print(1)')\nexcept SandboxUnavailable as e:\n    print('REFUSED', e)\n"
            "import warnings; warnings.simplefilter('ignore')\n"
            "r = run_python('print(6*7)', SandboxLimits(unsafe_no_isolation=True)); print('UNSAFE', r.stdout, r.isolated)")
    p = subprocess.run(["bwrap", "--dev-bind", "/", "/", "--unshare-user", "--uid", "1000", "--gid", "1000",
                        "--disable-userns", "--proc", "/proc", "--setenv", "PYTHONPATH", str(REPO),
                        sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "REFUSED" in p.stdout, p.stdout + p.stderr
    _refusal_checks(p.stdout)
    assert "bubblewrap could not start a sandbox: bwrap:" in p.stdout
    assert "UNSAFE 42\n False" in p.stdout


def test_cleanup_removes_only_dead_runs_leftovers():
    """Leftovers of a crashed run go; a live run's folder (locked by its owner) stays, however old."""
    tmp = Path(tempfile.gettempdir())
    dead = tmp / f"chatforge-py-999999999-{uuid.uuid4().hex[:8]}"
    live = tmp / f"chatforge-py-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dead.mkdir()
    (dead / "model-file.txt").write_text("x")
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    parents = python_sandbox._cgroup_parents()
    cg = parents[0] / "chatforge-sandbox-999999999-0" if parents else None
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        if cg is not None:  # a dead run's cgroup with a process still in it
            cg.mkdir()
            (cg / "cgroup.procs").write_text(str(sleeper.pid))
            os.utime(cg, (time.time() - 60,) * 2)
        for p in (dead, live):
            os.utime(p, (time.time() - 60,) * 2)
        removed = cleanup_leftovers()
        assert str(dead) in removed and not dead.exists()
        assert live.exists() and str(live) not in removed
        if cg is not None:
            assert str(cg) in removed and not cg.exists() and sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        os.close(fd)
        live.rmdir()
        if cg is not None and cg.exists():
            cg.rmdir()


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_and_custom_tools():
    names = [t.name for t in list_tools()]
    assert "python" in names and "search" in names
    assert get_tool("python").fn("print(1+1)") == "2\n"
    register_tool(Tool("weather", "fake weather", lambda city: f"sunny in {city.strip()}"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_tool(Tool("weather", "x", str))
        assert dispatch("python", "@weather: Paris").output == "sunny in Paris"
        assert dispatch("search", "@weather: Rome").output == "sunny in Rome"
        r = dispatch("python", "@nope: x")
        assert r.error and "unknown tool 'nope'" in r.output and "weather" in r.output
    finally:
        unregister_tool("weather")
    assert parse_call("python", "@decorator\ndef f(): pass") == ("python", "@decorator\ndef f(): pass")
    with pytest.raises(ValueError):
        register_tool(Tool("bad name!", "x", str))
    r = dispatch("python", "x", {"python": Tool("python", "x", lambda s: 42)})
    assert r.output == "42" and not r.error  # non-string results are repr'd


# ----------------------------------------------------------------------------------------------
# Red team (issue #10 §1). Every attack first tries to switch off any in-process guard, and runs
# both that way and with the guard off from the start, so only the operating-system isolation is
# tested. Each is judged by its effect on the host, never by the message the sandbox prints. The
# attacks run inside a separate "victim" process (a stand-in for the engine or chat process) started
# with a secret in its environment, so that killing or reading the parent hits the victim, not pytest.

REPO = Path(__file__).resolve().parents[1]

DISARM = """
import gc, sys
try:
    sys.modules['__main__'].armed[0] = False  # the one-liner from issue #10
except Exception:
    pass
for _o in gc.get_objects():  # any other guard: clear every flag list / closure cell that says "armed"
    try:
        if isinstance(_o, list) and _o == [True]:
            _o[0] = False
        elif callable(_o) and getattr(_o, '__closure__', None):
            for _c in _o.__closure__:
                if _c.cell_contents is True:
                    _c.cell_contents = False
    except Exception:
        pass
"""

VICTIM = r"""
import json, os, sys
from chatforge.tools.python_sandbox import SandboxLimits, run_python
out = []
for code, hook in json.loads(sys.stdin.read()):
    r = run_python(code, SandboxLimits(audit_hook=hook, timeout_s=10, cpu_s=10))
    out.append(r.text())
print(json.dumps(out))
print("HOST-ALIVE")
"""

SECRET = f"chatforge-secret-{uuid.uuid4().hex}"


def _attack(*codes: str, env: dict | None = None) -> list[str]:
    """Run each of `codes` twice (guard on after the disarm attempt; guard off) from one victim
    process; the victim must outlive every attack. Returns the texts the model would have seen."""
    runs = [[DISARM + code, hook] for code in codes for hook in (True, False)]
    p = subprocess.run([sys.executable, "-c", VICTIM], input=json.dumps(runs), capture_output=True, text=True,
                       timeout=60 + 15 * len(runs), env={**os.environ, "PYTHONPATH": str(REPO),
                                                          "CHATFORGE_VICTIM_SECRET": SECRET, **(env or {})})
    assert p.returncode == 0 and p.stdout.endswith("HOST-ALIVE\n"), (
        f"the host process died (rc {p.returncode}): {p.stdout[-500:]} {p.stderr[-2000:]}")
    return json.loads(p.stdout.splitlines()[-2])


@pytest.fixture
def host_targets(tmp_path):
    """Files an attacker would like to create on the host: in a host temp folder and in the
    interpreter's own site-packages (a .pth there would run code in every later Python)."""
    site = Path(sysconfig.get_paths()["purelib"])
    targets = [tmp_path / "escaped.txt", site / f"chatforge-redteam-{uuid.uuid4().hex}.txt"]
    yield targets
    for t in targets:
        t.unlink(missing_ok=True)


def test_redteam_writes_outside_scratch(host_targets):
    _attack(*(f"open({str(t)!r}, 'w').write('pwned')" for t in host_targets))
    for t in host_targets:
        assert not t.exists(), f"the sandbox wrote {t} on the host"


def test_redteam_shells_subprocesses_and_ctypes(host_targets):
    codes = [c for t in host_targets for c in (
        f"import os; os.system('echo pwned > {t}')",
        f"import subprocess; subprocess.run(['sh', '-c', 'echo pwned > {t}'])",
        f"import ctypes; ctypes.CDLL(None).system(b'echo pwned > {t}')",
        f"import os\nif os.fork() == 0:\n    os.execv('/bin/sh', ['sh', '-c', 'echo pwned > {t}'])\nos.wait()")]
    _attack(*codes)
    for t in host_targets:
        assert not t.exists(), f"a shell, subprocess, ctypes call or fork+exec wrote {t} on the host"


def test_redteam_signals_cannot_reach_the_host():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _attack("import os; os.kill(os.getppid(), 9)", "import os; os.killpg(os.getpgid(os.getppid()), 9)",
                f"import os, signal; os.kill({sleeper.pid}, signal.SIGKILL)",
                f"import ctypes; ctypes.CDLL(None).kill({sleeper.pid}, 9)")  # asserts the victim survived
        assert sleeper.poll() is None, "the sandbox killed a host process"
    finally:
        sleeper.kill()
        sleeper.wait()


def _host_procs_with(token: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_redteam_survivor_escaping_session_and_cgroup():
    token = f"chatforge-survivor-{uuid.uuid4().hex}"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        for p in ('/sys/fs/cgroup/pids/cgroup.procs', '/sys/fs/cgroup/cgroup.procs',\n"
            "                  '/sys/fs/cgroup/unified/cgroup.procs', '/sys/fs/cgroup/systemd/cgroup.procs'):\n"
            "            try:\n"
            "                open(p, 'w').write(str(os.getpid()))\n"
            "            except OSError:\n"
            "                pass\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])\n"
            "    os._exit(0)\n"
            "time.sleep(1)\n"
            "print('parent done')")
    try:
        _attack(code)
        assert not _host_procs_with(token), "a process forked by the sandbox outlived the call"
        # the same survivor while the main process spins until the wall-clock timeout kills it
        r = run_python(code.replace("time.sleep(1)", "while True: pass"), SandboxLimits(audit_hook=False, timeout_s=2))
        assert r.timed_out and not _host_procs_with(token), "a process forked by the sandbox outlived its timeout"
    finally:
        for pid in _host_procs_with(token):
            os.kill(pid, signal.SIGKILL)


def test_redteam_reads_host_secrets(shared_data, tmp_path):
    home_secret = Path.home() / f".chatforge-redteam-{uuid.uuid4().hex}"
    home_secret.write_text(SECRET + "-home")
    data_file = next(p for p in sorted(shared_data.rglob("*")) if p.is_file() and p.stat().st_size > 40)
    data_head = data_file.read_bytes()[:40].decode("utf-8", "replace")
    repo_line = "REPO = Path(__file__).resolve().parents[1]"
    files = [str(home_secret), str(data_file), "/etc/shadow", str(Path(__file__).resolve())]
    shadow = Path("/etc/shadow").read_text().splitlines()[0] if os.access("/etc/shadow", os.R_OK) else None
    code = ("import os\n"
            f"for f in {files!r} + [f'/proc/{{os.getppid()}}/environ']:\n"
            "    try:\n"
            "        print(open(f, 'rb').read()[:4000])\n"
            "    except OSError as e:\n"
            "        print('no:', e)\n"
            "print(os.environ)")
    scan = ("import os\n"  # every process's environment it can see, printing only what looks like a secret
            "for p in os.listdir('/proc'):\n"
            "    try:\n"
            "        env = open(f'/proc/{p}/environ', 'rb').read()\n"
            "    except OSError:\n"
            "        continue\n"
            "    print(p, [v for v in env.split(b'\\0') if b'chatforge-secret' in v])")
    try:
        for text in _attack(code, scan):
            assert SECRET not in text, "the sandbox read a secret of the host (a file under ~ or a parent's environ)"
            assert data_head not in text, "the sandbox read the data folder"
            assert repo_line not in text, "the sandbox read the repository"
            assert shadow is None or shadow not in text, "the sandbox read /etc/shadow"
    finally:
        home_secret.unlink()


def test_redteam_network_to_host():
    srv, port, hits, th = _listener()
    try:
        _attack(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')")
    finally:
        srv.close()
        th.join()
    assert not hits, "the sandbox connected to a port on the host"


def _leftovers(pid: int) -> set[str]:
    """Scratch folders and cgroups that process `pid` created (their names carry the owner's pid;
    other engineers' live runs on a shared machine are not ours to count)."""
    found = {str(p) for p in Path(tempfile.gettempdir()).glob(f"chatforge-py-{pid}-*")}
    for root in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if root.is_dir():
            found |= {str(p) for p in root.rglob(f"chatforge-sandbox-{pid}-*")}
    return found


def test_redteam_host_crash_leaves_nothing_behind():
    """The engine is killed mid-call: the sandbox dies with it, and the next call cleans up the
    scratch folders and cgroups the dead process left."""
    token = f"chatforge-orphan-{uuid.uuid4().hex}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])"
    victim = subprocess.Popen([sys.executable, "-c", VICTIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        victim.stdin.write(json.dumps([[code, False]]))
        victim.stdin.close()
        deadline = time.monotonic() + 20
        while not _host_procs_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _host_procs_with(token), "the sandboxed code never started"
        made = _leftovers(victim.pid)
        victim.kill()
        victim.wait()
        deadline = time.monotonic() + 5
        while _host_procs_with(token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _host_procs_with(token), "the sandboxed code outlived the process that ran it"
        time.sleep(_STALE_AFTER_S)  # a fresh folder may be a live run that has not locked it yet
        assert "ok" in run_python("print('ok')").stdout
        assert not _leftovers(victim.pid), f"left behind: {_leftovers(victim.pid)} (made: {made})"
    finally:
        for pid in _host_procs_with(token):
            os.kill(pid, signal.SIGKILL)
