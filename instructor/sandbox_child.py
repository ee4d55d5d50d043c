"""The sandbox of instructor/grade.py: import ONE student's modeling_gpt2.py and compute its outputs.

Not meant to be run by hand. grade.py starts it as a small fork server:

    python -I -B instructor/sandbox_child.py --serve CHECKER [--forbid DIR ...]

with a bare environment (CPU only, offline, one thread). The server imports torch, transformers and the checker
once (the slow part, ~5 s) and warms them up on a throw-away model; then, for each line `SCRATCH LOGFILE` it reads
on stdin, it forks a fresh child, answers `PID n`, waits for it and answers `EXIT status`. The student's code only
ever runs in such a child, never in the server: whatever it patches or breaks dies with the child.

The child starts its own session (the grader kills its process group on timeout), moves into SCRATCH (also its
HOME and TMPDIR), sends stdout/stderr to LOGFILE and loses the server's pipes. SCRATCH holds a copy of the
student's file (modeling_gpt2.py), the weights the grader chose (weights/) and the inputs (inputs.pt). The child
calls `run_checks_on` of Check_gpt2-base.py on the student's GPT2LMHeadModel and saves what it returns, with what
it saw, to SCRATCH/outputs.pt. It compares nothing: the reference outputs exist only in the grader's process,
which loads this file with `torch.load(weights_only=True)` and runs `compare` itself.

What the child watches, so the grader can say why a submission FAILs (Python-level guards: see
instructor/README.md for what they cannot stop):
  * an audit hook (sys.addaudithook), installed before the student's file is imported: writing, deleting or
    renaming files outside SCRATCH, reading the forbidden directories (other submissions, the grader's files,
    the reference answer), starting processes, sending signals, opening sockets, loading C libraries with
    ctypes and walking the garbage collector's objects are refused and recorded;
  * transformers' own GPT-2 classes are wrapped: building or running one is recorded ("not an implementation");
  * the identity of torch's, transformers' and the checker's functions before and after: a monkeypatch is recorded.
"""

import builtins
import ctypes
import math
import os
import resource
import struct
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, load_script, parse_args, run_main

# And off sys.path again at once: the student's code must find only what `python -I` puts there, as it always did.
# (The checker's own `from course_utils import ...` is answered from sys.modules.)
del sys.path[0]

# Where a refused action is reported at once, even if the student's code later kills this process.
STDERR_FD = 2
MAX_FILE_BYTES = 256 * 1024 * 1024  # nothing this process writes needs more; a runaway writer stops here
GPT2_CLASSES = ("GPT2Model", "GPT2LMHeadModel", "GPT2PreTrainedModel", "GPT2Block", "GPT2Attention", "GPT2MLP",
                "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
                "GPT2ForQuestionAnswering")
# Landlock (linux/landlock.h): its system calls (the same numbers on x86_64 and arm64) and some access rights.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14
READ_FILE_RIGHTS = EXECUTE | READ_FILE
READ_RIGHTS = READ_FILE_RIGHTS | READ_DIR


def say(message):
    os.write(STDERR_FD, (message + "\n").encode("utf-8", "replace"))


def snapshot(namespaces):
    """{(namespace, name): object id} for everything the comparison relies on, to notice a monkeypatch later."""
    ids = {}
    for label, namespace in namespaces.items():
        for name, value in list(vars(namespace).items()):
            ids[(label, name)] = id(value)
    return ids, namespaces


def changed_since(before):
    ids, namespaces = before
    changed = []
    for (label, name), ident in ids.items():
        current = vars(namespaces[label]).get(name, None)
        if id(current) != ident:
            changed.append(f"{label}.{name}")
    return sorted(changed)


def guard_transformers_gpt2(flags):
    """Record any use of transformers' own GPT-2 classes: a submission must implement them, not borrow them."""
    from transformers.models.gpt2 import modeling_gpt2 as theirs

    def wrap(cls, method):
        original = cls.__dict__[method]

        def guarded(self, *args, **kwargs):
            message = f"uses transformers' own {cls.__name__} ({method})"
            if message not in flags:
                flags.append(message)
                say(f"SANDBOX: {message}")
            raise RuntimeError("transformers' GPT-2 classes may not be used by a submission")

        guarded.__name__ = original.__name__
        setattr(cls, method, guarded)

    for name in GPT2_CLASSES:
        cls = getattr(theirs, name, None)
        if cls is None:
            continue
        for method in ("__init__", "forward"):
            if method in cls.__dict__:
                wrap(cls, method)


def install_audit_hook(scratch, forbidden, violations):
    """Refuse and record what a modeling file has no business doing. Returns nothing; hooks cannot be removed."""
    check_read, check_write, refuse = path_guards(scratch, forbidden, violations)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    busy = [False]

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & write_flags)
                if writing:
                    check_write(path, "writes")
                else:
                    check_read(path, "reads")
            elif event in ("os.listdir", "os.scandir", "glob.glob", "os.chdir"):
                if args and args[0] is not None:
                    check_read(args[0] if event != "glob.glob" else os.path.dirname(str(args[0])) or ".", "lists")
            elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                           "os.symlink", "os.link", "shutil.rmtree", "os.setxattr", "os.removexattr"):
                for path in args[:2] if event in ("os.symlink", "os.link") else args[:1]:
                    check_write(path, f"{event}")
            elif event in ("os.rename", "shutil.move", "shutil.copyfile", "shutil.copytree"):
                check_read(args[0], f"{event} from")
                check_write(args[1], f"{event} to")
            elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
                refuse(f"sends a signal ({event} {args[0]})")
            elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                           "os.forkpty", "pty.spawn", "os.startfile"):
                refuse(f"starts a process ({event})")
            elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
                refuse(f"uses the network ({event})")
            elif event in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.addressof"):
                refuse(f"uses ctypes ({event})")
            elif event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
                refuse(f"inspects the grader's objects ({event})")
        finally:
            busy[0] = False

    sys.addaudithook(hook)


def path_guards(scratch, forbidden, violations):
    """The audit hook's (check_read, check_write, refuse): closures, like the hook itself, so that nothing the
    student's code can reach through this module's globals changes what they allow."""
    scratch = os.path.realpath(scratch)
    forbidden = [os.path.realpath(p) for p in forbidden]

    def inside(path, root):
        return path == root or path.startswith(root + os.sep)

    def resolve(path):
        if isinstance(path, int):
            return None
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        return os.path.realpath(os.path.join(os.getcwd(), path))

    def refuse(what):
        if what not in violations:
            violations.append(what)
            say(f"SANDBOX: {what}")
        raise PermissionError(f"refused by the grader's sandbox: {what}")

    def check_write(path, event):
        resolved = resolve(path)
        if resolved is not None and not inside(resolved, scratch) and resolved != os.devnull:
            refuse(f"{event} outside its scratch directory: {resolved}")

    def check_read(path, event):
        resolved = resolve(path)
        if resolved is not None and not inside(resolved, scratch) and any(inside(resolved, root) for root in forbidden):
            refuse(f"{event} a grader-only path: {resolved}")

    return check_read, check_write, refuse


def landlock(scratch, forbidden):
    """Kernel-enforced sandbox (Linux Landlock, no privileges needed): returns "" when applied, else why not.

    After this, this process and anything it starts can write only inside SCRATCH, read only the Python install,
    system directories and SCRATCH (so not other submissions, the grader's files or the reference answer), open no
    TCP connection and send no signal to a process outside the sandbox (the server, the grader). C code is bound
    too: a write through torch.save's C++ writer is refused as surely as Python's open().
    """
    if not sys.platform.startswith("linux"):
        return "not Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return f"Landlock is not available here ({os.strerror(ctypes.get_errno())})"
    all_rights = landlock_rights(abi)
    ruleset, why_not = landlock_ruleset(libc, abi, all_rights)
    if ruleset < 0:
        return why_not
    for path in readable_dirs(forbidden):
        landlock_allow(libc, ruleset, abi, path, READ_RIGHTS)
    landlock_allow(libc, ruleset, abi, os.devnull, READ_FILE_RIGHTS | WRITE_FILE)
    landlock_allow(libc, ruleset, abi, str(scratch), all_rights)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, required by landlock_restrict_self
        return "prctl(PR_SET_NO_NEW_PRIVS) failed"
    if libc.syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
        return f"landlock_restrict_self failed ({os.strerror(ctypes.get_errno())})"
    os.close(ruleset)
    return ""


def landlock_rights(abi):
    """Every file-system right this kernel's Landlock ABI knows: the ruleset denies each one it does not allow."""
    rights = (1 << 13) - 1                           # ABI 1: bits 0..12
    rights |= (1 << 13) if abi >= 2 else 0           # REFER
    rights |= TRUNCATE if abi >= 3 else 0
    rights |= (1 << 15) if abi >= 5 else 0           # IOCTL_DEV
    return rights


def landlock_ruleset(libc, abi, all_rights):
    """(file descriptor of a new ruleset that handles `all_rights`, "") or (a negative number, why not)."""
    if abi >= 6:  # deny TCP, and scope signals and abstract unix sockets to the sandbox itself
        attr = struct.pack("QQQ", all_rights, 0b11, 0b11)
    elif abi >= 4:
        attr = struct.pack("QQ", all_rights, 0b11)
    else:
        attr = struct.pack("Q", all_rights)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(LANDLOCK_CREATE_RULESET, buffer, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        return ruleset, f"Landlock ruleset refused ({os.strerror(ctypes.get_errno())})"
    return ruleset, ""


def readable_dirs(forbidden):
    """The real paths the sandbox may read below: the Python install, the system's directories and sys.path's,
    except any that contains a forbidden one."""
    forbidden = [os.path.realpath(p) for p in forbidden]
    readable = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
                "/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc", "/proc", "/sys", "/dev", "/opt", "/nix"}
    readable |= {p for p in sys.path if p and os.path.isdir(p)}
    dirs = []
    for path in sorted(readable):
        real = os.path.realpath(path)
        if any(root == real or root.startswith(real.rstrip(os.sep) + os.sep) for root in forbidden):
            continue  # never open up a directory that contains what a submission may not read
        dirs.append(real)
    return dirs


def landlock_allow(libc, ruleset, abi, path, rights):
    """A rule of the ruleset: `rights` beneath `path` (a path that cannot be opened is skipped)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not os.path.isdir(path):
            rights &= READ_FILE_RIGHTS | WRITE_FILE | (TRUNCATE if abi >= 3 else 0)  # file rules take file rights only
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
        if libc.syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0)) < 0:
            say(f"SANDBOX-NOTE: Landlock rule for {path} refused ({os.strerror(ctypes.get_errno())})")
    finally:
        os.close(fd)


def prepare():
    """Import (and warm up) everything a run needs, once, in the server: the children inherit it by fork."""
    import torch
    import transformers
    from transformers import GPT2LMHeadModel  # noqa: F401  (transformers imports it lazily: here, once, in the server)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    return torch, transformers


def warm_up(check, torch, workdir):
    """One run of the checks on transformers' GPT-2 at a toy size, so that the lazy imports happen here, not per
    child."""
    import tempfile

    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tiny = dict(n_layer=1, n_head=2, n_embd=8, n_positions=64, vocab_size=50, bos_token_id=0, eos_token_id=0)
        check.sensitive_random_gpt2(0, **tiny).save_pretrained(tmp)
        inputs = check.make_inputs(GPT2LMHeadModel.config_class.from_pretrained(tmp), length=8)
        check.run_checks_on(GPT2LMHeadModel, tmp, inputs, "cpu")


def run_one(scratch, log_file, check, forbidden):
    """In the forked child: isolate, watch, import the student's file, run the checks, save, and _exit."""
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GenerationMixin, PreTrainedModel

    scratch = isolate(scratch, log_file)
    run_checks_on, torch_save, torch_load = check.run_checks_on, torch.save, torch.load
    inputs = torch_load(scratch / "inputs.pt", weights_only=True)
    harness = {"import_error": None, "run_error": None, "violations": [], "flags": [], "monkeypatched": [],
               "not_own_classes": []}
    guard_transformers_gpt2(harness["flags"])
    before = snapshot({"torch": torch, "torch.Tensor": torch.Tensor, "torch.nn.functional": F,
                       "torch.nn.Module": torch.nn.Module, "torch.testing": torch.testing, "torch.nn": torch.nn,
                       "math": math, "builtins": builtins, "checker": check, "PreTrainedModel": PreTrainedModel,
                       "GenerationMixin": GenerationMixin, "transformers": transformers})
    try:
        harness["landlock"] = landlock(scratch, forbidden) or None
    except Exception as error:  # never lose the run over the sandbox's own setup; the grader reports it
        harness["landlock"] = f"{type(error).__name__}: {error}"
    install_audit_hook(scratch, forbidden, harness["violations"])

    outputs = {}
    try:
        module = check.load_module(scratch / "modeling_gpt2.py")
    except check.UserError as error:  # the checker's own sentence: a [MASK] left, no GPT2LMHeadModel, ...
        harness["import_error"] = str(error).replace(str(scratch) + os.sep, "")
        module = None
    except BaseException as error:  # SystemExit, KeyboardInterrupt, ...: an import must not end the process
        harness["import_error"] = f"the file stops the process while importing ({type(error).__name__}: {error})"[:300]
        module = None

    if module is not None:
        # The classes that do the work must be the submission's own, not transformers' GPT-2 re-exported.
        model_class = getattr(module, "GPT2LMHeadModel", None)
        for cls in getattr(model_class, "__mro__", ()):
            if cls.__module__.startswith("transformers.models.") or (
                    cls.__name__.startswith("GPT2") and cls.__module__ != module.__name__):
                harness["not_own_classes"].append(f"{cls.__module__}.{cls.__name__}")
        for name, value in list(vars(module).items()):
            if (isinstance(value, type) and value.__module__.startswith("transformers.models.")
                    and ".modeling_" in value.__module__):
                harness["not_own_classes"].append(f"{name} = {value.__module__}.{value.__name__}")
        try:
            outputs = run_checks_on(model_class, str(scratch / "weights"), inputs, "cpu")
        except BaseException as error:
            harness["run_error"] = f"{type(error).__name__}: {error}"[:300]

    harness["monkeypatched"] = changed_since(before)
    try:
        torch_save({"outputs": outputs, "harness": harness}, scratch / "outputs.tmp")
        os.replace(scratch / "outputs.tmp", scratch / "outputs.pt")
    except BaseException as error:
        say(f"SANDBOX: could not save the outputs: {type(error).__name__}: {error}")
        os._exit(3)
    os._exit(0)  # not sys.exit: atexit handlers and threads the student left behind must not run after this


def isolate(scratch, log_file):
    """Cut the forked child loose from the server; returns SCRATCH, resolved, now its working directory."""
    os.setsid()  # its own session and process group: the grader's timeout kills exactly this group
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for fd in (devnull, log):
        os.close(fd)
    os.closerange(3, 256)  # nothing of the server's pipes is left to forge an answer with
    scratch = Path(scratch).resolve()
    os.chdir(scratch)
    os.environ.update(HOME=str(scratch), TMPDIR=str(scratch))
    import tempfile

    tempfile.tempdir = None
    # No core dumps, no runaway files (the hard limits cannot be raised again by the student's code).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    return scratch


def serve(checker_path, forbidden):
    """The fork server: one request per stdin line, answered on stdout; the student's code never runs here."""
    torch, _transformers = prepare()
    check = load_script(checker_path, "grader_check_gpt2_base")
    warm_up(check, torch, os.environ.get("TMPDIR") or None)
    answer = sys.stdout
    answer.write("READY\n")
    answer.flush()
    for line in sys.stdin:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            continue
        scratch, log_file = parts
        pid = os.fork()
        if pid == 0:
            try:
                run_one(scratch, log_file, check, forbidden)
            finally:
                os._exit(4)
        answer.write(f"PID {pid}\n")
        answer.flush()
        _pid, status = os.waitpid(pid, 0)
        answer.write(f"EXIT {os.waitstatus_to_exitcode(status)}\n")
        answer.flush()
    return 0


def build_parser():
    parser = ArgumentParser(description="The sandbox of instructor/grade.py, which starts it (not run by hand).")
    parser.add_argument("--serve", metavar="CHECKER", required=True,
                        help="Check_gpt2-base.py, whose run_checks_on computes a submission's outputs")
    parser.add_argument("--forbid", metavar="DIR", action="append", default=[],
                        help="a directory the submissions may not read (repeatable)")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    return serve(args.serve, args.forbid)


if __name__ == "__main__":
    run_main(main)
