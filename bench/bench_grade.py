"""Benchmark for instructor/grade.py: grading a class of 30 submissions at the grader's tiny shape on 2 cores.

The class (generated from the handout, so the numbers mean the real thing): 20 correct files (some with the
student's own comments and spacing), 7 with one wrong [MASK] fill, and 3 cheats (prints PASS and exits, re-exports
transformers' GPT-2, writes outside its directory). Target: under 3 minutes for the whole run, wall clock.

Baseline, measured in the same run: the obvious way, one fresh `python Check_gpt2-base.py --file F --model W`
process per submission, 2 at a time (each pays the torch + transformers import and recomputes the reference).
It runs on a sample of --baseline-sample files (default 4) and is scaled to 30 (it grows linearly; it is no sandbox).

Run:  python bench/bench_grade.py [--jobs 2] [--baseline-sample 4]
"""
import csv
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, load_script, parse_args, run_main

ROOT = Path(__file__).resolve().parents[1]
make_handout = load_script(ROOT / "instructor" / "make_handout.py")

WRONG = [("self.act = [MASK]", "F.gelu"), ("F.softmax(scores, [MASK])", "dim=-2"), ("self.scale = [MASK] if", "1.0"),
         ("eps=[MASK]", "1e-6"), ("hidden_states = [MASK]  # residual", "attn_output"),
         ("torch.arange([MASK], device", "0, length"), ("value=-100)[MASK]", "[..., :]")]
CHEATS = {"cheat_prints_pass": 'import sys\nprint("PASS")\nsys.exit(0)\n',
          "cheat_reexport": "from transformers.models.gpt2.modeling_gpt2 import *\n",
          "cheat_writes": "import torch\ntorch.save({}, '../../planted.pt')\n"}


def make_class(directory):
    """30 submissions: 20 correct, 7 buggy, 3 cheats. Returns the number expected to pass."""
    _reference, handout, key = make_handout.make()
    answers = [s["answer"] for s in key["slots"]]
    correct = make_handout.fill_handout(handout, answers)
    for i in range(20):
        own_style = "# my GPT-2\n" + correct.replace("self.act = gelu_new", "self.act  =  gelu_new  # tanh GELU")
        text = correct if i % 2 else own_style
        (directory / f"student_{i:02d}.py").write_text(text)
    for i, (where, fill) in enumerate(WRONG):
        wrong = list(answers)
        wrong[next(j for j, s in enumerate(key["slots"]) if where in s["handout_line"])] = fill
        (directory / f"buggy_{i:02d}.py").write_text(make_handout.fill_handout(handout, wrong))
    for name, source in CHEATS.items():
        (directory / f"{name}.py").write_text(source)
    return 20


def baseline(files, weights, jobs):
    """Seconds for the naive way: one Check_gpt2-base.py process per file, `jobs` at a time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def one(path):
        subprocess.run([sys.executable, str(ROOT / "Check_gpt2-base.py"), "--file", str(path), "--model", str(weights),
                        "--device", "cpu"], capture_output=True, env=env, timeout=600)

    start = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, files))
    return time.time() - start


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2,
                        help="submissions graded at the same time (default: %(default)s)")
    parser.add_argument("--baseline-sample", type=int, default=4, help="files the baseline runs on (0: skip it)")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    with tempfile.TemporaryDirectory() as tmp:
        subs = Path(tmp) / "class" / "submissions"
        subs.mkdir(parents=True)
        expected = make_class(subs)
        seconds = time_grading(subs, Path(tmp) / "report", expected, args.jobs)
        if args.baseline_sample > 0:
            weights = Path(tmp) / "weights"
            grade = load_script(ROOT / "instructor" / "grade.py")
            checker = load_script(ROOT / "Check_gpt2-base.py")
            checker.sensitive_random_gpt2(1, **grade.GRADE_CONFIG).save_pretrained(weights)
            sample = sorted(subs.glob("student_*.py"))[: args.baseline_sample]
            naive = baseline(sample, weights, args.jobs)
            scaled = naive * 30 / len(sample)
            print(f"baseline (one Check_gpt2-base.py process per file, {args.jobs} at a time): {naive:.1f} s for "
                  f"{len(sample)} files -> {scaled:.0f} s for 30")
            print(f"ratio baseline / grade.py: {scaled / seconds:.1f}x")


def time_grading(subs, out, expected, jobs):
    """Seconds for `grade.py` on the class; prints them, and whether exactly the correct files passed."""
    print(f"Grading 30 submissions with instructor/grade.py --jobs {jobs} on {os.cpu_count()} CPU cores ...",
          flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "instructor" / "grade.py"), str(subs), "--out", str(out),
                             "--jobs", str(jobs)], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.time() - start
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:])
        raise UserError("grade.py failed on the generated class (its output is above): fix it, then bench again.")
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    passed = sum(r["result"] == "PASS" for r in rows)
    ok = passed == expected and all(r["result"] == "FAIL" for r in rows if not r["student"].startswith("student_"))
    print(f"grade.py: {seconds:.1f} s wall for 30 submissions ({seconds / 30:.2f} s each); {passed} PASS "
          f"(expected {expected}: {'right' if ok else 'WRONG'}); "
          f"target < 180 s: {'met' if seconds < 180 else 'MISSED'}")
    return seconds


if __name__ == "__main__":
    run_main(main)
