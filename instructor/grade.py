"""Grade the students' completed Task 4 handouts: run each one in a sandbox, compare in here, vote on every [MASK].

    python instructor/grade.py SUBMISSIONS_DIR
    python instructor/grade.py SUBMISSIONS_DIR --out reports/ --timeout 120 --jobs 2
    python instructor/grade.py SUBMISSIONS_DIR --key out/handout/answer_key.json \
                                               --handout out/handout/modeling_gpt2.py

SUBMISSIONS_DIR holds one `NAME.py` per student, or one folder per student with a `modeling_gpt2.py` inside
(entries starting with '.' or '_' are skipped). Without --handout/--key, both are rebuilt from
gpt2/modeling_gpt2.py and instructor/mask_spec.toml, as make_handout.py does.

How a submission is graded:
  1. Read as text: a static scan (ast) flags imports a modeling file never needs (os, subprocess, importlib, ...),
     dynamic code (exec, eval, open, __import__), monkeypatching (torch.x = ...) and borrowing transformers' own
     GPT-2 classes ("not an implementation"); and each [MASK]'s fill is read back by aligning the file with the
     handout.
  2. Run in its own process (instructor/sandbox_child.py): CPU only, offline, with a time limit, in a scratch
     directory holding a copy of the file, the weights and the inputs; it computes the outputs with
     `run_checks_on` of Check_gpt2-base.py and writes them to a file. Nothing else it prints or returns counts.
  3. Compared in this process with `compare` of Check_gpt2-base.py against transformers' GPT2LMHeadModel, run here
     on the same weights. The weights are random at a tiny shape, from a secret seed drawn for each grading run,
     so no submission can know the expected numbers in advance; the reference outputs never touch the disk.
A submission PASSes only if every check passes and nothing was flagged. Score = checks passed / checks.

Writes OUT/report.csv and OUT/report.md (default OUT: SUBMISSIONS_DIR + "_report", next to it) and prints a summary.
"""

import argparse
import ast
import csv
import difflib
import io
import json
import os
import queue
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, load_script, parse_args, run_main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# By its path, so that it is one module however this file was started (a script, or loaded by a test or a bench).
make_handout = load_script(HERE / "make_handout.py")

CHECKER = ROOT / "Check_gpt2-base.py"
CHILD = HERE / "sandbox_child.py"
# The grading model: small enough for a laptop CPU, with several heads and layers so that every check means something.
GRADE_CONFIG = dict(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=300, bos_token_id=0, eos_token_id=0)
MAX_SOURCE_BYTES = 1_000_000
MAX_OUTPUT_BYTES = 100_000_000
# What a completed handout may import. Anything else (os, sys, subprocess, importlib, ctypes, ...) is flagged.
ALLOWED_IMPORTS = {"math", "torch", "transformers", "typing", "dataclasses", "functools", "itertools", "collections",
                   "warnings", "numbers", "numpy", "einops", "abc", "enum", "__future__", "copy", "operator",
                   "logging"}
FORBIDDEN_CALLS = {"exec", "eval", "compile", "__import__", "open", "breakpoint", "exit", "quit", "globals", "input"}
FORBIDDEN_ATTRS = {"__builtins__", "__globals__", "__code__", "__closure__", "__subclasses__", "f_back", "f_locals",
                   "f_globals", "_getframe", "__loader__", "__spec__"}
GPT2_NAMES = {"GPT2Model", "GPT2LMHeadModel", "GPT2PreTrainedModel", "GPT2Block", "GPT2Attention", "GPT2MLP",
              "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
              "GPT2ForQuestionAnswering", "pipeline"}


# ----------------------------------------------------------------------------------------------------------
# Finding the submissions
# ----------------------------------------------------------------------------------------------------------

def find_submissions(directory):
    """[(student, path or None, note)]: one NAME.py per student, or a folder per student with its file inside."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"no such submissions directory: {directory}; give the folder that holds the students' "
                        f"files.")
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith((".", "_")) or entry.is_symlink():
            continue
        if entry.is_file() and entry.suffix == ".py":
            found.append((entry.stem, entry, ""))
        elif entry.is_dir():
            files = sorted(p for p in entry.rglob("modeling_gpt2.py") if not p.is_symlink())
            files = files or sorted(p for p in entry.rglob("*.py") if not p.is_symlink())
            if len(files) == 1:
                found.append((entry.name, files[0], ""))
            else:
                found.append((entry.name, None,
                              f"{len(files)} candidate .py files in {entry.name}/ (expected one modeling_gpt2.py)"))
    if not found:
        raise UserError(f"no submissions in {directory}: put one NAME.py per student, or one folder per student, "
                        f"in it.")
    return found


# ----------------------------------------------------------------------------------------------------------
# Reading the file: the static scan and the fills of the [MASK]s
# ----------------------------------------------------------------------------------------------------------

def static_scan(text):
    """[(kind, message)], kind "not an implementation" or "forbidden". Code under `if __name__ == "__main__":`
    never runs here, so it is skipped."""
    try:
        tree = ast.parse(text)
    except SyntaxError as error:
        return [("syntax", f"syntax error on line {error.lineno}: {error.msg}")]
    scan = StaticScan()
    scan.visit(tree)
    return scan.findings


class StaticScan:
    """Walks a submission's syntax tree, every node before its children, in the file's order: an alias bound by an
    import is known by the time it is used."""

    def __init__(self):
        self.findings = []
        self.transformers_aliases, self.module_aliases = set(), {}  # name bound in the file -> the module it stands for

    def add(self, kind, node, message):
        item = (kind, f"line {getattr(node, 'lineno', '?')}: {message}")
        if item not in self.findings:
            self.findings.append(item)

    def visit(self, node):
        if is_main_guard(node):
            children = node.orelse
        else:
            self.check(node)
            children = ast.iter_child_nodes(node)
        for child in children:
            self.visit(child)

    def check(self, node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            self.check_import(node)
        elif isinstance(node, ast.Attribute):
            self.check_attribute(node)
        elif isinstance(node, ast.Name):
            if node.id in FORBIDDEN_ATTRS:
                self.add("forbidden", node, f"uses {node.id}")
        elif isinstance(node, ast.Call):
            self.check_call(node)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            self.check_assignment(node)

    def check_import(self, node):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for module in modules:
            top = module.split(".")[0]
            if isinstance(node, ast.ImportFrom) and node.level:
                self.add("forbidden", node, "relative import (a submission is a single file)")
            elif top == "gpt2":
                self.add("not an implementation", node, f"imports the reference answer ({module})")
            elif top not in ALLOWED_IMPORTS:
                self.add("forbidden", node, f"imports {module}, which a modeling file does not need")
            elif module.startswith("transformers.models."):
                names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else ["*"]
                if ".modeling_" in module or module.count(".") == 2 or isinstance(node, ast.Import):
                    borrowed = [n for n in names if n not in ("Conv1D", "GPT2Config")]
                    if borrowed:
                        self.add("not an implementation", node, f"imports {', '.join(borrowed)} from {module}")
        for alias in node.names:
            self.bind(node, alias)

    def bind(self, node, alias):
        """Remember what the name an import binds stands for."""
        bound = alias.asname or alias.name.split(".")[0]
        if isinstance(node, ast.Import):
            self.module_aliases[bound] = alias.name if alias.asname else alias.name.split(".")[0]
            if alias.name.split(".")[0] == "transformers":
                self.transformers_aliases.add(bound)
            return
        source = node.module or ""
        self.module_aliases[bound] = f"{source}.{alias.name}"
        if source.split(".")[0] == "transformers":
            if alias.name in GPT2_NAMES or alias.name.startswith("AutoModel") or alias.name == "*":
                self.add("not an implementation", node, f"imports {alias.name} from {source}")
            if alias.name == "models":
                self.transformers_aliases.add(bound)

    def check_attribute(self, node):
        name = dotted(node)
        if node.attr in FORBIDDEN_ATTRS:
            self.add("forbidden", node, f"uses .{node.attr} (introspection a modeling file does not need)")
        if name and name.split(".")[0] in self.transformers_aliases:
            rest = name.split(".")[1:]
            borrows = any(p in GPT2_NAMES or p.startswith("AutoModel") for p in rest)
            if borrows or rest[:2] == ["models", "gpt2"] and rest[2:3] != ["GPT2Config"]:
                self.add("not an implementation", node, f"uses {name}")

    def check_call(self, node):
        func = node.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
            self.add("forbidden", node, f"calls {func.id}()")
        if isinstance(func, ast.Name) and func.id in ("setattr", "delattr", "getattr", "vars") and node.args:
            target = dotted(node.args[0]) or ""
            if target.split(".")[0] in self.module_aliases:
                hidden_lookup = target.split(".")[0] in self.transformers_aliases and func.id == "getattr"
                self.add("not an implementation" if hidden_lookup else "forbidden", node,
                         f"calls {func.id}() on the module {target} (monkeypatching or a hidden lookup)")

    def check_assignment(self, node):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, (ast.Attribute, ast.Subscript)):
                    name = dotted(sub.value if isinstance(sub, ast.Subscript) else sub) or ""
                    if name.split(".")[0] in self.module_aliases:
                        self.add("forbidden", node, f"assigns to {name} (monkeypatching a library)")
                    break


def is_main_guard(node):
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__")


def dotted(node):
    """`a.b.c` for an attribute chain on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def canonical(code):
    """A fill's spelling that ignores spacing and comments, for voting: `3*x` and `3 * x` are one answer."""
    try:
        tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(code).readline)
                  if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER,
                                    tokenize.INDENT, tokenize.DEDENT)]
        return " ".join(tokens)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return "".join(code.split())


def line_pattern(handout_line):
    """A regex for a handout line with [MASK]s: the text around them fixed (any spacing), each fill captured."""
    def literal(part):
        words = part.split()
        body = r"\s*".join(re.escape(w) for w in words)
        return r"\s*" + body + r"\s*" if body else r"\s*"

    parts = handout_line.strip().split(make_handout.MASK)
    return re.compile("^" + "(.+?)".join(literal(p) for p in parts) + r"(?:#.*)?$")


def extract_fills(handout_text, submission_text):
    """Each [MASK]'s fill in the submission, in order; "?" where it cannot be found.

    The submission is aligned with the handout line by line (difflib), so comments and blank lines a student
    added do not matter; among the submission's lines that fit a masked line's pattern, the one nearest to
    where the alignment expects it wins.
    """
    handout_lines = handout_text.splitlines()
    sub_lines = submission_text.splitlines()
    def norm(line):
        return " ".join(line.split())

    matcher = difflib.SequenceMatcher(None, [norm(line) for line in handout_lines], [norm(line) for line in sub_lines],
                                      autojunk=False)
    expected = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for k in range(i1, i2):
            expected[k] = j1 + (k - i1) * (j2 - j1) / max(1, i2 - i1) if tag != "equal" else j1 + (k - i1)
    fills = []
    for index, line in enumerate(handout_lines):
        count = line.count(make_handout.MASK)
        if not count:
            continue
        pattern = line_pattern(line)
        best = None
        for j, candidate in enumerate(sub_lines):
            match = pattern.match(candidate)
            if match and (best is None or abs(j - expected.get(index, j)) < abs(best[0] - expected.get(index, j))):
                best = (j, match)
        if best is None:
            fills += ["?"] * count
        else:
            fills += [" ".join(g.split()) for g in best[1].groups()]
    return fills


def vote(fills_by_student, key_answers):
    """Per slot: the majority answer (ties go to the answer seen first), its votes, how many answered, and whether
    it is the key's."""
    slots = []
    for index, answer in enumerate(key_answers):
        fills = [f[index] for f in fills_by_student if index < len(f)]
        known = [f for f in fills if f != "?"]
        counts = Counter(canonical(f) for f in known)
        spelling = {}
        for f in known:
            spelling.setdefault(canonical(f), f)
        if counts:
            top, votes = counts.most_common(1)[0]
            majority = spelling[top]
        else:
            top, votes, majority = None, 0, "?"
        slots.append({"slot": index + 1, "majority": majority, "votes": votes, "answered": len(known),
                      "unknown": len(fills) - len(known), "key": answer,
                      "majority_is_key": top is not None and top == canonical(answer),
                      "tie": sum(1 for c in counts.values() if c == votes) > 1})
    return slots


# ----------------------------------------------------------------------------------------------------------
# Running one submission in its sandbox
# ----------------------------------------------------------------------------------------------------------

def child_env(home):
    """A bare environment: CPU only, offline, one thread, home and temp in the grader's scratch area."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home),
            "HF_HOME": str(Path(home) / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Sandbox:
    """A fork server (instructor/sandbox_child.py --serve): torch and transformers are imported once, and every
    submission runs in a fresh child forked from it, in its own session. One submission at a time per Sandbox."""

    START_TIMEOUT = 600.0

    def __init__(self, workdir, forbidden, name):
        self.workdir, self.forbidden, self.name = Path(workdir), forbidden, name
        self.process, self.buffer = None, b""
        self.start()

    def start(self):
        home = self.workdir / f"{self.name}-home"
        home.mkdir(exist_ok=True)
        command = [sys.executable, "-I", "-B", str(CHILD), "--serve", str(CHECKER)]
        for path in self.forbidden:
            command += ["--forbid", str(path)]
        self.log = open(self.workdir / f"{self.name}.log", "ab")
        self.process = subprocess.Popen(command, cwd=home, env=child_env(home), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        self.buffer, self.ready = b"", False

    def stop(self):
        if self.process is not None:
            kill_group(self.process.pid)
            self.process.wait()
            self.process = None
            self.log.close()

    def readline(self, deadline):
        """One line from the server, or None at the deadline or if it died."""
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.time()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def wait_ready(self):
        if not self.ready:
            if self.readline(time.time() + self.START_TIMEOUT) != "READY":
                self.stop()
                log_file = self.workdir / f"{self.name}.log"
                log = log_file.read_text(errors="replace").strip().splitlines()
                raise UserError(f"the sandbox process did not start ({log[-1] if log else 'no message'}): run again "
                                f"with --keep-workdir and read {log_file}.")
            self.ready = True

    def run(self, scratch, log_path, timeout):
        """Run the submission in `scratch`; returns (exit code or None, note)."""
        self.wait_ready()
        try:
            self.process.stdin.write(f"{scratch}\t{log_path}\n".encode())
            self.process.stdin.flush()
        except OSError:
            self.restart()
            return None, "the grading sandbox was not running; this submission could not be run"
        answer = self.readline(time.time() + 60)
        if not answer or not answer.startswith("PID "):
            self.restart()
            return None, "the grading sandbox did not start a process for this submission"
        pid = int(answer.split()[1])
        answer = self.readline(time.time() + timeout)
        note = ""
        if answer is None:
            kill_group(pid)  # the child, and anything it started, is its own process group
            note = f"timed out after {timeout:.0f} s (killed)"
            answer = self.readline(time.time() + 30)
        kill_group(pid)  # anything it left running
        if not answer or not answer.startswith("EXIT "):
            self.restart()  # the server itself died: whatever happened, it happened while this submission ran
            return None, note or "the grading sandbox died while this submission ran"
        return int(answer.split()[1]), note

    def restart(self):
        self.stop()
        self.start()


def run_child(sandbox, source_bytes, scratch, master_weights, inputs_file, timeout):
    """Run one submission; return (loaded outputs dict or None, note saying why not, seconds, log tail)."""
    scratch.mkdir(mode=0o700)
    (scratch / "modeling_gpt2.py").write_bytes(source_bytes)
    shutil.copytree(master_weights, scratch / "weights")  # its own copy: tampering with it harms only itself
    shutil.copy(inputs_file, scratch / "inputs.pt")
    log_path = scratch.parent / f"{scratch.name}.log"
    start = time.time()
    code, note = sandbox.run(scratch, log_path, timeout)
    seconds = time.time() - start
    tail = log_path.read_bytes()[-4000:].decode("utf-8", "replace") if log_path.is_file() else ""
    if note:
        return None, note, seconds, tail
    outputs_file = scratch / "outputs.pt"
    if not outputs_file.is_file() or outputs_file.is_symlink():
        how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        return None, f"the process ended ({how}) without writing its outputs", seconds, tail
    if outputs_file.stat().st_size > MAX_OUTPUT_BYTES:
        return None, "its outputs file is implausibly large", seconds, tail
    import torch

    try:
        data = torch.load(outputs_file, weights_only=True, map_location="cpu")
    except Exception as error:
        return None, f"its outputs file does not load ({type(error).__name__})", seconds, tail
    return data, "", seconds, tail


def clean_outputs(raw, reference):
    """Keep only what `compare` expects, of the types the reference has: a forged file cannot crash the
    comparison."""
    import torch

    def tensor(value, like):
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_meta:
            return None
        if like.dtype.is_floating_point:  # float64 stays float64: the tolerances there are float64's
            return None if value.is_complex() else value.to(like.dtype)
        return value if value.dtype == like.dtype else None

    clean = {}
    errors = raw.get("errors") if isinstance(raw, dict) else None
    clean["errors"] = {str(k): str(v)[:300] for k, v in errors.items()} if isinstance(errors, dict) else {}
    if not isinstance(raw, dict):
        return clean
    low = raw.get("low_precision")
    if isinstance(low, (list, tuple)):  # which modules computed in float32 inside the float64 run (labels only)
        clean["low_precision"] = [str(v)[:60] for v in low[:200] if isinstance(v, str)]
    for key, ref in reference.items():
        value = raw.get(key)
        if key in ("errors", "low_precision", "teacher_inputs") or value is None:
            continue
        if isinstance(ref, torch.Tensor):
            value = tensor(value, ref)
        elif key == "parameters":
            ok = isinstance(value, list) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
                and all(isinstance(n, int) for n in p[1]) for p in value)
            value = [[p[0], list(p[1])] for p in value] if ok else None
        elif isinstance(ref, bool):
            value = value if isinstance(value, bool) else None
        elif isinstance(ref, list):
            same_length = isinstance(value, (list, tuple)) and len(value) == len(ref)
            value = [tensor(v, r) for v, r in zip(value, ref)] if same_length else None
            value = value if value is not None and all(v is not None for v in value) else None
        elif isinstance(ref, dict):
            value = {k: tensor(value.get(k), r) for k, r in ref.items()} if isinstance(value, dict) else None
            value = {k: v for k, v in value.items() if v is not None} if value is not None else None
        else:
            value = None
        if value is not None:
            clean[key] = value
    return clean


def strings(value, limit=20):
    return [str(v)[:300] for v in value[:limit]] if isinstance(value, (list, tuple)) else []


# ----------------------------------------------------------------------------------------------------------
# Grading every submission
# ----------------------------------------------------------------------------------------------------------

class Grader:
    """Holds the secret weights, the inputs and the reference outputs of one grading run."""

    def __init__(self, workdir, seed, timeout):
        import torch
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.check = load_script(CHECKER)  # its checks are the grader's checks
        self.workdir, self.timeout = Path(workdir), timeout
        self.warnings = set()  # said once per run, in the report
        self.weights = self.workdir / "weights"
        self.check.sensitive_random_gpt2(seed, **GRADE_CONFIG).save_pretrained(self.weights)
        config = GPT2LMHeadModel.config_class.from_pretrained(self.weights)
        self.inputs = self.check.make_inputs(config, seed=seed)
        # The reference: transformers' own GPT-2, in this process only. Its outputs are never written to disk; only
        # what goes into each module on a separate batch (for the teacher-forced module checks) goes to the children.
        self.reference = self.check.run_checks_on(GPT2LMHeadModel, self.weights, self.inputs, "cpu")
        self.inputs["teacher"] = self.reference["teacher_inputs"]
        self.inputs_file = self.workdir / "inputs.pt"
        torch.save(self.inputs, self.inputs_file)
        self.check_names = [r["check"] for r in self.check.compare(self.reference, self.reference, self.inputs)]

    def grade(self, sandbox, index, student, path, note, handout, key_answers):
        """One submission: read it as text, run it in `sandbox`, compare its outputs here; returns its result."""
        result = empty_result(student, path, len(key_answers))
        if path is None:
            result["notes"].append(note)
            return result
        source = Path(path).read_bytes()
        if len(source) > MAX_SOURCE_BYTES:
            result["notes"].append(f"file too large ({len(source)} bytes)")
            return result
        read_text(result, source.decode("utf-8", "replace"), handout, key_answers)

        data, why, result["seconds"], tail = run_child(sandbox, source, self.workdir / f"s{index:03d}", self.weights,
                                                       self.inputs_file, self.timeout)
        harness = data.get("harness") if isinstance(data, dict) else None
        if data is not None and not isinstance(harness, dict):
            data, why = None, "its outputs file is not the grader's format"
        if data is None:
            result["notes"].append(why)
            for line in tail.splitlines():  # refusals the sandbox printed before the process died
                if line.startswith("SANDBOX: ") and f"cheat: {line[9:]}" not in result["flags"]:
                    result["flags"].append(f"cheat: {line[9:]}")
            return result
        self.read_harness(result, harness)
        if harness.get("import_error"):
            result["notes"].append(str(harness["import_error"])[:300])
            return result
        if harness.get("run_error"):
            result["notes"].append(f"crashed: {str(harness['run_error'])[:300]}")
            return result
        try:
            rows = self.check.compare(self.reference, clean_outputs(data.get("outputs"), self.reference), self.inputs)
        except Exception as error:  # a forged or half-written outputs file must not stop the grading of the others
            result["notes"].append(f"outputs could not be compared ({type(error).__name__}: {error})"[:300])
            return result
        score(result, rows, key_answers)
        return result

    def read_harness(self, result, harness):
        """Flags for what the sandbox saw the submission do."""
        for violation in strings(harness.get("violations")):
            result["flags"].append(f"cheat: {violation}")
        for flag in strings(harness.get("flags")):
            result["flags"].append(f"not an implementation: {flag}")
        if harness.get("not_own_classes"):
            result["flags"].append("not an implementation: uses classes from transformers' models: "
                                   + ", ".join(strings(harness["not_own_classes"], 3)))
        if harness.get("monkeypatched"):
            result["flags"].append("cheat: monkeypatches " + ", ".join(strings(harness["monkeypatched"], 5)))
        if harness.get("landlock"):
            self.warnings.add(f"the kernel sandbox (Landlock) was not applied ({str(harness['landlock'])[:200]}): "
                              "only the Python-level guards were active, so C code could still write outside its "
                              "scratch directory")
        crash = f"{harness.get('import_error') or ''} {harness.get('run_error') or ''}"
        if "PermissionError" in crash or "Permission denied" in crash:
            result["flags"].append("cheat: tried to reach files or processes outside its sandbox (refused)")


def empty_result(student, path, slots):
    """A submission's result before anything is known: FAIL, score 0, every fill unknown."""
    return {"student": student, "file": str(path) if path else "", "passed": False, "score": 0.0, "rows": [],
            "flags": [], "notes": [], "fills": ["?"] * slots, "seconds": 0.0}


def read_text(result, text, handout, key_answers):
    """What the text alone says: each [MASK]'s fill, and the static scan's findings."""
    result["fills"] = extract_fills(handout, text)
    result["fills_ok"] = sum(canonical(f) == canonical(a) for f, a in zip(result["fills"], key_answers))
    for kind, message in static_scan(text):
        if kind == "syntax":
            result["notes"].append(message)
        else:
            result["flags"].append(f"{kind}: {message}")


def score(result, rows, key_answers):
    """PASS only with every check passed and nothing flagged or noted; a flagged submission scores 0."""
    result["rows"] = rows
    passed = sum(r["passed"] for r in rows)
    result["score"] = 0.0 if result["flags"] else passed / len(rows)
    result["passed"] = passed == len(rows) and not result["flags"] and not result["notes"]
    failed = [r for r in rows if not r["passed"]]
    if failed:
        first = failed[0]
        result["notes"].append(f"{len(failed)} check(s) fail; first: {first['check']}"
                               + (f" ({first['note']})" if first["note"] else ""))
        result["notes"] += diagnosis(failed, result["fills"], key_answers)


def diagnosis(failed_rows, fills, key_answers):
    """For a failing submission: the first module whose output diverges, and the [MASK] fills that differ from the
    key."""
    notes = []
    for row in failed_rows:
        match = re.search(r"first divergence: ([^;]+)", row["note"])
        if match:
            notes.append(f"first diverging module: {match.group(1)}")
            break
    differ = [f"#{i + 1} `{fill}` (key `{answer}`)" for i, (fill, answer) in enumerate(zip(fills, key_answers))
              if canonical(fill) != canonical(answer)]
    if differ:
        notes.append("[MASK] fills that differ from the key: " + ", ".join(differ[:6])
                     + (" ..." if len(differ) > 6 else ""))
    elif fills:
        notes.append("every [MASK] fill equals the key: the mistake is outside the masks")
    return notes


def snapshot_tree(directory):
    """{relative path: (size, mtime)} of everything under a directory, to notice a write that got past the
    sandbox."""
    state = {}
    for path in Path(directory).rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        state[str(path.relative_to(directory))] = (st.st_size, st.st_mtime_ns)
    return state


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------

def write_reports(out_dir, results, check_names, slots, key, meta):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["student", "result", "score", "checks passed", *check_names, "fills = key", "notes"]

    def row_of(r):
        by_check = {row["check"]: row["passed"] for row in r["rows"]}
        cells = [("PASS" if by_check[c] else "FAIL") if c in by_check else "-" for c in check_names]
        notes = "; ".join(r["flags"] + r["notes"])
        return [r["student"], "PASS" if r["passed"] else "FAIL", f"{r['score']:.2f}",
                f"{sum(by_check.values())}/{len(check_names)}", *cells, f"{r.get('fills_ok', 0)}/{len(slots)}", notes]

    with open(out_dir / "report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            writer.writerow(row_of(r))

    def md(cell):
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["# Task 4 grading report", "",
             f"{meta['passed']}/{len(results)} submissions pass. Graded {meta['date']} in {meta['seconds']:.0f} s; "
             f"weights: random GPT-2 at {meta['shape']}, seed drawn for this run (secret).", ""]
    if meta.get("warnings"):
        lines += ["**Warnings:**", ""] + [f"- {md(w)}" for w in meta["warnings"]] + [""]
    lines += ["## Students", "", "| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md(c) for c in row_of(r)) + " |" for r in results]
    lines += ["", "## Every [MASK]: the class's majority answer", "",
              "| # | section | handout line | majority answer | votes | ? | = key |", "|---|---|---|---|---|---|---|"]
    for s, k in zip(slots, key["slots"]):
        mark = "yes" if s["majority_is_key"] else f"no (key: `{md(s['key'])}`)"
        tie = " (tie)" if s["tie"] else ""
        lines.append(f"| {s['slot']} | {md(k['section'])} | `{md(k['handout_line'].strip())}` | "
                     f"`{md(s['majority'])}`{tie} | {s['votes']}/{s['answered']} | {s['unknown']} | {mark} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def print_summary(results, slots, check_names):
    width = max(len(r["student"]) for r in results)
    print(f"\n{'student':<{width}}  result  score  checks  notes")
    print("-" * (width + 60))
    for r in results:
        passed = sum(row["passed"] for row in r["rows"])
        notes = "; ".join(r["flags"] + r["notes"])
        result = "PASS" if r["passed"] else "FAIL"
        print(f"{r['student']:<{width}}  {result:<6}  {r['score']:.2f}   {passed:>2}/{len(check_names)}   "
              f"{notes[:110]}")
    agree = sum(s["majority_is_key"] for s in slots)
    print(f"\nMajority vote: the class's answer equals the key on {agree}/{len(slots)} [MASK]s.")
    for s in slots:
        if not s["majority_is_key"]:
            print(f"  [MASK] #{s['slot']}: majority {s['majority']!r} ({s['votes']}/{s['answered']} votes), "
                  f"key {s['key']!r}")


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submissions", help="folder with one NAME.py per student, or one folder per student")
    parser.add_argument("--out", help="where to write report.csv and report.md "
                                      "(default: SUBMISSIONS_report next to it)")
    parser.add_argument("--handout", help="the handout the students got "
                                          "(default: rebuilt from the reference and the spec)")
    parser.add_argument("--key", help="its answer_key.json from make_handout.py (default: rebuilt likewise)")
    parser.add_argument("--spec", default=str(make_handout.DEFAULT_SPEC),
                        help="mask spec when rebuilding (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per submission before it is killed (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="submissions run at the same time (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="weights/inputs seed (default: a secret one per run; only to reproduce a run)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the scratch directories and logs (for debugging)")
    return parser


def load_handout_and_key(args):
    if bool(args.handout) != bool(args.key):
        raise UserError("give both --handout and --key, or neither (then both are rebuilt from the reference).")
    if args.handout:
        try:
            handout = Path(args.handout).read_bytes().decode("utf-8")
            key = json.loads(Path(args.key).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read the handout or the key ({error}): give the files make_handout.py "
                            f"wrote.") from None
        if handout.count(make_handout.MASK) != len(key.get("slots", [])):
            raise UserError(f"{args.handout} has {handout.count(make_handout.MASK)} [MASK]s but {args.key} has "
                            f"{len(key.get('slots', []))} answers: give the two files of one make_handout.py run.")
        return handout, key
    _reference, handout, key = make_handout.make(make_handout.DEFAULT_REFERENCE, args.spec)
    return handout, key


def main(argv=None):
    args = parse_args(build_parser(), argv)
    start = time.time()
    submissions_dir = Path(args.submissions).resolve()
    found = find_submissions(submissions_dir)
    out_dir = Path(args.out) if args.out else submissions_dir.parent / f"{submissions_dir.name}_report"
    handout, key = load_handout_and_key(args)
    key_answers = [s["answer"] for s in key["slots"]]
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    # What a submission may not read: the other submissions, the grader (and the key next to it), the reference answer.
    forbidden = [submissions_dir, out_dir.resolve(), HERE, ROOT / "gpt2"]
    forbidden += [Path(args.key).resolve().parent] if args.key else []
    before = snapshot_tree(submissions_dir)
    print(f"Grading {len(found)} submission(s) from {submissions_dir} ({args.jobs} at a time, {args.timeout:.0f} s "
          f"each) ...", flush=True)
    results, grader = grade_all(found, args, forbidden, seed, handout, key_answers)

    warnings = sorted(grader.warnings) + changed_warning(before, snapshot_tree(submissions_dir))
    slots = vote([r["fills"] for r in results if r["file"]], key_answers)
    meta = {"passed": sum(r["passed"] for r in results), "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": time.time() - start,
            "shape": ", ".join(f"{k}={v}" for k, v in GRADE_CONFIG.items() if k.startswith("n_") or k == "vocab_size"),
            "warnings": warnings}
    write_reports(out_dir, results, grader.check_names, slots, key, meta)
    print_summary(results, slots, grader.check_names)
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"\n{meta['passed']}/{len(results)} pass, in {meta['seconds']:.0f} s. Reports: {out_dir / 'report.md'}, "
          f"{out_dir / 'report.csv'}")
    return 0


def grade_all(found, args, forbidden, seed, handout, key_answers):
    """Grade every submission, args.jobs at a time, each lane with a sandbox of its own; returns (results, grader)."""
    workdir = Path(tempfile.mkdtemp(prefix="grade-gpt2-"))
    jobs = max(1, args.jobs)
    sandboxes = queue.Queue()
    try:
        # The sandboxes import torch while this process computes the reference: both take a few seconds.
        for lane in range(jobs):
            sandboxes.put(Sandbox(workdir, forbidden + [workdir], f"sandbox{lane}"))
        grader = Grader(workdir, seed, args.timeout)

        def one(item):
            index, (student, path, note) = item
            sandbox = sandboxes.get()
            try:
                result = grader.grade(sandbox, index, student, path, note, handout, key_answers)
            except UserError:
                raise
            except Exception as error:  # never let one submission stop the others
                result = empty_result(student, path, len(key_answers))
                result["notes"].append(f"grader error on this submission: {type(error).__name__}: {error}"[:300])
            finally:
                sandboxes.put(sandbox)
            print(f"  {'PASS' if result['passed'] else 'FAIL'}  {student}  ({result['seconds']:.1f} s)", flush=True)
            return result

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(one, enumerate(found)))
    finally:
        while not sandboxes.empty():
            sandboxes.get().stop()
        if args.keep_workdir:
            print(f"Scratch directories and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results, grader


def changed_warning(before, after):
    """A warning (in a list) if the submissions directory changed while grading, else []."""
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed:
        return []
    return [f"the submissions directory changed while grading (something got past the sandbox): "
            f"{', '.join(changed[:5])}"]


if __name__ == "__main__":
    run_main(main)
