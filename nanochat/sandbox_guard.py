"""
The child side of nanochat.execution: run as a script (`python -I sandbox_guard.py ...`) in the fresh process
that then runs the untrusted program; never imported. In order, before any untrusted code runs:

1. read the run's nonce from stdin (a pipe the parent closes at once), then point stdin at /dev/null;
2. cut the network: a new network namespace (nothing but a downed loopback) where the kernel allows it, else a
   seccomp filter that fails every socket() that is not AF_UNIX, and io_uring, with EACCES;
3. set the memory, file-size and process-count limits;
4. as root: drop to the run's own unprivileged uid/gid (no supplementary groups); the parent kills everything
   of that uid afterwards, so setsid()/setpgid() cannot escape, and the process limit counts this run alone.
   Where the interpreter lives in a directory closed to other users, a private mount namespace re-exposes just
   the interpreter's directories (and hides the rest of that directory);
5. no_new_privs, then Landlock: writes (create, remove, rename, truncate) only beneath the working directory;
6. record what was applied for the parent; run the program in fresh globals; only if it returns normally,
   write the nonce as stdout's last line. sys.exit(), os._exit(), a signal or a crash all leave it out.

argv: program_path report_path memory_bytes file_bytes max_processes network(auto|seccomp) uid(-1 = keep) staging
"""
import ctypes
import json
import os
import platform
import resource
import struct
import sys

CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWNS = 0x40000000, 0x10000000, 0x00020000
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 0x1000, 0x4000, 0x40000, 2
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SYS_LANDLOCK = {"create_ruleset": 444, "add_rule": 445, "restrict_self": 446}  # the same on every architecture
SYS_IO_URING_SETUP = 425
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # (AUDIT_ARCH_*, __NR_socket)
EACCES = 13

libc = ctypes.CDLL(None, use_errno=True)
LINUX = sys.platform == "linux"  # elsewhere none of the kernel-level steps exist: each reports itself not applied


def unshare_network():
    """A private network namespace; unprivileged, through a user namespace of our own first."""
    if not LINUX:
        return False
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    return os.geteuid() != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def traversable(path, uid):
    """Could `uid` (with gid == uid and no groups) reach `path`, going by the mode bits of its ancestors?"""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or os.sep)
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            return os.sep.join(parts[:i])  # the first ancestor in the way
    return None


def expose_python(uid, staging):
    """The run's uid must read the interpreter's own files, which may sit in a home directory closed to others
    (e.g. pyenv under /root). In a private mount namespace, a tmpfs over each closed ancestor hides its contents
    and the interpreter's directories are bound back in at their own paths. True when nothing is left closed."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *sys.path) if os.path.exists(p)}
    blocked = {}
    for path in needed:
        closed = traversable(path, uid)
        if closed:
            blocked.setdefault(closed, []).append(path)
    if not blocked:
        return True
    if not LINUX or libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    for i, (closed, paths) in enumerate(sorted(blocked.items())):
        stages = []
        for j, path in enumerate(sorted(paths)):
            stage = os.path.join(staging, f"{i}.{j}")
            os.mkdir(stage, 0o700)
            if libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None) != 0:
                return False
            stages.append((stage, path))
        if libc.mount(b"tmpfs", closed.encode(), b"tmpfs", 0, b"mode=0755") != 0:
            return False
        for stage, path in stages:
            os.makedirs(path, 0o755, exist_ok=True)
            if libc.mount(stage.encode(), path.encode(), None, MS_BIND | MS_REC, None) != 0:
                return False
            libc.umount2(stage.encode(), MNT_DETACH)
    return not any(traversable(p, uid) for p in needed)


def block_sockets():
    """seccomp-bpf: socket(domain != AF_UNIX) and io_uring_setup fail with EACCES; foreign-ABI syscalls too."""
    arch = SECCOMP_ARCH.get(platform.machine())
    if arch is None or not LINUX:
        return False
    audit_arch, nr_socket = arch

    def op(code, jt, jf, k):
        return struct.pack("HBBI", code, jt, jf, k)
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    deny, allow = 0x00050000 | EACCES, 0x7FFF0000
    program = b"".join([
        op(ld, 0, 0, 4),                      # 0: seccomp_data.arch
        op(jeq, 1, 0, audit_arch),            # 1: ours -> 3
        op(ret, 0, 0, deny),                  # 2: another ABI (e.g. i386 socketcall): no
        op(ld, 0, 0, 0),                      # 3: seccomp_data.nr
        op(jge, 4, 0, 0x40000000),            # 4: x32 syscall numbers -> deny
        op(jeq, 3, 0, SYS_IO_URING_SETUP),    # 5: io_uring can open sockets itself -> deny
        op(jeq, 0, 3, nr_socket),             # 6: socket() -> 7, anything else -> allow
        op(ld, 0, 0, 16),                     # 7: args[0], the domain
        op(jeq, 1, 0, 1),                     # 8: AF_UNIX -> allow
        op(ret, 0, 0, deny),                  # 9
        op(ret, 0, 0, allow),                 # 10
    ])

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    fprog = SockFprog(len(program) // 8, program)
    return (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 and
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0)


def landlock_writes_beneath(workdir):
    """Landlock: every kind of write is refused outside `workdir` (and /dev/null). Needs no privileges."""
    if not LINUX:
        return False
    abi = libc.syscall(SYS_LANDLOCK["create_ruleset"], None, 0, 1)  # 1 = LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return False
    write_file, remove_dir, remove_file, refer, truncate = 1 << 1, 1 << 4, 1 << 5, 1 << 13, 1 << 14
    make_any = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
    handled = write_file | remove_dir | remove_file | make_any | (refer if abi >= 2 else 0) | \
        (truncate if abi >= 3 else 0)
    attr = struct.pack("Q", handled)
    ruleset = libc.syscall(SYS_LANDLOCK["create_ruleset"], attr, len(attr), 0)
    if ruleset < 0:
        return False
    try:
        for path, allowed in ((workdir, handled), (os.devnull, handled & (write_file | truncate))):
            fd = os.open(path, os.O_PATH)
            try:
                rule = struct.pack("=Qi", allowed, fd)  # landlock_path_beneath_attr is packed
                if libc.syscall(SYS_LANDLOCK["add_rule"], ruleset, 1, rule, 0) != 0:
                    return False
            finally:
                os.close(fd)
        return (libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 and
                libc.syscall(SYS_LANDLOCK["restrict_self"], ruleset, 0) == 0)
    finally:
        os.close(ruleset)


def python_level_guards():
    """Against honest mistakes only (the kernel-level steps above are the isolation): destructive os/shutil
    functions become None, subprocesses and IPv4/IPv6 sockets of the socket module fail."""
    import builtins
    import shutil
    import socket
    import subprocess

    class NoNetSocket(socket.socket):
        def __init__(self, family=socket.AF_INET, *args, **kwargs):
            if family in (socket.AF_INET, socket.AF_INET6):
                raise OSError("network access is disabled in the nanochat sandbox")
            super().__init__(family, *args, **kwargs)

    def no_net(*args, **kwargs):
        raise OSError("network access is disabled in the nanochat sandbox")
    socket.socket = NoNetSocket
    socket.create_connection = socket.getaddrinfo = socket.gethostbyname = no_net
    # (os.putenv stays: it only touches this process's environment and numpy's import calls it)
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "system", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod",
                 "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "posix_spawn",
                 "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "execv", "execve", "execvp",
                 "execvpe", "popen"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[mod] = None


def main():
    program_path, report_path, memory, fsize, nproc, network, uid, staging = sys.argv[1:9]
    memory, fsize, nproc, uid = int(memory), int(fsize), int(nproc), int(uid)
    nonce = sys.stdin.buffer.readline().strip()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    report = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # before privileges go
    sys.path[:] = [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]

    applied = []
    if network == "auto" and unshare_network():
        applied.append("netns")
    elif block_sockets():
        applied.append("seccomp")
    if memory > 0 and platform.system() != "Darwin":  # RLIMIT_AS is not enforced on macOS
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            resource.setrlimit(limit, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if uid >= 0 and not expose_python(uid, staging):
        uid = -1  # the interpreter would not start its imports as another user: stay, and say so
    if uid >= 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))  # per uid, and the uid is this run's
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        applied += ["uid", "nproc"]
    if landlock_writes_beneath(os.getcwd()):
        applied.append("landlock")
    os.write(report, json.dumps(applied).encode())
    os.close(report)

    import faulthandler
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    python_level_guards()
    sys.argv = ["<program>"]
    finish = make_finish(nonce)
    del nonce
    import builtins
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    finish()


def make_finish(nonce):
    def finish():  # reached only when the program returned normally
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(1, b"\n" + nonce + b"\n")
    return finish


if __name__ == "__main__":
    main()
