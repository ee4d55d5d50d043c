"""Task 4 for the instructor: the masked handout round-trips, and grading passes only correct, honest submissions.

One real grading run (module fixture) covers correct submissions, every kind of bug and every kind of cheat at
once, as the instructor would run it: `python instructor/grade.py DIR`. The rest are fast unit tests.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

from course_utils import UserError, load_script
from gpt2_helpers import CHECKER, MODELING, ROOT

INSTRUCTOR = ROOT / "instructor"
grade = load_script(INSTRUCTOR / "grade.py")
make_handout = load_script(INSTRUCTOR / "make_handout.py")  # the very module grade.py uses

GRADE_TIMEOUT = 20  # seconds per submission in the test run: the hanging one costs exactly this
N_ROWS = 15  # checks per submission
# Hand-written mistakes of tests/test_check.py that the grading run includes (the issue's, and dropout's kin).
# name -> (the first diverging module the report must name, whether the mistake is inside a [MASK])
HAND_WRITTEN = {"GELU constant 0.0447": ("block 0 MLP", False), "MLP without its dropout": ("block 0 MLP", False),
                "attention without resid_dropout": ("block 0 attention", False),
                "attention probabilities not dropped": ("block 0 attention", False),
                "embedding dropout before adding positions": ("embeddings", True),
                "LayerNorm by hand, eps outside the sqrt": ("block 0 ln_2", True)}


@pytest.fixture(scope="module")
def made():
    reference, handout, key = make_handout.make()
    return reference, handout, key


def filled(made, **wrong):
    """The handout filled with the key, except slots whose handout line contains a given text: those get a wrong
    fill."""
    _reference, handout, key = made
    answers = [s["answer"] for s in key["slots"]]
    for where, fill in wrong.values():
        hits = [i for i, s in enumerate(key["slots"]) if where in s["handout_line"]]
        assert len(hits) == 1, f"no single slot on a line with {where!r}"
        answers[hits[0]] = fill
    return make_handout.fill_handout(handout, answers)


# ----------------------------------------------------------------------------------------------------------
# make_handout.py
# ----------------------------------------------------------------------------------------------------------

def test_default_handout_masks_every_part_and_round_trips(made):
    reference, handout, key = made
    slots = key["slots"]
    assert 15 <= len(slots) <= 25 and handout.count("[MASK]") == len(slots)
    assert {"attention", "MLP", "block", "model", "LM head"} <= {s["section"] for s in slots}
    lines = [line.strip() for line in handout.splitlines()]
    for example in ("self.c_fc = [MASK](intermediate_size, config.hidden_size)", "self.act = [MASK]",
                    "self.c_proj = [MASK](config.hidden_size, intermediate_size)", "hidden_states = self.c_fc([MASK])",
                    "hidden_states = self.act([MASK])", "hidden_states = self.c_proj([MASK])"):
        assert example in lines, example  # the handout's own MLP example
    assert reference == MODELING.read_bytes().decode("utf-8")
    assert make_handout.fill_handout(handout, [s["answer"] for s in slots]).encode() == MODELING.read_bytes()
    assert [s["line"] for s in slots] == sorted(s["line"] for s in slots)
    assert handout.startswith(make_handout.HANDOUT_NOTE) and "Dropout is part of the answer" in handout


def test_a_completed_handout_that_keeps_the_note_reads_back_and_loads(made, tmp_path):
    _reference, handout, key = made
    answers = [s["answer"] for s in key["slots"]]
    completed = make_handout.HANDOUT_NOTE + make_handout.fill_handout(handout, answers)  # what a student hands in
    fills = grade.extract_fills(handout, completed)
    assert [grade.canonical(f) for f in fills] == [grade.canonical(a) for a in answers]
    path = tmp_path / "modeling_gpt2.py"
    path.write_text(completed)
    assert hasattr(load_script(CHECKER).load_module(path), "GPT2LMHeadModel")  # no [MASK] left: the note has none


def test_round_trip_is_byte_exact_with_crlf_and_no_final_newline(tmp_path):
    reference = "class A:\r\n    x = f(1, 2)  # one\r\n    y = g(x)\r\n\r\ndef h():\r\n    return g(3)"
    spec = tmp_path / "spec.toml"
    spec.write_text('[[mask]]\nin = "A"\nfind = "x = f(1, 2)"\nmask = "1, 2"\n'
                    '[[mask]]\nfind = "return g(3)"\nmask = "g"\n'
                    '[[mask]]\nin = "A"\nfind = "g(x)"\n')
    handout, slots = make_handout.build_handout(reference, make_handout.load_spec(spec))
    assert handout == "class A:\r\n    x = f([MASK])  # one\r\n    y = [MASK]\r\n\r\ndef h():\r\n    return [MASK](3)"
    assert [s["answer"] for s in slots] == ["1, 2", "g(x)", "g"]
    assert make_handout.fill_handout(handout, [s["answer"] for s in slots]) == reference


@pytest.mark.parametrize("entry,message", [
    ('find = "self.act = gelu_exact"', "not found"),
    ('find = "hidden_states = self.c_fc(hidden_states)"\nin = "NoSuchClass"', "names 0 classes"),
    ('find = "hidden_states = hidden_states"', "found "),  # several lines: it must say which
    ('find = "hidden_states = self.act(hidden_states)"\nmask = "hidden_states"', "exactly once in `find`"),
])
def test_spec_entry_that_does_not_match_exactly_once_is_a_clear_error(tmp_path, entry, message):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[mask]]\nfind = "self.act = gelu_new"\nmask = "gelu_new"\n\n'
                    f'[[mask]]\nsection = "MLP"\n{entry}\n')
    with pytest.raises(UserError, match="entry #2") as error:
        make_handout.make(MODELING, spec)
    assert message in str(error.value)


def make_handout_cli(*args):
    return subprocess.run([sys.executable, str(INSTRUCTOR / "make_handout.py"), *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_writes_handout_and_key_and_fails_cleanly(tmp_path):
    out = tmp_path / "handout"
    result = make_handout_cli("--out", str(out), "-f", "kernel.json")
    assert result.returncode == 0, result.stderr
    key = json.loads((out / "answer_key.json").read_text())
    handout = (out / "modeling_gpt2.py").read_bytes().decode()
    assert make_handout.fill_handout(handout, [s["answer"] for s in key["slots"]]).encode() == MODELING.read_bytes()
    assert "| 10 |" in (out / "answer_key.md").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[mask]]\nfind = "no such code"\n')
    result = make_handout_cli("--spec", str(bad), "--out", str(out))
    assert result.returncode == 2 and "mask entry #1" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: ")


def test_cli_old_option_name_still_works_but_is_not_listed(tmp_path):
    result = make_handout_cli("--out-dir", str(tmp_path / "old"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "old" / "answer_key.json").is_file()
    usage = make_handout_cli("--help").stdout
    assert "--out OUT" in usage and "--out-dir" not in usage
    typo = make_handout_cli("--outdir", str(tmp_path / "typo"))
    assert typo.returncode == 2 and typo.stderr.startswith("Error: unrecognized arguments")


# ----------------------------------------------------------------------------------------------------------
# Reading fills back, voting, the static scan
# ----------------------------------------------------------------------------------------------------------

def test_fills_are_read_back_despite_comments_blank_lines_and_spacing(made):
    _reference, handout, key = made
    answers = [s["answer"] for s in key["slots"]]
    text = filled(made, a=("self.c_attn = Conv1D([MASK]", "3*config.hidden_size"))
    text = text.replace("class GPT2MLP(nn.Module):", "# my notes\n\n\nclass GPT2MLP(nn.Module):  # the MLP")
    text = text.replace("self.act = gelu_new", "self.act  =  gelu_new   # tanh GELU, as in the paper")
    fills = grade.extract_fills(handout, text)
    assert len(fills) == len(answers)
    assert [grade.canonical(f) for f in fills] == [grade.canonical(a) for a in answers]
    assert fills[[i for i, s in enumerate(key["slots"]) if "self.act = [MASK]" in s["handout_line"]][0]] == "gelu_new"
    # a line the student deleted gives "?" for its slot, and the others still line up
    text = "\n".join(line for line in text.splitlines() if "self.layer_idx)" not in line or "cache.update" not in line)
    fills = grade.extract_fills(handout, text)
    assert fills.count("?") == 1 and fills[3] == "?" and grade.canonical(fills[4]) == grade.canonical(answers[4])


def test_majority_vote_counts_and_compares_with_the_key():
    slots = grade.vote([["a+b", "x"], ["a + b", "y"], ["c", "y"], ["?", "x"]], ["a+b", "x"])
    assert slots[0] == {"slot": 1, "majority": "a+b", "votes": 2, "answered": 3, "unknown": 1, "key": "a+b",
                        "majority_is_key": True, "tie": False}
    assert slots[1]["votes"] == 2 and slots[1]["tie"] and slots[1]["majority"] == "x"
    slots = grade.vote([["F.relu"], ["F.relu"], ["gelu_new"]], ["gelu_new"])
    assert slots[0]["majority"] == "F.relu" and slots[0]["majority_is_key"] is False


def test_static_scan_passes_the_reference_and_flags_cheats():
    assert grade.static_scan(MODELING.read_text()) == []
    cases = {
        "import os\nos._exit(0)": "forbidden",
        "import torch\ntorch.allclose = lambda *a, **k: True": "forbidden",
        "import torch\nsetattr(torch.testing, 'assert_close', print)": "forbidden",
        "from transformers.models.gpt2.modeling_gpt2 import *": "not an implementation",
        "from transformers import GPT2LMHeadModel": "not an implementation",
        "import transformers\nGPT2LMHeadModel = getattr(transformers, 'GPT2' + 'LMHeadModel')": "not an implementation",
        "import transformers as t\nM = t.models.gpt2.modeling_gpt2.GPT2Model": "not an implementation",
        "from gpt2.modeling_gpt2 import GPT2LMHeadModel": "not an implementation",
        "x = eval('1')": "forbidden",
        "def f():\n    return open('/etc/passwd').read()": "forbidden",
    }
    for source, kind in cases.items():
        assert any(k == kind for k, _ in grade.static_scan(source)), source
    assert grade.static_scan('if __name__ == "__main__":\n    import sys\n    sys.exit(0)\n') == []
    assert grade.static_scan("from transformers.models.gpt2.modeling_gpt2 import Conv1D\n") == []


def test_grade_cli_clear_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(INSTRUCTOR / "grade.py"), *args], capture_output=True, text=True,
                              timeout=60)

    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such submissions directory" in missing.stderr
    assert missing.stderr.startswith("Error: ") and "Traceback" not in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run(str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no submissions in" in empty.stderr
    half = run(str(tmp_path / "empty"), "--key", "k.json")
    assert half.returncode == 2 and "Traceback" not in half.stderr


# ----------------------------------------------------------------------------------------------------------
# One grading run over correct, buggy and cheating submissions
# ----------------------------------------------------------------------------------------------------------

# (name, handout line text, wrong fill): each kind of mistake a student can make in a [MASK]
WRONG_FILLS = [
    ("exact GELU", "self.act = [MASK]", "F.gelu"),
    ("softmax over queries", "F.softmax(scores, [MASK])", "dim=-2"),
    ("no attention scale", "self.scale = [MASK] if", "1.0"),
    ("inverted attention mask", "masked_fill([MASK],", "allowed"),
    ("causal mask off by one", "mask = ([MASK])", "key_pos < query_pos"),
    ("LayerNorm eps 1e-6", "eps=[MASK]", "1e-6"),
    ("no attention residual", "hidden_states = [MASK]  # residual", "attn_output"),
    ("ln_1 before the MLP", "hidden_states + [MASK]  # residual", "self.mlp(self.ln_1(hidden_states))"),
    ("positions ignore the cache", "torch.arange([MASK], device", "0, length"),
    ("loss without the shift", "value=-100)[MASK]", "[..., :]"),
    ("heads merged without transpose", "output.[MASK].reshape", "contiguous()"),
    ("head tied to the wrong matrix", '{"lm_head.weight": [MASK]}', '"transformer.wpe.weight"'),
    ("wrong cache slot", "cache.update(key, value, [MASK])", "0"),
    ("gradient cut before the MLP", "hidden_states = self.c_fc([MASK])", "hidden_states.detach()"),
]


def cheats(subs, outside):
    """Adversarial submissions; `outside` is a directory next to the submissions that must stay untouched."""
    other = subs / "alice.py"
    return {
        "prints_pass": 'import sys\nprint("PASS")\nprint("ALL CHECKS PASSED (10/10)")\nsys.exit(0)\n',
        "exits_early": "import os\nos._exit(0)\n",
        "hangs": "while True:\n    pass\n",
        "patches_torch": "import torch\nimport torch.testing\ntorch.allclose = lambda *a, **k: True\n"
                         "torch.testing.assert_close = lambda *a, **k: None\n",
        "patches_torch_sneakily": "import torch\ntorch.__dict__['equal'] = lambda *a: True\n",
        "patches_checker": "import sys\nfor m in list(sys.modules.values()):\n"
                           "    if hasattr(m, 'compare') and hasattr(m, 'run_checks_on'):\n"
                           "        m.compare = lambda *a, **k: []\n",
        "writes_outside": f"f = open({str(outside / 'pwned.txt')!r}, 'w')\nf.write('x')\nf.close()\n",
        "writes_with_torch": f"import torch\ntorch.save({{}}, {str(subs / 'zz_planted.py')!r})\n",
        "reexports": "from transformers.models.gpt2.modeling_gpt2 import *\n",
        "reexports_sneakily": "from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, GPT2Config\n"
                              "GPT2LMHeadModel = MODEL_FOR_CAUSAL_LM_MAPPING[GPT2Config]\n",
        "wraps_transformers": "import torch\n"
                              "from transformers import GenerationMixin, GPT2Config, PreTrainedModel, "
                              "MODEL_FOR_CAUSAL_LM_MAPPING\n"
                              "class GPT2LMHeadModel(PreTrainedModel, GenerationMixin):\n"
                              "    config_class = GPT2Config\n"
                              "    def __init__(self, config):\n        super().__init__(config)\n"
                              "        self.inner = [MODEL_FOR_CAUSAL_LM_MAPPING[GPT2Config](config)]\n"
                              "    def forward(self, *a, **k):\n        return self.inner[0](*a, **k)\n",
        "kills_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
        "kills_group": "import torch\nimport os as o\no.killpg(o.getpgid(o.getppid()), 9)\n",
        "reads_others": f"SOURCE = open({str(other)!r}).read()\n",
        "reads_others_with_torch": f"import torch\ntry:\n    torch.load({str(other)!r})\nexcept Exception:\n    pass\n",
        "fakes_outputs": "import os, torch\n"
                         "torch.save({'outputs': {'errors': {}}, 'harness': {'violations': []}}, 'outputs.pt')\n"
                         "os._exit(0)\n",
        "syntax_error": "class GPT2LMHeadModel(:\n",
    }


@pytest.fixture(scope="module")
def graded(made, tmp_path_factory):
    """Grade one class of submissions with the real command line; return (rows by student, report.md, stdout, paths)."""
    from test_check import CORRECT_REWRITES, MUTANTS, WRONG_VARIANTS, apply  # the checker's own variants

    _reference, handout, key = made
    base = tmp_path_factory.mktemp("grading")
    subs, outside = base / "submissions", base / "outside"
    subs.mkdir()
    outside.mkdir()
    correct = filled(made)
    (subs / "alice.py").write_text(correct)
    (subs / "bob").mkdir()  # a folder per student works too, with comments and spacing of the student's own
    bob = filled(made, a=("self.c_attn = Conv1D([MASK]", "3*config.hidden_size"))
    (subs / "bob" / "modeling_gpt2.py").write_text("# Bob's GPT-2\n" + bob)
    (subs / "carol.py").write_text(correct.replace("self.act = gelu_new", "self.act = gelu_new  # the tanh one"))
    expected_pass = {"alice", "bob", "carol"}
    assert correct == MODELING.read_text()  # the key filled in is the reference, so the checker's variants apply
    for i, (name, edits) in enumerate(CORRECT_REWRITES[:5]):  # correct rewrites: no false fail
        (subs / f"rewrite_{i:02d}.py").write_text(apply(edits))
        expected_pass.add(f"rewrite_{i:02d}")
    for name, edits in WRONG_VARIANTS:
        if name in HAND_WRITTEN:
            (subs / f"bug_hand_{list(HAND_WRITTEN).index(name):02d}.py").write_text(apply(edits))
    for i, (name, where, fill) in enumerate(WRONG_FILLS):
        (subs / f"bug_fill_{i:02d}.py").write_text(filled(made, a=(where, fill)))
    mutants = [(name, old, new) for name, old, new, _ in MUTANTS if correct.count(old) == 1]
    assert len(mutants) >= 10, "most of the checker's mutants should still apply to the reference"
    for i, (name, old, new) in enumerate(mutants):
        (subs / f"bug_mutant_{i:02d}.py").write_text(correct.replace(old, new))
    (subs / "unfilled.py").write_text(handout)
    for name, source in cheats(subs, outside).items():
        (subs / f"cheat_{name}.py").write_text(source)
    (subs / "two_files").mkdir()
    (subs / "two_files" / "a.py").write_text(correct)
    (subs / "two_files" / "b.py").write_text(correct)
    out = base / "report"
    result = subprocess.run([sys.executable, str(INSTRUCTOR / "grade.py"), str(subs), "--out", str(out),
                             "--timeout", str(GRADE_TIMEOUT), "--jobs", "2", "-f", "kernel.json"],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "report.csv", newline="", encoding="utf-8") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    return rows, (out / "report.md").read_text(), result.stdout, subs, outside, expected_pass


def test_only_correct_submissions_pass(graded):
    rows, _md, stdout, _subs, _outside, expected_pass = graded
    assert {name for name, row in rows.items() if row["result"] == "PASS"} == expected_pass, stdout[-3000:]
    for name in expected_pass:
        assert rows[name]["score"] == "1.00" and rows[name]["checks passed"] == f"{N_ROWS}/{N_ROWS}"
        assert rows[name]["notes"] == ""
        if not name.startswith("rewrite_"):  # a rewrite may fill a [MASK] its own way and still be right
            assert rows[name]["fills = key"] == "23/23", rows[name]  # spacing and comments do not change a fill


def test_every_bug_fails_with_a_reason(graded):
    rows = graded[0]
    bugs = [name for name in rows if name.startswith("bug_")]
    assert len(bugs) >= len(WRONG_FILLS) + 10
    for name in bugs:
        row = rows[name]
        assert row["result"] == "FAIL" and row["notes"], (name, row)
        assert float(row["score"]) < 1.0
    assert rows["bug_fill_00"]["fills = key"] == "22/23"  # the exact-GELU student got one [MASK] wrong
    assert "first divergence: block 0 MLP" in rows["bug_fill_00"]["notes"]
    assert "first diverging module: block 0 MLP" in rows["bug_fill_00"]["notes"]
    assert "[MASK] fills that differ from the key: #10 `F.gelu` (key `gelu_new`)" in rows["bug_fill_00"]["notes"]
    for i, (module, inside) in enumerate(HAND_WRITTEN.values()):  # the module, and the [MASK]s (if any) to blame
        notes = rows[f"bug_hand_{i:02d}"]["notes"]
        assert f"first diverging module: {module}" in notes, notes
        assert ("[MASK] fills that differ from the key: #" in notes) == inside, notes
        assert ("every [MASK] fill equals the key" in notes) == (not inside), notes
    assert "still has a [MASK]" in rows["unfilled"]["notes"]


@pytest.mark.parametrize("name,reason", [
    ("prints_pass", "stops the process while importing"),
    ("exits_early", "without writing its outputs"),
    ("hangs", "timed out"),
    ("patches_torch", "cheat: monkeypatches torch.allclose"),
    ("patches_torch_sneakily", "cheat: monkeypatches torch.equal"),
    ("patches_checker", "cheat: monkeypatches checker.compare"),
    ("writes_outside", "writes outside its scratch directory"),
    ("writes_with_torch", "outside its sandbox (refused)"),  # C++ writer: Landlock refuses it
    ("reexports", "not an implementation"),
    ("reexports_sneakily", "not an implementation: uses transformers' own GPT2LMHeadModel"),
    ("wraps_transformers", "not an implementation: uses transformers' own GPT2LMHeadModel"),
    ("kills_parent", "cheat: sends a signal"),
    ("kills_group", "cheat: sends a signal"),
    ("reads_others", "reads a grader-only path"),
    ("reads_others_with_torch", "reads a grader-only path"),
    ("fakes_outputs", "imports os"),
    ("syntax_error", "syntax error on line 1"),
])
def test_every_cheat_fails_and_says_why(graded, name, reason):
    row = graded[0][f"cheat_{name}"]
    assert row["result"] == "FAIL" and row["score"] == "0.00", row
    assert reason in row["notes"], row["notes"]


def test_cheats_changed_nothing_outside_and_grading_went_on(graded):
    rows, md, stdout, subs, outside, _expected = graded
    assert list(outside.iterdir()) == []
    assert not (subs / "zz_planted.py").exists()
    assert "changed while grading" not in md
    assert "2 candidate .py files" in rows["two_files"]["notes"]
    assert len(rows) == len(list(p for p in subs.iterdir()))  # every submission has its row: nobody stopped the grading


def test_report_has_the_majority_answer_of_every_mask(graded, made):
    _rows, md, stdout, *_ = graded
    key = made[2]
    table = md.split("## Every [MASK]")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(key["slots"])
    assert all(row.rstrip().endswith("| yes |") for row in rows), table
    gelu = next(row for row in rows if "self.act = [MASK]" in row)
    assert "`gelu_new`" in gelu
    assert "Majority vote: the class's answer equals the key on 23/23" in stdout
