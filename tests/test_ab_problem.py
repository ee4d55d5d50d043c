"""Tests for A+B_Problem.py (Task 1): a tiny BERT with a small Chinese vocabulary and hand-made embeddings,
word2vec files, and analogy benchmarks; numbers are checked against gensim and against hand computation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from course_utils import UserError, load_script, run_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "A+B_Problem.py"

# Every character of the handout's questions, plus word pieces for "MIT" and a "##" piece that must never be an answer.
CHARS = sorted(set("皇后女人男学生骑士国王僵尸复活鬼魂类抱脸秀发头闪亮昏暗电灯"
                   "流快黄色下雨清华北大一二负海淀斯坦福欧盟英法德俄罗波兰美"))
VOCAB = ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CHARS + ["m", "##it", "##s"]
HIDDEN = 8
R, F, M, P, E = np.eye(HIDDEN)[:5]   # royal, female, male, person, and a spare direction


def handmade_embeddings():
    """皇后 = r+f, 女人 = f+p, 男人 = m+p, 国王 = r+m, so 皇后-女人+男人 is exactly 国王 (all norms √2).

    国 and 王 differ by ±e, so neither single character ties with 国王; every other row lives in the last three
    dimensions, nearly orthogonal to the four concepts."""
    rng = np.random.default_rng(0)
    emb = np.zeros((len(VOCAB), HIDDEN), dtype=np.float32)
    emb[:, 5:] = rng.normal(size=(len(VOCAB), 3))
    emb[:, :5] = rng.normal(scale=0.05, size=(len(VOCAB), 5))
    fixed = {"皇": R + F, "后": R + F, "女": 2 * F + P, "男": 2 * M + P, "人": P,
             "国": R + M + E, "王": R + M - E}
    for ch, vec in fixed.items():
        emb[VOCAB.index(ch)] = vec
    return emb


@pytest.fixture(scope="session")
def ab():
    return load_script(SCRIPT)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """model.safetensors + tokenizer.json (the fast path), and the same weights as a pytorch_model.bin."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer
    root = tmp_path_factory.mktemp("tiny")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tok = BertTokenizer(vocab=str(root / "vocab.txt"))   # transformers 5 ignores vocab_file=
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(torch.from_numpy(handmade_embeddings()))
    st, bin_ = root / "st", root / "bin"
    for d in (st, bin_):
        tok.save_pretrained(d)
        cfg.save_pretrained(d)
    model.save_pretrained(st)
    torch.save(model.state_dict(), bin_ / "pytorch_model.bin")   # save_pretrained has no .bin option in v5
    assert tok.tokenize("MIT皇后") == ["m", "##it", "皇", "后"]
    return {"st": st, "bin": bin_, "tok": tok, "model": model}


def run(ab, capsys, *argv):
    """What `python A+B_Problem.py ARGS` does (run_main turns a UserError into one line and exit status 2)."""
    try:
        run_main(lambda: ab.main([str(a) for a in argv]))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def reference_vector(tiny, word, keep_cls_sep=False):
    """The handout's formula: word_embeddings(tokenizer(word).input_ids).mean(1), optionally without [CLS]/[SEP]."""
    ids = tiny["tok"](word, add_special_tokens=keep_cls_sep, return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny["model"].bert.embeddings.word_embeddings(ids).mean(1)[0].numpy()


def gensim_scores(vectors, terms, candidates, method):
    """gensim's own most_similar / most_similar_cosmul over a KeyedVectors of the words involved."""
    kv = KeyedVectors(HIDDEN)
    kv.add_vectors(list(vectors), np.array(list(vectors.values())))
    pos = [w for s, w in terms if s > 0]
    neg = [w for s, w in terms if s < 0]
    f = kv.most_similar if method == "add" else kv.most_similar_cosmul
    dists = f(positive=pos, negative=neg, topn=None)
    return [float(dists[kv.key_to_index[c]]) for c in candidates]


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize("expr, terms", [
    ("皇后-女人+男人", [(1, "皇后"), (-1, "女人"), (1, "男人")]),
    ("僵尸+复活=？", [(1, "僵尸"), (1, "复活")]),
    (" 秀发 － 头发 = ? ", [(1, "秀发"), (-1, "头发")]),
    ("-英国＋欧盟−法国", [(-1, "英国"), (1, "欧盟"), (-1, "法国")]),
    ("king-man+woman", [(1, "king"), (-1, "man"), (1, "woman")]),
])
def test_parse_expression(ab, expr, terms):
    assert ab.parse_expression(expr) == terms


@pytest.mark.parametrize("expr", ["", "  =？", "皇后--男人", "皇后+", "+"])
def test_parse_expression_errors(ab, expr):
    with pytest.raises(UserError):
        ab.parse_expression(expr)


# ------------------------------------------------------------------ a 🤗 model
@pytest.mark.parametrize("method, best", [("add", 1.0), ("mul", 0.75 * 0.75 / (0.5 + 1e-6))])
def test_handmade_analogy(ab, tiny, capsys, tmp_path, method, best):
    code, out, _ = run(ab, capsys, "--model", tiny["st"], "--expr", "皇后-女人+男人", "--choices", "学生", "骑士",
                       "国王", "--method", method, "--json", tmp_path / "r.json")
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["questions"][0]
    assert res["answer"] == "国王" and [c["word"] for c in res["candidates"]] == ["学生", "骑士", "国王"]
    assert res["candidates"][2]["score"] == pytest.approx(best, abs=1e-5)
    assert "国王" in [line.split()[0] for line in out.splitlines() if "← 答案" in line]


@pytest.mark.parametrize("method", ["add", "mul"])
@pytest.mark.parametrize("keep_cls_sep", [False, True])
def test_seven_questions_match_gensim(ab, tiny, capsys, tmp_path, method, keep_cls_sep):
    flags = ["--keep-cls-sep"] if keep_cls_sep else []
    code, _, _ = run(ab, capsys, "--model", tiny["st"], "--method", method, "--json", tmp_path / "r.json", *flags)
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["questions"]
    assert [r["expression"] for r in results] == [q[1] for q in ab.QUESTIONS]
    for res, (_, expr, choices) in zip(results, ab.QUESTIONS):
        terms = ab.parse_expression(expr)
        words = dict.fromkeys([w for _, w in terms] + choices)
        vectors = {w: reference_vector(tiny, w, keep_cls_sep) for w in words}
        expected = gensim_scores(vectors, terms, choices, method)
        np.testing.assert_allclose([c["score"] for c in res["candidates"]], expected, rtol=1e-4, atol=1e-5)
        assert res["answer"] == choices[int(np.argmax(expected))]


def test_no_arguments_uses_model_dir(tiny, tmp_path):
    """`python A+B_Problem.py` in a checkout with model/bert-base-chinese: seven tables, seven answers."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bert-base-chinese").symlink_to(tiny["st"], target_is_directory=True)
    p = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "model/bert-base-chinese" in p.stdout
    assert p.stdout.count("← 答案") == 7 and "皇后-女人+男人" in p.stdout and "MIT" in p.stdout
    answers = [line.split()[0] for line in p.stdout.splitlines() if "← 答案" in line]
    assert answers[0] == "国王"   # the hand-made example


def test_fast_path_reads_only_embeddings(tiny):
    """model.safetensors + tokenizer.json: neither torch nor transformers is imported, no model is built."""
    code = ("import runpy, sys; sys.argv = ['A+B_Problem.py', '--model', sys.argv[1]]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
            "print('IMPORTED', 'torch' in sys.modules, 'transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tiny["st"])], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "IMPORTED False False" in p.stdout


def test_keep_cls_sep_is_handout_formula(ab, tiny):
    emb = ab.read_input_embeddings(tiny["st"])
    tok = ab.load_tokenizer(tiny["st"])
    for keep in (False, True):
        space = ab.ModelSpace("tiny", emb, tok, keep)
        for word in ["皇后", "MIT", "国", "欧盟"]:
            np.testing.assert_allclose(space.vector(word), reference_vector(tiny, word, keep), rtol=1e-6, atol=1e-6)


def test_bin_checkpoint_equals_safetensors(ab, tiny):
    np.testing.assert_array_equal(ab.read_input_embeddings(tiny["bin"]), ab.read_input_embeddings(tiny["st"]))
    np.testing.assert_array_equal(ab.read_input_embeddings(tiny["st"]), handmade_embeddings())


def test_topk_whole_vocabulary(ab, tiny, capsys, tmp_path):
    """Top-k over the vocabulary: no special, [unusedN] or ## token, no query word; order and scores as gensim."""
    code, _, _ = run(ab, capsys, "--model", tiny["st"], "--expr", "国-女+男", "--topk", "1000",
                     "--json", tmp_path / "r.json")
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["questions"][0]
    emb = handmade_embeddings()
    words = [t for t in VOCAB if not t.startswith(("[", "##"))]
    kv = KeyedVectors(HIDDEN)
    kv.add_vectors(words, emb[[VOCAB.index(w) for w in words]])
    expected = kv.most_similar(positive=["国", "男"], negative=["女"], topn=len(words))
    assert [c["word"] for c in res["candidates"]] == [w for w, _ in expected]
    np.testing.assert_allclose([c["score"] for c in res["candidates"]], [s for _, s in expected], rtol=1e-5)
    assert res["answer"] == "王" and len(res["candidates"]) == len(words) - 3


def test_plot_is_png(ab, tiny, capsys, tmp_path):
    import matplotlib.image
    for argv in (["--expr", "皇后-女人+男人", "--choices", "学生", "骑士", "国王"], ["--method", "mul"]):
        out = tmp_path / f"{len(argv)}.png"
        code, _, _ = run(ab, capsys, "--model", tiny["st"], "--plot", out, *argv)
        assert code == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_notebook_argv_is_ignored(ab, tiny, capsys):
    code, out, err = run(ab, capsys, "-f", "/root/.local/share/jupyter/runtime/kernel-1.json", "--model",
                         tiny["st"], "--expr", "皇后-女人+男人", "--choices", "学生", "国王")
    assert code == 0 and "← 答案" in out and "kernel-1.json" not in err


def test_a_closed_stdout_ends_quietly(tiny):
    """`python A+B_Problem.py | head`, where head has already left: no traceback, no error message."""
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny["st"])], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert p.returncode == 1 and p.stderr == ""


# ------------------------------------------------------------------ clear errors
@pytest.mark.parametrize("argv", [[], ["--model", "model/bert-base-chinese"]])
def test_missing_model_offline(tmp_path, argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    p = subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("Error: ")
    assert "model/bert-base-chinese" in p.stderr and "hf download bert-base-chinese" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("expr, word", [("皇后-龘+男人", "龘"), ("皇后-女人+男人", "骑龘")])
def test_unknown_word_is_named(ab, tiny, capsys, expr, word):
    code, _, err = run(ab, capsys, "--model", tiny["st"], "--expr", expr, "--choices", "学生", word)
    assert code == 2 and f"“{word}”" in err and "[UNK]" in err


def test_empty_expression(ab, tiny, capsys):
    code, _, err = run(ab, capsys, "--model", tiny["st"], "--expr", " = ？")
    assert code == 2 and "empty expression" in err
    code, _, err = run(ab, capsys, "--model", tiny["st"], "--expr", "国王", "--choices", "学生", " ")
    assert code == 2 and "empty candidate" in err


def test_model_without_input_embeddings(ab, capsys, tmp_path):
    from transformers import ResNetConfig, ResNetModel
    ResNetModel(ResNetConfig(embedding_size=4, hidden_sizes=[4], depths=[1], num_channels=1)).save_pretrained(tmp_path)
    code, _, err = run(ab, capsys, "--model", tmp_path, "--expr", "a+b")
    assert code == 2 and "no input embeddings" in err and "ResNetModel" in err


def test_directory_without_weights(ab, capsys, tmp_path):
    code, _, err = run(ab, capsys, "--model", tmp_path)
    assert code == 2 and "model.safetensors" in err


# ------------------------------------------------------------------ word2vec vectors
@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = ["国王", "王后", "男人", "女人", "学生", "骑士", "鬼魂", "人类", "快", "黄色"]
    words += [f"词{i}" for i in range(60)]
    kv = KeyedVectors(16)
    kv.add_vectors(words, rng.normal(size=(len(words), 16)).astype(np.float32))
    root = tmp_path_factory.mktemp("w2v")
    kv.save_word2vec_format(str(root / "vec.txt"), binary=False)
    kv.save_word2vec_format(str(root / "vec.bin"), binary=True)
    kv.save_word2vec_format(str(root / "vec.txt.bz2"), binary=False)   # as Chinese-Word-Vectors ships them
    return {"kv": kv, "txt": root / "vec.txt", "bin": root / "vec.bin", "bz2": root / "vec.txt.bz2"}


@pytest.mark.parametrize("method", ["add", "mul"])
@pytest.mark.parametrize("fmt", ["txt", "bin", "bz2"])
def test_vectors_topk_match_gensim(ab, w2v, capsys, tmp_path, method, fmt):
    code, _, _ = run(ab, capsys, "--vectors", w2v[fmt], "--expr", "王后-女人+男人", "--topk", "8", "--method",
                     method, "--json", tmp_path / "r.json")
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["questions"][0]
    kv = w2v["kv"]
    f = kv.most_similar if method == "add" else kv.most_similar_cosmul
    expected = f(positive=["王后", "男人"], negative=["女人"], topn=8)
    assert [c["word"] for c in res["candidates"]] == [w for w, _ in expected]
    np.testing.assert_allclose([c["score"] for c in res["candidates"]], [s for _, s in expected], rtol=1e-5)


def test_vectors_unknown_word(ab, w2v, capsys):
    code, _, err = run(ab, capsys, "--vectors", w2v["txt"], "--expr", "国王-女王")
    assert code == 2 and "“女王”" in err


def test_topk_with_nothing_left_to_rank(ab, capsys, tmp_path):
    (tmp_path / "two.txt").write_text("2 2\n国王 1 0\n女人 0 1\n", encoding="utf-8")
    code, _, err = run(ab, capsys, "--vectors", tmp_path / "two.txt", "--expr", "国王-女人")
    assert code == 2 and "no word left" in err and "Traceback" not in err


def test_vectors_file_that_does_not_parse(ab, capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("3 4\n国王 0.1 0.2\n女人 x y z w\n", encoding="utf-8")
    code, _, err = run(ab, capsys, "--vectors", bad, "--expr", "国王")
    assert code == 2 and "无法解析词向量文件" in err and "Traceback" not in err


# ------------------------------------------------------------------ --eval
def test_eval_hand_computed(ab, capsys, tmp_path):
    """king = r+m, queen = r+f, man = m+p, woman = f+p, boy = m+y, lady = f+y (lady, not girl, is nearest)."""
    r, f, m, p, y, z = np.eye(6)
    kv = KeyedVectors(6)
    kv.add_vectors(["king", "queen", "man", "woman", "boy", "lady", "girl"],
                   np.array([r + m, r + f, m + p, f + p, m + y, f + y, z + 0.1 * f], dtype=np.float32))
    kv.save_word2vec_format(str(tmp_path / "v.txt"))
    (tmp_path / "q.txt").write_text(
        ": family\nMan Woman King Queen\nman woman boy girl\nnot four words\n"
        ": royal\nman king woman queen\nman king woman empress\n", encoding="utf-8")
    code, out, _ = run(ab, capsys, "--vectors", tmp_path / "v.txt", "--eval", tmp_path / "q.txt",
                       "--json", tmp_path / "e.json")
    assert code == 0
    ev = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert [(s["section"], s["correct"], s["total"]) for s in ev["sections"]] == [("family", 1, 2), ("royal", 1, 1)]
    assert (ev["correct"], ev["total"], ev["skipped_oov"], ev["questions"]) == (2, 3, 1, 4)
    assert ev["accuracy"] == pytest.approx(2 / 3) and "66.7%" in out
    score, sections = kv.evaluate_word_analogies(str(tmp_path / "q.txt"))
    assert score == pytest.approx(ev["accuracy"])


def analogy_fixture(tmp_path, seed=2):
    """Random vectors with planted analogies (some noisy, so some fail), case variants, unknown words."""
    rng = np.random.default_rng(seed)
    base = [f"w{i}" for i in range(150)]
    words = base + ["W3", "W7", "W10"] + [f"x{i}" for i in range(60)]   # duplicates/case variants, then a tail
    vecs = rng.normal(size=(len(words), 12)).astype(np.float32)
    lines = []
    for s in range(3):
        lines.append(f": section {s}")
        for _ in range(60):
            a, b, c, d = rng.choice(len(base), 4, replace=False)
            vecs[d] = vecs[b] - vecs[a] + vecs[c] + rng.normal(scale=rng.choice([0.1, 2.0]), size=12)
            q = [words[i] for i in (a, b, c, d)]
            if rng.random() < 0.2:
                q = [w.upper() if rng.random() < 0.5 else w for w in q]
            if rng.random() < 0.1:
                q[rng.integers(4)] = "unknown"
            if rng.random() < 0.05:
                q[rng.integers(4)] = f"x{rng.integers(55, 60)}"   # beyond --restrict-vocab
            lines.append(" ".join(q))
        lines.append("a b c")
    kv = KeyedVectors(12)
    kv.add_vectors(words, vecs)
    kv.save_word2vec_format(str(tmp_path / "v.bin"), binary=True)
    (tmp_path / "q.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return kv


@pytest.mark.parametrize("case_sensitive", [False, True])
def test_eval_matches_gensim(ab, capsys, tmp_path, case_sensitive):
    kv = analogy_fixture(tmp_path)
    flags = ["--case-sensitive"] if case_sensitive else []
    code, _, _ = run(ab, capsys, "--vectors", tmp_path / "v.bin", "--eval", tmp_path / "q.txt",
                     "--restrict-vocab", 200, "--json", tmp_path / "e.json", *flags)
    assert code == 0
    ev = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    score, sections = kv.evaluate_word_analogies(str(tmp_path / "q.txt"), restrict_vocab=200,
                                                 case_insensitive=not case_sensitive)
    assert [(s["section"], s["correct"], s["total"]) for s in ev["sections"]] == \
        [(s["section"], len(s["correct"]), len(s["correct"]) + len(s["incorrect"])) for s in sections[:-1]]
    assert ev["accuracy"] == pytest.approx(score)
    assert 0.1 < score < 0.9 and ev["skipped_oov"] > 0


def test_eval_3cosmul_matches_gensim_cosmul(ab, capsys, tmp_path):
    """gensim evaluates 3CosAdd only: the reference is its loop (case-sensitive) with most_similar_cosmul."""
    kv = analogy_fixture(tmp_path, seed=3)
    code, _, _ = run(ab, capsys, "--vectors", tmp_path / "v.bin", "--eval", tmp_path / "q.txt", "--method", "mul",
                     "--case-sensitive", "--json", tmp_path / "e.json")
    assert code == 0
    ev = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    expected, section = [], None
    for line in (tmp_path / "q.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(": "):
            section = [line[2:], 0, 0]
            expected.append(section)
        elif len(line.split()) == 4 and all(w in kv.key_to_index for w in line.split()):
            a, b, c, d = line.split()
            sims = kv.most_similar_cosmul(positive=[b, c], negative=[a], topn=5)
            predicted = next((w for w, _ in sims if w not in (a, b, c)), sims[-1][0])
            section[1] += predicted == d
            section[2] += 1
    assert [[s["section"], s["correct"], s["total"]] for s in ev["sections"]] == expected


def test_eval_with_bert_words(ab, tiny, capsys, tmp_path):
    """Multi-character words are answers too (mean of their characters); an unknown character skips the question."""
    (tmp_path / "q.txt").write_text(": royal\n女人 男人 皇后 国王\n女人 男人 皇后 学生\n女人 男人 龘龘 国王\n",
                                    encoding="utf-8")
    code, out, _ = run(ab, capsys, "--model", tiny["st"], "--eval", tmp_path / "q.txt", "--json", tmp_path / "e.json")
    assert code == 0
    ev = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert (ev["correct"], ev["total"], ev["skipped_oov"]) == (1, 2, 1)


def test_eval_file_errors(ab, w2v, capsys, tmp_path):
    (tmp_path / "q.txt").write_text("a b c d\n: s\n", encoding="utf-8")
    code, _, err = run(ab, capsys, "--vectors", w2v["txt"], "--eval", tmp_path / "q.txt")
    assert code == 2 and "missing section header" in err
    code, _, err = run(ab, capsys, "--vectors", w2v["txt"], "--eval", tmp_path / "missing.txt")
    assert code == 2 and "missing.txt" in err


def test_vectors_text_without_header_line(ab, w2v, capsys, tmp_path):
    """Several Chinese vector files omit the "count dim" line; gensim reads them with no_header=True."""
    lines = w2v["txt"].read_text(encoding="utf-8").splitlines()[1:]
    (tmp_path / "noheader.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _ = run(ab, capsys, "--vectors", tmp_path / "noheader.txt", "--expr", "王后-女人+男人", "--topk", "1")
    expected = w2v["kv"].most_similar(positive=["王后", "男人"], negative=["女人"], topn=1)[0][0]
    assert code == 0 and f"{expected}" in out.split("← 答案")[0].splitlines()[-1]


def test_model_path_that_does_not_exist(ab, capsys, tmp_path):
    code, _, err = run(ab, capsys, "--model", tmp_path / "nope" / "bert")
    assert code == 2 and "nope/bert" in err and "HF_HUB_OFFLINE" in err


@pytest.mark.parametrize("case_sensitive, correct", [(False, 1), (True, 0)])
def test_eval_case_variant_rules(ab, capsys, tmp_path, case_sensitive, correct):
    """gensim's two case rules, by hand. Upper-cased, the first variants "man"/"woman" are used, not the later
    "Man" (≈ woman) / "Woman", and the nearest word "Woman" is skipped as a variant of the query word "woman",
    so "queen" is the answer. Case-sensitive, "Woman" is a different word and wins."""
    r, f, m, p, z, y = np.eye(6)
    kv = KeyedVectors(6)
    kv.add_vectors(["man", "woman", "king", "queen", "prince", "Man", "Woman"],
                   np.array([m + p, f + p, r + m, r + f + 0.1 * y, r + m + 0.2 * p, f + p + 0.1 * z, r + f],
                            dtype=np.float32))
    kv.save_word2vec_format(str(tmp_path / "v.txt"))
    (tmp_path / "q.txt").write_text(": s\nman woman king queen\n", encoding="utf-8")
    flags = ["--case-sensitive"] if case_sensitive else []
    code, _, _ = run(ab, capsys, "--vectors", tmp_path / "v.txt", "--eval", tmp_path / "q.txt",
                     "--json", tmp_path / "e.json", *flags)
    ev = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))
    assert code == 0 and (ev["correct"], ev["total"]) == (correct, 1)
    score, _ = kv.evaluate_word_analogies(str(tmp_path / "q.txt"), case_insensitive=not case_sensitive)
    assert score == correct


def test_tokenizer_config_lowercase_as_transformers(ab, tiny, capsys, tmp_path):
    """Like the hub's bert-base-chinese: tokenizer_config.json says do_lower_case=false. The tokens are then
    AutoTokenizer's (which honours it), and "MIT", [UNK] that way, falls back to its lower-cased pieces."""
    import shutil

    from transformers import AutoTokenizer
    d = tmp_path / "cased"
    shutil.copytree(tiny["st"], d)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}), encoding="utf-8")
    ours, theirs = ab.load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    for text in ["MIT皇后", "Mit 国王", "m"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs(text, add_special_tokens=False).input_ids
    assert theirs.tokenize("MIT") == ["[UNK]"]
    space = ab.ModelSpace(str(d), ab.read_input_embeddings(d), ours, False)
    np.testing.assert_allclose(space.vector("MIT"), reference_vector(tiny, "mit"), atol=1e-6)
    assert "“MIT”" in capsys.readouterr().err
