"""Benchmark for Task 1: A+B_Problem.py against the handout's original approach, at bert-base-chinese's shape.

Both sides answer the handout's example and six questions in a fresh process; the clock runs from process start
to the last answer:
  (a) baseline: what the handout's script did, `BertForMaskedLM.from_pretrained` + tokenizer, then
      `model.bert.embeddings.word_embeddings(tokenizer(word, return_tensors='pt').input_ids).mean(1)` per word;
  (b) `A+B_Problem.py --model DIR --keep-cls-sep`: the same word vectors (with [CLS]/[SEP], as the handout), but
      reading only the embedding tensor from model.safetensors.
The real weights cannot be downloaded here, so the model is bert-base-chinese's real shape (vocab 21128, hidden
768, 12 layers, 12 heads, intermediate 3072) with random weights, saved once with save_pretrained (safetensors)
in a cache directory, with a vocab.txt laid out like the real one ([PAD], [unused1..99], [UNK], [CLS], [SEP],
[MASK], then characters). The answers of both sides are printed and must agree.

Run:  python bench/bench_ab.py [--repeats 3] [--dir /tmp/ab_bench_bert-base-chinese-random]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from course_utils import ArgumentParser, UserError, parse_args, run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "A+B_Problem.py"
QUESTIONS = [("皇后-女人+男人", ["学生", "骑士", "国王"]), ("僵尸+复活", ["鬼魂", "人类", "抱抱脸"]),
             ("秀发-头发", ["闪亮", "昏暗", "电灯"]), ("闪电-电流", ["快", "黄色", "下雨"]),
             ("清华-北大", ["一流", "二流", "负一流"]), ("大学+一流+海淀", ["清华", "北大", "斯坦福", "MIT"]),
             ("欧盟-英国-法国-德国", ["俄罗斯", "欧盟", "波兰", "美国"])]

# The handout's way, kept as close to the original as possible. The one addition is unit-normalising each word
# vector before the sum (gensim's rule, which A+B_Problem.py follows), so that both sides must give the same answers.
BASELINE = r'''
import json, re, sys
import torch
from transformers import BertForMaskedLM, BertTokenizer

model_dir, questions = sys.argv[1], json.loads(sys.argv[2])
tokenizer = BertTokenizer.from_pretrained(model_dir)
model = BertForMaskedLM.from_pretrained(model_dir)

def embed(word):
    with torch.no_grad():
        v = model.bert.embeddings.word_embeddings(tokenizer(word, return_tensors="pt").input_ids).mean(1)
    return torch.nn.functional.normalize(v, dim=-1)

answers = []
for expr, choices in questions:
    query = sum((-1 if s == "-" else 1) * embed(w) for s, w in re.findall(r"([+-]?)([^+-]+)", expr))
    sims = [torch.cosine_similarity(query, embed(c)).item() for c in choices]
    answers.append(choices[sims.index(max(sims))])
print("ANSWERS", json.dumps(answers, ensure_ascii=False))
'''


def build_model(directory):
    """Random BertForMaskedLM at bert-base-chinese's shape, saved once (about 400 MB)."""
    done = directory / "DONE"
    if done.exists():
        return
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    print(f"building a random bert-base-chinese-shaped model in {directory} (once) ...", flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    chars = sorted({ch for expr, choices in QUESTIONS for ch in expr + "".join(choices) if "\u4e00" <= ch <= "\u9fff"})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + ["m", "##it", "mit"]
    taken = set(vocab)
    extra = (chr(c) for c in [*range(0x4E00, 0xA000), *range(0x3400, 0x4DC0)] if chr(c) not in taken)
    vocab += [next(extra) for _ in range(21128 - len(vocab))]   # fill to the real vocabulary size with characters
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(directory / "vocab.txt")).save_pretrained(directory)
    config = BertConfig(vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072)
    BertForMaskedLM(config).save_pretrained(directory)
    done.write_text("ok")


def timed(cmd):
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if p.returncode:
        print(p.stderr[-2000:], file=sys.stderr)  # what went wrong, above the one-line error
        raise UserError(f"{' '.join(map(str, cmd[:2]))} ... failed with exit status {p.returncode} "
                        f"(its output is above).")
    return seconds, p.stdout


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ab_bench_bert-base-chinese-random")
    args = parse_args(parser, argv)
    build_model(args.dir)
    baseline = [sys.executable, "-c", BASELINE, str(args.dir), json.dumps(QUESTIONS, ensure_ascii=False)]
    ours_json = args.dir / "ours.json"
    ours = [sys.executable, str(SCRIPT), "--model", str(args.dir), "--keep-cls-sep", "--json", str(ours_json)]
    timed(baseline), timed(ours)   # warm the page cache for both, untimed
    times = {"baseline": [], "ours": []}
    for _ in range(args.repeats):   # interleaved, so that a busy moment of the machine hits both sides
        t, out = timed(baseline)
        times["baseline"].append(t)
        t, _ = timed(ours)
        times["ours"].append(t)
    base_answers = json.loads(out.split("ANSWERS", 1)[1])
    our_answers = [q["answer"] for q in json.loads(ours_json.read_text(encoding="utf-8"))["questions"]]
    print(f"baseline answers: {base_answers}\nours answers:     {our_answers}")
    if base_answers != our_answers:
        raise UserError("the two sides disagree: the benchmark is not comparing the same computation.")
    base, mine = statistics.median(times["baseline"]), statistics.median(times["ours"])
    print(f"(a) BertForMaskedLM.from_pretrained + word_embeddings: median {base:.2f} s  "
          f"{[round(t, 2) for t in times['baseline']]}")
    print(f"(b) A+B_Problem.py (one safetensors tensor):           median {mine:.2f} s  "
          f"{[round(t, 2) for t in times['ours']]}")
    print(f"speed-up: {base / mine:.1f}x  (process start to all seven answers, {args.repeats} runs each)")


if __name__ == "__main__":
    run_main(main)
