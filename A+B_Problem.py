"""Task 1 · A+B Problem：词向量加减法 (word-embedding arithmetic).

任务：用 bert-base-chinese 的词嵌入 (input embeddings) 对词做加减，在候选词中找出最接近的词，
例如 皇后-女人+男人 ≈ 国王。The handout's example and six questions run with no arguments.

Run it from the repository root (it also runs unchanged when pasted into a Colab cell):
    python A+B_Problem.py                                        # example + the six questions
    python A+B_Problem.py --expr "皇后-女人+男人" --choices 学生 骑士 国王
    python A+B_Problem.py --expr "秀发-头发" --topk 10            # nearest words of the whole vocabulary
    python A+B_Problem.py --method mul                           # 3CosMul instead of 3CosAdd
    python A+B_Problem.py --vectors sgns.wiki.word --eval analogy.txt --json out/eval.json
    python A+B_Problem.py --plot out/ab.png                      # PCA picture of the arithmetic

A word's vector (🤗 model): tokenize the word WITHOUT special tokens (bert-base-chinese splits Chinese into
characters; "MIT", [UNK] as written, is tokenized lower-cased) and average those tokens' rows of the
input-embedding matrix. The handout's original script also averaged in [CLS] and [SEP]: two rows shared by every
word, which pull all words towards each other; --keep-cls-sep reproduces it.
Scores follow gensim: every vector is unit-normalised first; 3CosAdd ranks by the cosine with
(sum of +terms - sum of -terms), 3CosMul (Levy & Goldberg 2014) by prod((1+cos)/2 of +terms) / (prod((1+cos)/2
of -terms) + 1e-6). Only the embedding matrix is read (lazily, from model.safetensors): the network is never
built, except for an old pytorch_model.bin checkpoint.
"""
import argparse
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np

from course_utils import ArgumentParser, UserError, atomic_path, local_or_hub, parse_args, run_main, script_dir

HERE = script_dir(globals())
DEFAULT_DIR = "model/bert-base-chinese"   # course layout: weights live under model/
HUB_ID = "bert-base-chinese"              # fallback when the directory is missing
QUESTIONS = [  # (title, expression, candidates) straight from the handout
    ("示例", "皇后-女人+男人", ["学生", "骑士", "国王"]),
    ("问题1", "僵尸+复活", ["鬼魂", "人类", "抱抱脸"]),
    ("问题2", "秀发-头发", ["闪亮", "昏暗", "电灯"]),
    ("问题3", "闪电-电流", ["快", "黄色", "下雨"]),
    ("问题4", "清华-北大", ["一流", "二流", "负一流"]),
    ("问题5", "大学+一流+海淀", ["清华", "北大", "斯坦福", "MIT"]),
    ("问题6", "欧盟-英国-法国-德国", ["俄罗斯", "欧盟", "波兰", "美国"]),
]
# Where models keep their input-embedding matrix, by the end of the tensor's name (BERT, LLaMA, GPT-2, T5, ...).
EMBED_SUFFIXES = ("word_embeddings.weight", "embed_tokens.weight", "wte.weight", "shared.weight",
                  "tok_embeddings.weight", "embed_in.weight", "word_embedding.weight")


# ---------------------------------------------------------------- 1. expressions
def parse_expression(expr):
    """"皇后-女人+男人" -> [(+1, "皇后"), (-1, "女人"), (+1, "男人")].

    Accepts full-width ＋/－ and the minus sign − (Chinese input methods type them), and a trailing "=？"."""
    text = expr.translate(str.maketrans({"＋": "+", "－": "-", "−": "-", "＝": "=", "？": "?"}))
    text = re.sub(r"=\s*\??\s*$", "", text.strip()).strip()
    if not text:
        raise UserError("表达式为空 (empty expression): 例如 --expr \"皇后-女人+男人\"")
    if text[0] not in "+-":
        text = "+" + text
    terms = []
    for sign, word in re.findall(r"([+-])([^+-]*)", text):
        if not word.strip():
            raise UserError(f"表达式 “{expr}” 中 {sign} 后面缺少词 (a term is missing after '{sign}')")
        terms.append((1 if sign == "+" else -1, word.strip()))
    return terms


def show_expression(terms):
    return "".join(("+" if s > 0 else "-") + w for s, w in terms).lstrip("+")


# ---------------------------------------------------------------- 2. scores (gensim's semantics)
def unit(x):
    """Unit-normalise a vector or each row of a matrix (a zero vector stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1, norm)


def score(cands, pos, neg, method):
    """Scores of unit rows `cands` (n, d) against unit query vectors pos (p, d) / neg (q, d).

    3CosAdd: cosine with the normalised sum (= gensim most_similar, whose weighted mean only rescales it).
    3CosMul: gensim most_similar_cosmul, cosines shifted to [0, 1] so that the product is well defined."""
    if method == "add":
        return cands @ unit(pos.sum(0) - neg.sum(0))
    shifted = lambda q: (1 + cands @ q.T) / 2   # noqa: E731  (n, p) or (n, q)
    return shifted(pos).prod(1) / (shifted(neg).prod(1) + 1e-6)


# ---------------------------------------------------------------- 3. word spaces: a 🤗 model or word2vec vectors
class VectorsSpace:
    """word2vec vectors read by gensim: a word is one vocabulary entry, exactly as written."""

    def __init__(self, path, kv):
        self.source, self.kv = f"vectors {path}", kv
        self.keys, self.matrix = kv.index_to_key, kv.vectors

    def vector(self, word):
        if word not in self.kv.key_to_index:
            raise UserError(f"词 “{word}” 不在词向量文件的词表中 (word '{word}' is not in {self.source})")
        return self.kv.vectors[self.kv.key_to_index[word]]

    def index(self, word):
        return self.kv.key_to_index.get(word)

    def with_words(self, words):
        return self.keys, self.matrix


class ModelSpace:
    """Input embeddings of a 🤗 model: a word is the mean of its tokens' rows."""

    def __init__(self, source, emb, tok, keep_cls_sep):
        self.source, self.emb, self.tok, self.lowered = source, emb, tok, set()
        # The handout's mode: tokenizing "" with special tokens gives exactly what it averaged in ([CLS], [SEP]).
        self.extra = tok.encode("", add_special_tokens=True).ids if keep_cls_sep else []
        self.unk = tok.token_to_id(getattr(tok.model, "unk_token", None) or "")   # None: no UNK (byte-level BPE)
        specials = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        # The searchable vocabulary: whole tokens only. Special tokens, [unusedN] placeholders and "##" pieces
        # (continuations of a word, never a word alone) would be meaningless answers.
        ids = [i for i in range(min(len(emb), tok.get_vocab_size()))
               if i not in specials and not self._junk(tok.id_to_token(i))]
        names = tok.decode_batch([[i] for i in ids])
        keep = [k for k, name in enumerate(names) if name.strip()]
        self.ids = np.array([ids[k] for k in keep], dtype=np.int64)
        self.keys = [names[k].strip() for k in keep]
        self.row_of = {int(i): r for r, i in enumerate(self.ids)}
        self.matrix = emb[self.ids]
        if self.extra:
            self.matrix = (self.matrix + emb[self.extra].sum(0)) / (1 + len(self.extra))

    @staticmethod
    def _junk(token):
        return token is None or token.startswith("##") or re.fullmatch(r"[\[<]unused\d+[\]>]", token) is not None

    def token_ids(self, word):
        ids = self.tok.encode(word, add_special_tokens=False).ids
        if self.unk in ids and self.unk not in self.tok.encode(word.lower(), add_special_tokens=False).ids:
            # bert-base-chinese has no capital letters in its vocabulary, yet its tokenizer config says
            # do_lower_case=false, so "MIT" would be [UNK]: use the lower-cased word instead, and say so once.
            if word not in self.lowered:
                self.lowered.add(word)
                print(f"提示：“{word}” 按小写 “{word.lower()}” 分词 (capitals are not in the vocabulary)",
                      file=sys.stderr)
            ids = self.tok.encode(word.lower(), add_special_tokens=False).ids
        if not ids or (self.unk is not None and self.unk in ids):
            raise UserError(f"词 “{word}” 含有词表外的字符，分词得到 [UNK] (word '{word}' is not in the "
                            f"vocabulary of {self.source})")
        if max(ids) >= len(self.emb):
            raise UserError(f"the tokenizer and the embedding matrix of {self.source} do not match (token id "
                            f"{max(ids)} >= {len(self.emb)} rows)")
        return ids

    def vector(self, word):
        return self.emb[self.token_ids(word) + self.extra].mean(0)

    def index(self, word):
        """Row of `word` in the searchable vocabulary when the word is a single token (else None)."""
        try:
            ids = self.token_ids(word)
        except UserError:
            return None
        return self.row_of.get(ids[0]) if len(ids) == 1 else None

    def with_words(self, words):
        """Vocabulary + the (multi-token) words of a benchmark, for --eval; unknown words are left out."""
        seen, keys, rows = set(self.keys), list(self.keys), []
        for w in words:
            if w not in seen and self.index(w) is None:
                try:
                    rows.append(self.vector(w))
                except UserError:
                    continue
                seen.add(w)
                keys.append(w)
        return keys, (np.vstack([self.matrix, np.array(rows)]) if rows else self.matrix)


def load_vectors(path, binary=None, limit=None):
    """word2vec text or binary vectors (or a gensim .kv file) through gensim's own reader."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"找不到词向量文件 {path} (vectors file not found)")
    from gensim.models import KeyedVectors
    kind = "gensim KeyedVectors"
    try:
        if path.suffix in (".kv", ".model"):
            kv = KeyedVectors.load(str(path))
        else:
            from gensim import utils  # its open() also reads .gz / .bz2 transparently, like the loader
            with utils.open(str(path), "rb") as f:
                header, sample = f.readline(), f.read(4096)
            if binary is None:   # binary files hold raw float32 bytes, which are almost never valid UTF-8
                try:
                    sample.decode("utf-8")
                    binary = False
                except UnicodeDecodeError as e:
                    binary = e.start < len(sample) - 4   # not just a character cut at the end of the sample
            # Some Chinese vector files have no "count dim" header line.
            no_header = not binary and not re.fullmatch(rb"\s*\d+\s+\d+\s*", header)
            kind = "word2vec binary" if binary else "word2vec text"
            kv = KeyedVectors.load_word2vec_format(str(path), binary=binary, limit=limit, no_header=no_header)
    except Exception as e:   # gensim raises many kinds of errors on a malformed file
        raise UserError(f"无法解析词向量文件 {path} (not {kind} vectors: "
                        f"{type(e).__name__}: {str(e)[:150]})")
    if not len(kv.index_to_key):
        raise UserError(f"词向量文件 {path} 是空的 (no vectors)")
    return VectorsSpace(path, kv)


def resolve_model(name):
    """A local directory, else the hub cache, else a download of the hub id (config, tokenizer and weights only)."""
    name = DEFAULT_DIR if name is None or name.rstrip("/") == DEFAULT_DIR else name
    hub_id = HUB_ID if name == DEFAULT_DIR else name
    return Path(local_or_hub(os.path.expanduser(name), hub_id, HERE, patterns=["*.json", "vocab.txt", "*.model",
                                                                               "*.safetensors"]))


def read_input_embeddings(model_dir):
    """The input-embedding matrix as float32 numpy, reading one tensor of model.safetensors lazily."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors import safe_open
        found = []   # (rank, file, name): prefer the right number of rows, then the usual names
        for file in files:
            with safe_open(file, framework="numpy") as f:   # reads the header only
                for name in f.keys():
                    hit = [r for r, s in enumerate(EMBED_SUFFIXES) if name == s or name.endswith("." + s)]
                    if hit and len(f.get_slice(name).get_shape()) == 2:
                        found.append(((f.get_slice(name).get_shape()[0] != vocab_size, hit[0]), str(file), name))
        if found:
            _, file, name = min(found)
            with safe_open(file, framework="numpy") as f:
                if f.get_slice(name).get_dtype() != "BF16":
                    return f.get_tensor(name).astype(np.float32)
            with safe_open(file, framework="pt") as f:   # numpy has no bfloat16
                return f.get_tensor(name).float().numpy()
    elif not list(model_dir.glob("*.bin")):
        raise UserError(f"{model_dir} 中没有权重文件 (no model.safetensors or pytorch_model.bin)")
    return embeddings_from_full_model(model_dir)


def embeddings_from_full_model(model_dir):
    """Slow path (a .bin checkpoint or unusual tensor names): build the model, ask for its input embeddings."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(model_dir)
    except Exception as e:
        raise UserError(f"无法加载模型 {model_dir} ({type(e).__name__}: {str(e)[:200]})")
    try:
        weight = model.get_input_embeddings().weight
    except (NotImplementedError, AttributeError):
        weight = None
    if weight is None or weight.dim() != 2:
        raise UserError(f"模型 {model_dir} ({type(model).__name__}) 没有词嵌入 (it has no input embeddings: "
                        f"choose a text model)")
    return weight.detach().float().numpy()


def load_tokenizer(model_dir):
    """A 🤗 `tokenizers` tokenizer: tokenizer.json directly (fast, no torch), else via AutoTokenizer."""
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, normalizers
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        # transformers lets tokenizer_config.json's do_lower_case override tokenizer.json (bert-base-chinese
        # says false there): do the same, so that the tokens are exactly those of AutoTokenizer.
        norm = tok.normalizer
        lowercase = config.get("do_lower_case", getattr(norm, "lowercase", None))
        if isinstance(norm, normalizers.BertNormalizer) and lowercase != norm.lowercase:
            tok.normalizer = normalizers.BertNormalizer(clean_text=norm.clean_text, lowercase=config["do_lower_case"],
                                                        handle_chinese_chars=norm.handle_chinese_chars,
                                                        strip_accents=norm.strip_accents)
        return tok
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        return transformers.AutoTokenizer.from_pretrained(model_dir).backend_tokenizer
    except Exception as e:
        raise UserError(f"{model_dir} 中没有可用的分词器 (no tokenizer.json or vocab.txt: {type(e).__name__})")


def load_space(args):
    if args.vectors:
        if args.keep_cls_sep:
            raise UserError("--keep-cls-sep 只用于 🤗 模型 (it applies to --model, not to --vectors)")
        return load_vectors(args.vectors, args.binary, args.limit)
    model_dir = resolve_model(args.model)
    emb = read_input_embeddings(model_dir)   # first: a model without embeddings fails here, clearly
    return ModelSpace(str(model_dir), emb, load_tokenizer(model_dir), args.keep_cls_sep)


# ---------------------------------------------------------------- 4. answering questions
def answer(space, expr, choices, method, topk):
    """Score the choices (or the whole vocabulary) for one expression."""
    terms = parse_expression(expr)
    vecs = {w: unit(space.vector(w)) for _, w in terms}   # unknown words fail here, by name
    pos = np.array([vecs[w] for s, w in terms if s > 0]).reshape(-1, space.matrix.shape[1])
    neg = np.array([vecs[w] for s, w in terms if s < 0]).reshape(-1, space.matrix.shape[1])
    if method == "mul" and not len(pos):
        raise UserError("3CosMul 至少需要一个正项 (needs at least one + term)")
    if choices:
        words, cands = list(choices), unit(np.array([space.vector(c) for c in choices]))
    else:   # the whole vocabulary, without the query words themselves (as gensim does)
        words, cands = space.keys, unit(space.matrix)
    scores = score(cands, pos, neg, method)
    cosines = score(cands, pos, neg, "add")
    if choices:
        order = range(len(words))
    else:
        scores[[i for i in (space.index(w) for _, w in terms) if i is not None]] = -np.inf
        order = [i for i in np.argsort(-scores, kind="stable")[:topk] if np.isfinite(scores[i])]
    rows = [{"word": words[i], "cosine": float(cosines[i]), "score": float(scores[i])} for i in order]
    if not rows:
        raise UserError("词表里除了查询词本身没有别的词可选 (no word left besides the query words)")
    return {"expression": show_expression(terms), "terms": [["+" if s > 0 else "-", w] for s, w in terms],
            "method": method, "mode": "choices" if choices else "topk", "candidates": rows,
            "answer": max(rows, key=lambda r: r["score"])["word"]}


def width(text):
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def print_result(title, res):
    name = "3CosMul" if res["method"] == "mul" else "3CosAdd"
    print(f"\n{title}  {res['expression']} = ？  ({name})")
    col = max(6, *(width(r["word"]) for r in res["candidates"]))
    print(f"  {'候选词' + ' ' * (col - 6)}  余弦(cos)" + ("  3CosMul" if res["method"] == "mul" else ""))
    for r in res["candidates"]:
        mark = "  ← 答案" if r["word"] == res["answer"] else ""
        extra = f"  {r['score']:7.4f}" if res["method"] == "mul" else ""
        print(f"  {r['word'] + ' ' * (col - width(r['word']))}  {r['cosine']:8.4f}{extra}{mark}")


# ---------------------------------------------------------------- 5. --eval: analogy benchmarks
def read_analogies(path):
    """Google / CA8 format: ": section" lines, then "a b c d" lines (a:b = c:d). Other lines are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"无法读取评测文件 {path} ({type(e).__name__})")
    sections = []
    for no, line in enumerate(lines, 1):
        if line.startswith(": "):
            sections.append((line.lstrip(": ").strip(), []))
        elif not sections:
            raise UserError(f"{path} 第 {no} 行出现在任何 ': 类别' 标题之前 (missing section header)")
        elif len(line.split()) == 4:
            sections[-1][1].append(tuple(line.split()))
    return sections


def evaluate(space, path, method, restrict_vocab=300000, case_insensitive=True, batch=None):
    """Accuracy per section, with the rules of gensim's KeyedVectors.evaluate_word_analogies:
    only the first `restrict_vocab` words count; words are compared upper-cased (the first case variant wins);
    a question with an unknown word is skipped and counted; the answer is the best of the top 5 that is not
    a query word. Questions are scored in batches of matrix products instead of one at a time."""
    sections = read_analogies(path)
    keys, matrix = space.with_words(sorted({w for _, qs in sections for q in qs for w in q}))
    keys, M = keys[:restrict_vocab], unit(matrix[:restrict_vocab])
    norm = str.upper if case_insensitive else str
    ok = {norm(k): i for i, k in reversed(list(enumerate(keys)))}
    batch = batch or max(1, 20_000_000 // max(1, len(keys)))
    results, oov, total = [], 0, 0
    for name, questions in sections:
        qs = [tuple(norm(w) for w in q) for q in questions]
        known = [q for q in qs if all(w in ok for w in q)]
        oov, total = oov + len(qs) - len(known), total + len(qs)
        correct = 0
        for start in range(0, len(known), batch):
            chunk = known[start:start + batch]
            a, b, c = (np.array([ok[q[k]] for q in chunk]) for k in range(3))
            if method == "add":
                s = M @ unit(M[b] + M[c] - M[a]).T                          # (V, B)
            else:
                s = (1 + M @ M[b].T) / 2 * (1 + M @ M[c].T) / 2 / ((1 + M @ M[a].T) / 2 + 1e-6)
            cols = np.arange(len(chunk))
            for idx in (a, b, c):
                s[idx, cols] = -np.inf
            top = np.argpartition(-s, min(5, len(keys) - 1), axis=0)[:5]       # 5 best rows, unordered
            for j, q in enumerate(chunk):
                predicted = None
                for i in sorted((i for i in top[:, j] if np.isfinite(s[i, j])), key=lambda i: -s[i, j]):
                    predicted = norm(keys[i])
                    if predicted not in q[:3]:
                        break
                correct += predicted == q[3]
        results.append({"section": name, "correct": correct, "total": len(known),
                        "accuracy": correct / len(known) if known else None})
    right, seen = sum(r["correct"] for r in results), sum(r["total"] for r in results)
    return {"file": str(path), "method": method, "restrict_vocab": restrict_vocab,
            "case_insensitive": case_insensitive, "sections": results, "correct": right, "total": seen,
            "accuracy": right / seen if seen else None, "questions": total, "skipped_oov": oov}


def print_eval(ev):
    col = max([width(r["section"]) for r in ev["sections"]] + [16])
    pct = lambda a: "   —" if a is None else f"{100 * a:5.1f}%"   # noqa: E731
    print(f"\n{'类别 (section)' + ' ' * (col - 14)}  正确/总数   准确率")
    for r in ev["sections"] + [{"section": "总计 (total)", **ev}]:
        print(f"{r['section'] + ' ' * (col - width(r['section']))}  {r['correct']:>5}/{r['total']:<5}  "
              f"{pct(r['accuracy'])}")
    print(f"跳过含未知词的问题 (skipped, unknown words): {ev['skipped_oov']}/{ev['questions']}")


# ---------------------------------------------------------------- 6. --plot
def plot(space, results, titles, path):
    """One PCA panel per question: words as points, the +/- terms as a chain of arrows from the origin."""
    import warnings

    import matplotlib
    from matplotlib import font_manager
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone
    cjk = [f.name for f in font_manager.fontManager.ttflist
           if re.search(r"CJK|WenQuanYi|SimHei|YaHei|PingFang|Heiti|Source Han|Arial Unicode", f.name)]
    rc = {"font.sans-serif": cjk[:1] + ["DejaVu Sans"], "axes.unicode_minus": False}
    cols = min(4, len(results))
    rows = -(-len(results) // cols)
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(4.5 * cols, 4.2 * rows), layout="constrained")
        for k, (res, title) in enumerate(zip(results, titles)):
            ax = fig.add_subplot(rows, cols, k + 1)
            asked = [w for _, w in res["terms"]]
            words = list(dict.fromkeys(asked + [r["word"] for r in res["candidates"][:6]]))
            U = unit(np.array([space.vector(w) for w in words]))
            chain = np.cumsum([(1 if s == "+" else -1) * U[words.index(w)] for s, w in res["terms"]], axis=0)
            X = np.vstack([U, chain, np.zeros((1, U.shape[1]))])
            center = X.mean(0)
            P = (X - center) @ np.linalg.svd(X - center, full_matrices=False)[2][:2].T
            pts, path_pts = P[:len(words)], P[len(words):]          # path_pts ends with the origin
            prev = path_pts[-1]
            ax.scatter(*path_pts.T, s=8, color="tab:blue")   # also makes the axes include the whole chain
            ax.text(*prev, " 0", color="tab:blue", fontsize=8)
            for (s, w), p in zip(res["terms"], path_pts[:-1]):
                ax.annotate("", p, prev, arrowprops={"arrowstyle": "->", "color": "tab:blue"})
                ax.text(*(prev + p) / 2, f"{s}{w}", color="tab:blue", fontsize=9)
                prev = p
            ax.scatter(*path_pts[-2], marker="*", s=160, color="tab:orange", zorder=3)
            for w, p in zip(words, pts):
                color = "tab:red" if w == res["answer"] else "black" if w in asked else "gray"
                ax.scatter(*p, color=color, s=25)
                ax.text(*p, " " + w, color=color, fontsize=10)
            ax.margins(0.15)
            ax.set_title(f"{title}: {res['expression']} ≈ {res['answer']}", fontsize=10)
        fig.suptitle(f"{space.source} · PCA", fontsize=9)
        with warnings.catch_warnings(), atomic_path(path) as tmp:  # no CJK font: boxes for labels, said once below
            warnings.simplefilter("ignore")
            fig.savefig(tmp, dpi=110, format=Path(path).suffix[1:] or "png")
    if not cjk:
        print("提示：未找到中文字体，图中汉字可能显示为方框 (no CJK font found; e.g. apt-get install "
              "fonts-noto-cjk)", file=sys.stderr)
    print(f"\n图已保存 (plot saved): {path}")


# ---------------------------------------------------------------- 7. main
def build_parser():
    p = ArgumentParser(description="词向量加减法 (word-embedding arithmetic) with 3CosAdd / 3CosMul.")
    p.add_argument("--model", help=f"🤗 model directory or hub id (default: {DEFAULT_DIR}, else {HUB_ID})")
    p.add_argument("--vectors", help="word2vec text/binary vectors file (or gensim .kv) instead of a model")
    p.add_argument("--binary", action=argparse.BooleanOptionalAction, default=None,
                   help="--vectors is word2vec binary / text (default: guess from the file's bytes)")
    p.add_argument("--limit", type=int, help="read only the first N vectors of --vectors (big files)")
    p.add_argument("--expr", help="expression of + and - terms, e.g. 皇后-女人+男人")
    p.add_argument("--choices", nargs="+", help="candidate answers (default: the whole vocabulary, --topk)")
    p.add_argument("--topk", type=int, default=10, help="how many nearest words without --choices (10)")
    p.add_argument("--method", choices=["add", "mul"], default="add", help="3CosAdd (add) or 3CosMul (mul)")
    p.add_argument("--keep-cls-sep", action="store_true",
                   help="average [CLS] and [SEP] into every word, as the handout's original script did")
    p.add_argument("--eval", metavar="FILE", help="analogy benchmark (Google / CA8 format): accuracy")
    p.add_argument("--restrict-vocab", type=int, default=300000, help="--eval: only the first N words (300000)")
    p.add_argument("--case-sensitive", action="store_true", help="--eval: do not upper-case words (gensim's "
                   "default is case-insensitive)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw the questions' words and arithmetic (PCA)")
    return p


def run(args):
    if args.choices and not args.expr:
        raise UserError("--choices 需要和 --expr 一起使用 (--choices needs --expr)")
    if args.choices and not all(c.strip() for c in args.choices):
        raise UserError("--choices 中有空的候选词 (an empty candidate)")
    if args.topk < 1:
        raise UserError("--topk 必须 ≥ 1")
    if args.eval and (args.expr or args.plot):
        raise UserError("--eval 不能和 --expr / --plot 同时使用 (--eval runs a benchmark on its own)")
    space = load_space(args)
    print(f"词向量来源 (embeddings): {space.source}  ·  {len(space.keys)} 个词, {space.matrix.shape[1]} 维")
    if args.eval:
        output = evaluate(space, args.eval, args.method, args.restrict_vocab, not args.case_sensitive)
        print_eval(output)
    else:
        asked = [("", args.expr, args.choices)] if args.expr else QUESTIONS
        results = [answer(space, expr, choices, args.method, args.topk) for _, expr, choices in asked]
        for (title, _, _), res in zip(asked, results):
            print_result(title, res)
        if args.plot:
            plot(space, results, [t or "问题" for t, _, _ in asked], args.plot)
        output = {"questions": [{"title": t, **r} for (t, _, _), r in zip(asked, results)]}
    if args.json:
        output = {"source": space.source, "keep_cls_sep": args.keep_cls_sep, **output}
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(output, ensure_ascii=False, indent=1), encoding="utf-8")


def main(argv=None):
    args = parse_args(build_parser(), argv)
    try:
        run(args)
    except BrokenPipeError:  # `| head` has left: run_main ends quietly
        raise
    except OSError as e:  # an output path that cannot be written, a file that vanished, ...
        raise UserError(f"{e.strerror or e}: {e.filename or ''}") from None


if __name__ == "__main__":
    run_main(main)
