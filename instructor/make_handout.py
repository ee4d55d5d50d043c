"""Make the student handout of Task 4: the reference GPT-2 with some fragments replaced by [MASK], and its answer key.

    python instructor/make_handout.py                      # gpt2/modeling_gpt2.py + instructor/mask_spec.toml
    python instructor/make_handout.py --out out/handout --spec my_spec.toml

Writes, in --out (default `out/handout/`, which git ignores; the old name --out-dir still works):
    modeling_gpt2.py     the handout: give this file to the students
    answer_key.json      the answer of every [MASK], in order (keep it to yourself; grade.py reads it)
    answer_key.md        the same, as a table to read

The mask specification (`instructor/mask_spec.toml`) lists, for each blank, a piece of one line of the reference
(`find`) and the part of it that becomes [MASK] (`mask`). Each `find` must occur exactly once (inside the class or
function named by `in`), else the script stops and names the entry: when the reference changes, the spec must be
fixed by hand instead of masking the wrong thing. Filling the answers back into the handout gives the reference
byte for byte; the script checks that before it writes anything.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, parse_args, run_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = ROOT / "gpt2" / "modeling_gpt2.py"
DEFAULT_SPEC = Path(__file__).resolve().parent / "mask_spec.toml"
DEFAULT_OUT = ROOT / "out" / "handout"
MASK = "[MASK]"
# Put on top of the handout (comments only); fill_handout() takes it off again, so the key still gives the reference.
HANDOUT_NOTE = """\
# Task 4 handout: fill in every blank, then check your file:  python Check_gpt2-base.py --file THIS_FILE
# Dropout is part of the answer. The checker also runs a train-mode forward and backward with a fixed seed and
# expects each dropout exactly where transformers' GPT-2 has it: after the embeddings (wte + wpe), on the attention
# probabilities (after the softmax, before multiplying by V), after the attention's c_proj, after the MLP's c_proj.
# A missing, extra or moved dropout fails, and so does a dropout that is active in eval mode.

"""


# ----------------------------------------------------------------------------------------------------------
# Reading the specification
# ----------------------------------------------------------------------------------------------------------

def load_spec(path):
    """The list of mask entries from a TOML file, each checked for the keys it needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such mask specification: {path}; give an existing TOML file with --spec.")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path} is not valid TOML ({error}): fix it.") from None
    entries = data.get("mask")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} has no [[mask]] entries: add one [[mask]] table per blank.")
    for number, entry in enumerate(entries, 1):
        find = entry.get("find")
        if not isinstance(find, str) or not find.strip() or "\n" in find:
            raise UserError(f"mask entry #{number} of {path} needs `find`: a non-empty piece of one line.")
        mask = entry.setdefault("mask", find)
        if not isinstance(mask, str) or not mask.strip():
            raise UserError(f"mask entry #{number} of {path} has an empty `mask`: give the part of `find` to mask.")
        if find.count(mask) != 1:
            raise UserError(f"mask entry #{number} of {path}: `mask` {mask!r} must occur exactly once in `find` "
                            f"{find!r}.")
        entry.setdefault("section", "")
        entry["number"] = number
    return entries


# ----------------------------------------------------------------------------------------------------------
# Finding each fragment: exactly once, or a clear error
# ----------------------------------------------------------------------------------------------------------

def indent_of(line):
    return len(line) - len(line.lstrip())


def scope_lines(lines, name, entry):
    """(first, last) line indices of the class or function `name`: its header and its indented body."""
    pattern = re.compile(rf"^\s*(?:async\s+)?(?:class|def)\s+{re.escape(name)}\b")
    headers = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(headers) != 1:
        raise UserError(f"mask entry #{entry['number']} ({entry['find']!r}): `in = {name!r}` names "
                        f"{len(headers)} classes/functions in the reference, not exactly one: fix `in`.")
    start = headers[0]
    end = start
    for i in range(start + 1, len(lines)):
        if lines[i].strip() and indent_of(lines[i]) <= indent_of(lines[start]):
            break
        end = i
    return start, end


def locate(lines, entry):
    """(line index, start column, end column) of the entry's masked part; `find` must occur exactly once."""
    first, last = scope_lines(lines, entry["in"], entry) if entry.get("in") else (0, len(lines) - 1)
    hits = []
    for i in range(first, last + 1):
        start = lines[i].find(entry["find"])
        while start != -1:
            hits.append((i, start))
            start = lines[i].find(entry["find"], start + 1)
    where = f" inside {entry['in']}" if entry.get("in") else ""
    if len(hits) != 1:
        found = "not found" if not hits else f"found {len(hits)} times (lines {', '.join(str(i + 1) for i, _ in hits)})"
        raise UserError(f"mask entry #{entry['number']} ({entry['section']}): {entry['find']!r} {found}{where} in "
                        "the reference; it must occur exactly once: update instructor/mask_spec.toml.")
    i, start = hits[0]
    offset = start + entry["find"].index(entry["mask"])
    return i, offset, offset + len(entry["mask"])


# ----------------------------------------------------------------------------------------------------------
# Making the handout, and filling it back
# ----------------------------------------------------------------------------------------------------------

def build_handout(reference_text, spec):
    """(handout text, slots): slots in the order their [MASK] appears, each with its answer and handout line."""
    if MASK in reference_text:
        raise UserError(f"the reference itself contains the text {MASK}: it cannot be masked unambiguously, so "
                        f"rename it there.")
    lines_with_ends = reference_text.splitlines(keepends=True)
    lines = [line.rstrip("\r\n") for line in lines_with_ends]
    spans = {}  # line index -> [(start, end, entry)]
    for entry in spec:
        i, start, end = locate(lines, entry)
        spans.setdefault(i, []).append((start, end, entry))
    for i, line_spans in spans.items():
        line_spans.sort(key=lambda s: s[0])
        for (s1, e1, a), (s2, e2, b) in zip(line_spans, line_spans[1:]):
            if s2 <= e1:  # touching masks could not be told apart when reading a student's fill back
                raise UserError(f"mask entries #{a['number']} and #{b['number']} overlap or touch on line {i + 1}: "
                                f"merge them or leave a character between them.")

    out, slots = [], []
    for i, line in enumerate(lines_with_ends):
        content, ending = line[: len(lines[i])], line[len(lines[i]):]
        for start, end, entry in sorted(spans.get(i, []), key=lambda s: s[0], reverse=True):
            content = content[:start] + MASK + content[end:]
        for start, end, entry in sorted(spans.get(i, []), key=lambda s: s[0]):
            slots.append({"slot": len(slots) + 1, "section": entry["section"], "line": i + 1,
                          "answer": lines[i][start:end], "spec_entry": entry["number"]})
        out.append(content + ending)
    handout = "".join(out)
    for slot in slots:
        slot["handout_line"] = handout.splitlines()[slot["line"] - 1]
    return handout, slots


def fill_handout(handout_text, answers):
    """Put the answers into the [MASK]s, in order. fill_handout(*build_handout(ref)) == ref, byte for byte."""
    for note in (HANDOUT_NOTE, HANDOUT_NOTE.replace("\n", "\r\n")):
        if handout_text.startswith(note):
            handout_text = handout_text[len(note):]
    pieces = handout_text.split(MASK)
    if len(pieces) - 1 != len(answers):
        raise UserError(f"the handout has {len(pieces) - 1} [MASK]s but {len(answers)} answers were given: use "
                        f"the answer key made with this handout.")
    return pieces[0] + "".join(answer + piece for answer, piece in zip(answers, pieces[1:]))


def make(reference_path=DEFAULT_REFERENCE, spec_path=DEFAULT_SPEC):
    """Read the reference and the spec; return (reference text, handout text, answer key dict), round trip checked."""
    reference_path = Path(reference_path)
    if not reference_path.is_file():
        raise UserError(f"no such reference file: {reference_path}; give the complete modeling file with "
                        "--file.")
    reference = reference_path.read_bytes().decode("utf-8")
    handout, slots = build_handout(reference, load_spec(spec_path))  # slots' "line": the reference's line number
    handout = (HANDOUT_NOTE.replace("\n", "\r\n") if "\r\n" in reference else HANDOUT_NOTE) + handout
    if fill_handout(handout, [s["answer"] for s in slots]) != reference:  # cannot happen; never hand out a bad key
        raise RuntimeError("internal error: the answer key does not reproduce the reference; please report it.")
    key = {
        "reference": str(reference_path),
        "reference_sha256": hashlib.sha256(reference.encode()).hexdigest(),
        "handout_sha256": hashlib.sha256(handout.encode()).hexdigest(),
        "spec": str(spec_path),
        "slots": slots,
    }
    return reference, handout, key


def key_markdown(key):
    rows = ["| # | section | line | handout line | answer |", "|---|---|---|---|---|"]
    for s in key["slots"]:
        code = s["handout_line"].strip().replace("|", "\\|")
        answer = s["answer"].replace("|", "\\|")
        rows.append(f"| {s['slot']} | {s['section']} | {s['line']} | `{code}` | `{answer}` |")
    return "# Answer key of the Task 4 handout\n\n" + "\n".join(rows) + "\n"


def write_outputs(out_dir, handout, key):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "modeling_gpt2.py").write_bytes(handout.encode("utf-8"))
    (out_dir / "answer_key.json").write_text(json.dumps(key, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "answer_key.md").write_text(key_markdown(key), encoding="utf-8")


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # --file: the modeling file, as in Check_gpt2-base.py (--reference means "transformers' GPT-2" elsewhere)
    parser.add_argument("--file", default=str(DEFAULT_REFERENCE),
                        help="the complete modeling file (default: %(default)s)")
    parser.add_alias("--reference", dest="file")
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="the mask specification (default: %(default)s)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="where to write the handout and the key (default: %(default)s)")
    parser.add_alias("--out-dir", dest="out")
    return parser


def main(argv=None):
    args = parse_args(build_parser(), argv)
    _reference, handout, key = make(args.file, args.spec)
    write_outputs(args.out, handout, key)
    sections = {}
    for s in key["slots"]:
        sections[s["section"]] = sections.get(s["section"], 0) + 1
    print(f"{len(key['slots'])} [MASK]s (" + ", ".join(f"{n} {name}" for name, n in sections.items()) + ")")
    for s in key["slots"]:
        print(f"  #{s['slot']:<3} line {s['line']:<4} {s['handout_line'].strip()}")
    out = Path(args.out)
    print(f"\nHandout: {out / 'modeling_gpt2.py'}   (give it to the students)")
    print(f"Key:     {out / 'answer_key.json'}, {out / 'answer_key.md'}   (keep them; grade.py --key reads the JSON)")
    return 0


if __name__ == "__main__":
    run_main(main)
