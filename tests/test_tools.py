"""The python sandbox under escape and exhaustion attempts, and the tool registry. Every attempt
must end with a clear message while this (host) process carries on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from chatforge.tools import Tool, dispatch, get_tool, list_tools, parse_call, register_tool, unregister_tool
from chatforge.tools.python_sandbox import SandboxLimits, protections, run_python

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
    os.environ["CHATFORGE_TEST_SECRET"] = "hunter2"
    try:
        r = run_python("import os\nopen('f.txt','w').write('ok')\nprint(open('f.txt').read(), os.getcwd())\n"
                       "sorted(os.environ)")
    finally:
        del os.environ["CHATFORGE_TEST_SECRET"]
    assert r.stdout.startswith("ok /tmp/chatforge-py-") or "chatforge-py-" in r.stdout
    assert "CHATFORGE_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    cwd = r.stdout.split()[1]
    assert not os.path.exists(cwd)  # deleted after the run


def test_os_system_and_subprocess_refused():
    for code in ("import os; os.system('echo pwned')", "import subprocess; subprocess.run(['echo', 'pwned'])",
                 "import os; os.execv('/bin/echo', ['echo', 'pwned'])"):
        r = run_python(code)
        assert "PermissionError: sandbox:" in r.text() and "pwned" not in r.stdout


def test_write_outside_folder_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')", f"import os; os.remove({str(tmp_path)!r})",
                 f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
                 "open('../escaped.txt', 'w').write('x')"):
        r = run_python(code)
        assert "writing outside the working folder" in r.text() or "outside the working folder" in r.text(), r.text()
    assert not target.exists() and tmp_path.exists()


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
