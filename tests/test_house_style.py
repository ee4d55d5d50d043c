"""One house style across the scripts (issue 15): the same option names and choices, one kind of user error,
short functions. Each script is run as a user runs it (a subprocess), so what is checked is what a student sees."""
import ast
import os
import re
import subprocess
import sys

import pytest

from gpt2_helpers import ROOT

SCRIPTS = ["A+B_Problem.py", "ChatGLM.py", "ChatGPT2-base.py", "Check_gpt2-base.py", "Pretraining.py",
           "Supervised_Fine-Tuning.py", "convert_chatglm2.py", "instructor/grade.py", "instructor/make_handout.py",
           "bench/bench_ab.py", "bench/bench_chat.py", "bench/bench_gpt2.py", "bench/bench_grade.py",
           "bench/bench_pretrain.py", "bench/bench_sft.py", "bench/gpu_check.py"]
# Old spellings: still accepted (hidden aliases), never shown in --help.
OLD_NAMES = ["--output", "--precision", "--reference", "--eval-interval", "--save-interval", "--base"]
SHARED_CHOICES = {"--dtype": "{auto,fp32,bf16,fp16}", "--model-impl": "{repo,transformers}"}
# Exception classes that are not user errors: each is told apart by code that catches it.
OTHER_EXCEPTIONS = {"BadRequest",     # ChatGLM.py: an HTTP 400 answer of the API
                    "PromptError",    # chat_engine.py: a conversation that cannot become a prompt (400 / a note)
                    "ContextTooLong",  # chat_engine.py: the same, with its own OpenAI error code
                    "StepFailed"}     # bench/gpu_check.py: one failed row of the report, the check goes on


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_uses_the_shared_vocabulary(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))
    assert not options & set(OLD_NAMES), f"{script} shows old option names: {options & set(OLD_NAMES)}"
    for option, choices in SHARED_CHOICES.items():
        if option in options:
            assert f"{option} {choices}" in result.stdout, f"{script}: {option} should be {choices}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unknown_option_is_one_error_line_with_exit_2(script):
    # the required positionals, else argparse asks for these first
    positional = {"convert_chatglm2.py": ["SRC", "OUT"], "instructor/grade.py": ["SUBMISSIONS"]}.get(script, [])
    result = run(script, *positional, "--no-such-option")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("Error: unrecognized arguments: --no-such-option"), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def python_files():
    return sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts
                  and not p.name.startswith("."))


def test_functions_are_short():
    """At most about 60 lines a function (nested functions count toward the one around them)."""
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 62:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_one_user_error_class_and_no_message_exits():
    """UserError lives in course_utils.py; nothing ends a run with sys.exit("message") / SystemExit("message")."""
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "").endswith(("Error", "Exception"))
                                                       for b in node.bases):
                if not (node.name == "UserError" and path.name == "course_utils.py") and \
                        node.name not in OTHER_EXCEPTIONS:
                    found.append(f"{where} class {node.name}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "SystemExit") and node.args \
                    and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)) \
                    and isinstance(getattr(node.args[0], "value", ""), str):
                found.append(f"{where} {ast.unparse(node)[:60]}")
    assert not found, found
