"""Run untrusted, model-generated Python (HumanEval completions, code rewards) in a fresh, isolated interpreter.

Each call starts `sys.executable` on nanochat/sandbox_guard.py, which isolates itself before it runs the program:
no network (a network namespace, else a seccomp filter), its own unprivileged uid when the parent is root (so it
cannot read the parent's /proc/<pid>/environ, and everything it leaves behind is killed by uid, whatever
setsid()/setpgid() it called), a process-count limit, no writes outside its private temp dir (Landlock), memory
and file-size limits, a scrubbed environment whose HOME and TMPDIR are that temp dir, stdin at EOF, and a wall-clock
timeout. A run passes only if the program returned normally: the guard then prints a random per-run nonce as the
last line of stdout, which sys.exit(0), os._exit(0) or a killed process cannot produce.

What the kernel did not allow is reported in ExecutionResult.isolation and degrades to the next layer: no network
namespace -> the seccomp filter; not root -> no uid of its own (no process-count limit, and setsid() escapes the
group kill); no Landlock (Linux < 5.13) -> writes limited by file permissions only. The guard also disables
destructive os/shutil/subprocess functions at the Python level, against honest mistakes.

Thread-safe and usable from Ray workers: no signals or handlers in the parent, no global state, no preexec_fn
(unsafe in threaded parents); every limit is applied by the child itself.
"""
import json
import os
import secrets
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
# RLIMIT_NPROC of the run's own uid: processes and threads of this run alone
MAX_PROCESSES = 16
GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_guard.py")
# each run as root gets a uid of its own from this range (no account needs to exist for it)
SANDBOX_UIDS = (1 << 20, 1 << 30)


@dataclass
class ExecutionResult:
    success: bool  # the program ran to completion with exit status 0
    stdout: str
    stderr: str
    error: str | None = None  # a one-line reason when not successful (usually the last traceback line)
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: tuple = ()  # what the kernel allowed: netns or seccomp, uid, nproc, landlock

    def __repr__(self):
        flags = "".join(f", {k}=True" for k in ("timeout", "memory_exceeded") if getattr(self, k))
        return (f"ExecutionResult(success={self.success}, stdout={self.stdout[:200]!r}, "
                f"stderr={self.stderr[:200]!r}, error={self.error!r}{flags})")


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


def _strip_end_marker(path, marker):
    """Did stdout end with the run's marker (the program returned normally)? If so, cut it off the file."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size < len(marker):
                return False
            f.seek(size - len(marker))
            if f.read() != marker:
                return False
            f.truncate(size - len(marker))
            return True
    except OSError:
        return False


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


def _processes_of(uid):
    """Live (non-zombie) pids whose /proc entry belongs to `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == uid:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        pids.append(int(entry))
        except OSError:  # gone meanwhile
            pass
    return pids


def _kill_uid(uid):
    """SIGKILL every process of `uid` (this run's alone), wherever setsid()/setpgid() took it. Through a pidfd whose
    owner is checked after opening it, so a pid reused by another process in between is never signalled; repeated
    until none is left (a process forked meanwhile shows up in the next pass; RLIMIT_NPROC bounds them)."""
    for _ in range(100):
        pids = _processes_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.005)
    raise RuntimeError(f"sandbox processes of uid {uid} survive SIGKILL")


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, network="auto"):
    """Run `code` (a str of Python source) in a fresh, isolated interpreter and return an ExecutionResult.
    timeout: wall-clock seconds, interpreter start-up included. maximum_memory_bytes: address-space limit
    (RLIMIT_AS); None disables it. network: "auto" (a network namespace where the kernel allows it, else the
    seccomp filter) or "seccomp" (the filter only)."""
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    own_uid = os.geteuid() == 0 and os.path.isdir("/proc")  # (its processes are found, and killed, through /proc)
    uid = secrets.randbelow(SANDBOX_UIDS[1] - SANDBOX_UIDS[0]) + SANDBOX_UIDS[0] if own_uid else -1
    try:
        workdir = os.path.join(root, "work")  # the program's cwd, HOME and TMPDIR: only what it writes
        os.mkdir(workdir, 0o700)
        if uid >= 0:
            os.chmod(root, 0o711)  # the run's uid reaches its workdir, and nothing else in here
            os.chown(workdir, uid, uid)
        program_path, report_path = os.path.join(root, "program.py"), os.path.join(root, "isolation.json")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        mem = maximum_memory_bytes if maximum_memory_bytes else -1  # -1 == RLIM_INFINITY
        cmd = [sys.executable, "-I", "-B", "-X", "utf8", GUARD, program_path, report_path, str(mem),
               str(MAX_FILE_BYTES), str(MAX_PROCESSES), network, str(uid), root]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        nonce = secrets.token_hex(16)
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
        try:
            proc.stdin.write(nonce.encode() + b"\n")
            proc.stdin.close()
        except OSError:  # the child died at start-up; its stderr says why
            pass
        try:
            exited = _wait_exited(proc, timeout)
        finally:
            # kill the whole group: a timed-out program, or anything it left running; then everything of its uid
            _kill_group(proc.pid)
            proc.wait(timeout=30)
            if uid >= 0:
                _kill_uid(uid)
        reached_end = _strip_end_marker(stdout_path, f"\n{nonce}\n".encode())
        stdout, stderr = _read(stdout_path), _read(stderr_path)
        try:
            with open(report_path) as f:
                isolation = tuple(json.load(f))
        except (OSError, ValueError):
            isolation = ()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if not exited:
        return ExecutionResult(False, stdout, stderr, error=f"timed out after {timeout} s", timeout=True,
                               isolation=isolation)
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    if proc.returncode == 0 and reached_end:
        return ExecutionResult(True, stdout, stderr, isolation=isolation)
    if proc.returncode == 0:
        error = "the program exited before its end (sys.exit, os._exit or the like): not a pass"
    elif proc.returncode < 0:
        error = _last_line(stderr) or f"killed by signal {-proc.returncode}"
    else:
        error = _last_line(stderr) or f"exit status {proc.returncode}"
    return ExecutionResult(False, stdout, stderr, error=error, memory_exceeded=memory_exceeded,
                           isolation=isolation)
