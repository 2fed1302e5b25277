"""Run untrusted, model-generated Python (HumanEval completions) in a separate, fresh interpreter.

Each call starts `sys.executable` in its own session/process group, inside a scratch temp dir, with a
scrubbed environment (PATH only), stdin at EOF, a wall-clock timeout (the whole group is SIGKILLed) and a
guard prelude that sets memory/file-size rlimits and disables destructive os/shutil/subprocess functions
and IPv4/IPv6 sockets.

This is NOT a security sandbox: it stops honest mistakes of a language model (runaway loops, huge
allocations, `shutil.rmtree`), not an adversary (ctypes, `_socket`, `os.open(..., O_TRUNC)` and re-imports
all get around it). Run it in a container if the code may be hostile.

Thread-safe and usable from Ray workers: no signals or handlers in the parent, no global state, no
preexec_fn (which is unsafe in threaded parents); every limit is applied by the child itself.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# stdout/stderr are files in the scratch dir; we read back at most this much of each
MAX_OUTPUT_BYTES = 1 << 20
# RLIMIT_FSIZE: no single file (stdout included) may grow past this, so a print loop can't fill the disk
MAX_FILE_BYTES = 64 << 20


@dataclass
class ExecutionResult:
    success: bool  # the program ran to completion with exit status 0
    stdout: str
    stderr: str
    error: str | None = None  # a one-line reason when not successful (usually the last traceback line)
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        flags = "".join(f", {k}=True" for k in ("timeout", "memory_exceeded") if getattr(self, k))
        return (f"ExecutionResult(success={self.success}, stdout={self.stdout[:200]!r}, "
                f"stderr={self.stderr[:200]!r}, error={self.error!r}{flags})")


# The guard runs first in the child. argv: [-c, program_path, memory_limit_bytes, file_limit_bytes].
# The program is read from a file (not passed on the command line: one argv string is capped at 128 KiB).
_GUARD = r'''
import builtins, faulthandler, os, platform, sys
_path, _mem, _fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(_path, encoding="utf-8") as _f:
    _src = _f.read()
sys.argv = ["<program>"]
import resource
if _mem > 0 and platform.system() != "Darwin":  # RLIMIT_AS is not enforced on macOS; setting it can fail
    for _r in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
        resource.setrlimit(_r, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"

# no network (best effort): IPv4/IPv6 sockets and DNS fail; AF_UNIX stays (asyncio needs a socketpair)
import socket as _socket_mod
class _NoNetSocket(_socket_mod.socket):
    def __init__(self, family=_socket_mod.AF_INET, *args, **kwargs):
        if family in (_socket_mod.AF_INET, _socket_mod.AF_INET6):
            raise OSError("network access is disabled in the nanochat sandbox")
        super().__init__(family, *args, **kwargs)
def _no_net(*args, **kwargs):
    raise OSError("network access is disabled in the nanochat sandbox")
_socket_mod.socket = _NoNetSocket
_socket_mod.create_connection = _socket_mod.getaddrinfo = _socket_mod.gethostbyname = _no_net

# destructive or escaping functions become None, so calling them raises TypeError. (os.putenv, on the
# classic list, stays: it only touches this process's environment and numpy's import calls it.)
builtins.exit = builtins.quit = None
for _name in ("kill", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
              "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
              "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
              "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execv", "execve",
              "execvp", "execvpe", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, None)
import shutil, subprocess
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.help = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_mod] = None

# the program gets fresh globals, so none of the names above are visible to it
exec(compile(_src, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
'''


def _last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else None


def _read(path):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_OUTPUT_BYTES + 1)
    except OSError:
        return ""
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > MAX_OUTPUT_BYTES else "")


def _wait_exited(proc, timeout):
    """Wait up to `timeout` s for the child to exit, WITHOUT reaping it: while it is an unreaped zombie its
    pid (= its process group id) cannot be reused, so killing the group afterwards is safe. Returns True if
    it exited."""
    if not hasattr(os, "waitid"):  # e.g. macOS: fall back to a reaping wait
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped (e.g. SIGCHLD ignored by the host process)
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024):
    """Run `code` (a str of Python source) in a fresh interpreter and return an ExecutionResult.
    timeout: wall-clock seconds, interpreter start-up included. maximum_memory_bytes: address-space limit
    (RLIMIT_AS); None disables it."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        workdir = os.path.join(root, "work")  # the program's cwd holds only what the program writes
        os.mkdir(workdir)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        mem = maximum_memory_bytes if maximum_memory_bytes else -1  # -1 == RLIM_INFINITY
        cmd = [sys.executable, "-I", "-X", "utf8", "-c", _GUARD, program_path, str(mem), str(MAX_FILE_BYTES)]
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True)
        try:
            exited = _wait_exited(proc, timeout)
        finally:
            # kill the whole group: a timed-out program, or anything it left running; then reap
            _kill_group(proc.pid)
            proc.wait()
        stdout, stderr = _read(stdout_path), _read(stderr_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if not exited:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout} s", timeout=True)
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    if proc.returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    if proc.returncode < 0:
        error = _last_line(stderr) or f"killed by signal {-proc.returncode}"
    else:
        error = _last_line(stderr) or f"exit status {proc.returncode}"
    return ExecutionResult(False, stdout, stderr, error=error, memory_exceeded=memory_exceeded)
