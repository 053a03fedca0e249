"""Run untrusted generated code (HumanEval candidates with their tests) and report pass or fail.

Layers, each of which alone stops the common failure:
- a fresh temporary folder as cwd and HOME, removed afterwards; an empty environment;
- a child Python started isolated (`-I -B`: no user site, no PYTHONPATH, no .pyc writes) whose first
  act is an audit hook (PEP 578, cannot be removed from Python) that refuses sockets, new
  processes, ctypes, and any write, rename, delete or chmod outside the temporary folder;
- where the kernel allows it, a network namespace of its own (`unshare -rn`): no interface but
  loopback, so even native code cannot reach the network;
- resource limits (CPU seconds, address space, file size, open files) and a wall-clock timeout
  after which the whole process group is killed.
A candidate passes only if the program exits with status 0 within the time limit.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

GUARD = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else _root)
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)
def _deny(why):
    raise PermissionError("sandbox: " + why)
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
        if writing and path is not None and not _inside(path):
            _deny("writing outside the sandbox folder: %r" % (path,))
    elif event.startswith("socket.") or event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                                                  "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
                                                  "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.kill"):
        _deny("%s is not allowed" % event)
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.link",
                   "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chdir"):
        if args and not _inside(args[0]):
            _deny("%s outside the sandbox folder: %r" % (event, args[0]))
    elif event in ("os.rename", "os.replace"):
        if not (_inside(args[0]) and _inside(args[1])):
            _deny("%s outside the sandbox folder" % event)
sys.addaudithook(_hook)
del _hook
'''


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed: <last line of stderr>", "timeout"
    seconds: float = 0.0


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """`unshare -rn` if this kernel lets an unprivileged process have its own network namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (exe, "-rn") if ok else ()


def _limits(cpu_seconds: int, memory_bytes: int, file_bytes: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16) -> Outcome:
    """Run `program` (Python source) contained as described above; pass = exit status 0 in time."""
    import time

    with tempfile.TemporaryDirectory(prefix="llmkit-sandbox-") as folder:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(folder, "guard.py"), "w", encoding="utf-8") as f:
            f.write(GUARD)
        launcher = "exec(open('guard.py').read()); import runpy; runpy.run_path('program.py', run_name='__main__')"
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", "-c", launcher]
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(int(timeout) + 1, memory_mb << 20, file_mb << 20))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", time.perf_counter() - start)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
            return Outcome(True, "passed", seconds)
        lines = err.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        return Outcome(False, f"failed: {reason[:200]}", seconds)
