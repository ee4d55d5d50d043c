"""Task 0: ChatGLM2(-int4) in THUDM's layout → transformers' own `glm` model
(convert_chatglm2.py, ChatGLM.py --convert).

The references are ../shared/fixtures/chatglm2/*/reference.json, computed by THUDM's published remote code on
transformers 4.41.2: logits within 1e-4, everything else exactly. Other shapes, group counts, shard layouts and
sentencepiece settings come from checkpoints built here (tiny, random), and from sentencepiece itself.
"""
import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert_chatglm2 as cg  # noqa: E402
from course_utils import UserError  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "chatglm2"
NAMES = ["chatglm2-tiny", "chatglm2-tiny-int4"]
needs_fixtures = pytest.mark.skipif(not (FIXTURES / NAMES[0] / "reference.json").exists(),
                                    reason="../shared/fixtures/chatglm2 is not here")
# THUDM's downloads carry their remote code: converting and loading must never import or run it.
BOOBY_TRAP = "import pathlib; pathlib.Path({marker!r}).write_text('ran'); raise SystemExit('remote code ran')\n"
REMOTE_CODE = ["configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py"]


def add_booby_traps(directory, marker):
    for name in REMOTE_CODE:
        (Path(directory) / name).write_text(BOOBY_TRAP.format(marker=str(marker)))


def copy_fixture(name, destination, marker):
    shutil.copytree(FIXTURES / name, destination)
    for path in [destination, *destination.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copy is read-only
    add_booby_traps(destination, marker)
    return destination


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixtures, copied with booby-trapped remote code beside them, then converted."""
    base = tmp_path_factory.mktemp("chatglm2")
    if not (FIXTURES / NAMES[0]).exists():
        pytest.skip("../shared/fixtures/chatglm2 is not here")
    marker = base / "remote-code-ran"
    result = {}
    for name in NAMES:
        src = copy_fixture(name, base / name, marker)
        out = cg.convert(src, base / f"{name}-glm", quiet=True)
        result[name] = (out, json.loads((src / "reference.json").read_text(encoding="utf-8")))
    assert not marker.exists(), "the converter ran a .py file of SRC"
    return result


def load_native(out, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)  # stock classes, no trust_remote_code
    return model.eval(), AutoTokenizer.from_pretrained(out)


# ------------------------------------------------------------------------------------------------ the references
@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_ids_match_the_remote_code(converted, name):
    out, ref = converted[name]
    model, _ = load_native(out)
    assert type(model).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([ref["logits_input_ids"]])).logits[0]
    torch.testing.assert_close(logits, torch.tensor(ref["logits"]), atol=1e-4, rtol=0)
    prompt = torch.tensor([ref["prompt_ids"]])
    greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                            max_new_tokens=len(ref["greedy_ids"]), min_new_tokens=len(ref["greedy_ids"]))
    assert greedy[0, prompt.shape[1]:].tolist() == ref["greedy_ids"]


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_ids_decodes_and_special_tokens(converted, name):
    out, ref = converted[name]
    _, tokenizer = load_native(out)
    assert not any(Path(out).glob("*.py")) and (Path(out) / "tokenizer.json").exists()
    for text, ids, decoded in zip(ref["strings"], ref["ids"], ref["decoded"]):
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == decoded and tokenizer.decode(ids, skip_special_tokens=True) == decoded
    first = ref["ids"][0][0] - 1  # [gMASK] is the second token after the sentencepiece vocabulary
    assert tokenizer.convert_tokens_to_ids(cg.SPECIAL_TOKENS) == list(range(first, first + 5))
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_chat_template_is_build_prompt(converted, name):
    out, ref = converted[name]
    _, tokenizer = load_native(out)
    messages = []
    for question, answer in ref["history"]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": ref["query"]})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "[gMASK]sop" + ref["prompt"]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert list(ids) == ref["prompt_ids"]
    # ChatGLM2 has no system role: the system message goes before the first question, after a blank line.
    with_system = [{"role": "system", "content": "你是助教"}] + messages
    first_round = ref["prompt"].replace(f"问：{ref['history'][0][0]}", f"问：你是助教\n\n{ref['history'][0][0]}", 1)
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == "[gMASK]sop" + first_round
    for bad in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]):
        with pytest.raises(Exception, match="ChatGLM2"):
            tokenizer.apply_chat_template(bad, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------ other checkpoints
TEXT = """清华大学在北京。今天天气很好，我们去公园散步吧！人工智能是计算机科学的一个分支。
The quick brown fox jumps over the lazy dog. Hello, world! It's 2023; prices rose 3.5% in Q2.
  Indented line with  double  spaces and a tab\there.
def f(x):
    return x * 2  # code
机器学习、深度学习和自然语言处理都很重要。ChatGLM2 是一个开源的中英双语对话模型。
Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ and ① ② ③ and ﬁ ligatures. café naïve résumé. 问：你好 答：你好！
"""
STRINGS = ["你好", "Hello, world!", "  two  spaces\nand a newline\t tab", " leading", "trailing ", "   ", "", "\n",
           "\n\nx\n\n", "a  b   c    d", "emoji 🤗🚀 and ü", "ｈｅｌｌｏ　世界", "① ﬁ Å", "x\u200by",
           "soprano people eops",
           "▁already ▁meta", "tab\t\ttabs", "混合 mixed 中文 English 123 4567", "\r\n windows", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀",
           "ありがとう 감사합니다", "[Round 1]\n\n问：x\n\n答：", "a" * 50, "！？。，、", " \n \n "]
SETTINGS = {  # what THUDM's file uses (BPE, identity, byte fallback, dummy prefix, whitespace kept), then others
    "chatglm2-like": dict(model_type="bpe", normalization_rule_name="identity", byte_fallback=True,
                          remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True),
    "nfkc-no-dummy-prefix": dict(model_type="bpe", normalization_rule_name="nmt_nfkc", byte_fallback=True,
                                 add_dummy_prefix=False),
    "nfkc-cf-no-byte-fallback": dict(model_type="bpe", normalization_rule_name="nfkc_cf", byte_fallback=False,
                                     character_coverage=0.98),
    "unigram": dict(model_type="unigram", normalization_rule_name="nmt_nfkc", byte_fallback=True),
}


def train_sentencepiece(directory, settings, vocab_size=400):
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=model,
                                   vocab_size=vocab_size, minloglevel=2, **settings)
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def chatglm2_original_decode(sp, ids):
    """ChatGLM2's tokenizer decodes its specials, <unk>, <s> and </s> as "" and the rest with sentencepiece."""
    hidden = {sp.unk_id(), sp.bos_id(), sp.eos_id()}
    return sp.DecodePieces(["" if i in hidden or i >= sp.get_piece_size() else sp.IdToPiece(i) for i in ids])


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_tokenizer_follows_the_sentencepiece_settings(tmp_path, settings):
    """Against sentencepiece itself (which ChatGLM2's tokenizer calls): hand-picked and random strings."""
    sp = train_sentencepiece(tmp_path, SETTINGS[settings])
    tokenizer = cg.build_tokenizer(tmp_path)
    n = sp.get_piece_size()
    rnd = random.Random(0)
    alphabet = TEXT + "  \n\t🤗ü\u3000"
    texts = STRINGS + ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40))) for _ in range(150)]
    for text in texts:
        want = [n + 1, n + 3] + sp.encode(text)
        assert tokenizer(text)["input_ids"] == want, (text, sp.encode(text, out_type=str))
        assert tokenizer.decode(want) == chatglm2_original_decode(sp, want), text
        assert tokenizer.decode(want, skip_special_tokens=True) == chatglm2_original_decode(sp, want), text


def test_a_special_name_that_is_also_a_piece_keeps_both_ids(tmp_path):
    """If "sop" is itself a sentencepiece piece, the special token is spelled "<sop>" (one string, one id) and
    still gets ChatGLM2's id; the chat template follows."""
    sp = train_sentencepiece(tmp_path, dict(SETTINGS["chatglm2-like"], user_defined_symbols=["sop"]))
    tokenizer = cg.build_tokenizer(tmp_path)
    n = sp.get_piece_size()
    assert tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"]) == [n + 1, n + 3]
    assert tokenizer("soprano sop")["input_ids"] == [n + 1, n + 3] + sp.encode("soprano sop")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        return_dict=False)
    assert list(ids) == [n + 1, n + 3] + sp.encode("[Round 1]\n\n问：你好\n\n答：")


def pack_int4(values):
    """(out, in) integers in [-8, 7] → int8 (out, in/2): element 2j in the high nibble, 2j+1 in the low one."""
    nibbles = (values & 0xF).to(torch.uint8)
    return ((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(torch.int8)


def make_chatglm2(directory, *, heads, groups, head_dim, hidden, ffn, layers=2, bits=0, shards=1,
                  fmt="safetensors", sp_settings="chatglm2-like", seed=0, legacy_last_shard=False):
    """A random ChatGLM2 in THUDM's layout (config.json, weights, tokenizer.model), and the GLM weights it must
    convert into: {native name: tensor}."""
    directory = Path(directory)
    sp = train_sentencepiece(directory, SETTINGS[sp_settings])
    vocab = -(-(sp.get_piece_size() + 5) // 64) * 64
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        values = torch.randn(*shape, generator=generator, dtype=torch.float32)
        return values.to(torch.float16 if bits else torch.float32)

    def linear(out_features, in_features):  # (stored tensors, the dequantised weight the conversion must give)
        if not bits:
            weight = rand(out_features, in_features)
            return {"weight": weight}, weight
        low, high = (-8, 8) if bits == 4 else (-128, 128)
        values = torch.randint(low, high, (out_features, in_features), generator=generator, dtype=torch.int16)
        scale = (torch.rand(out_features, generator=generator) / 4 + 0.01).to(torch.float16)
        stored = pack_int4(values) if bits == 4 else values.to(torch.int8)
        return {"weight": stored, "weight_scale": scale}, values.to(torch.float16) * scale[:, None]

    qkv_out = (heads + 2 * groups) * head_dim
    published, native = {}, {}
    embedding = rand(vocab, hidden)
    published["transformer.embedding.word_embeddings.weight"] = native["model.embed_tokens.weight"] = embedding
    for i in range(layers):
        old, new = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        published[old + "input_layernorm.weight"] = native[new + "input_layernorm.weight"] = rand(hidden)
        norm = rand(hidden)
        published[old + "post_attention_layernorm.weight"] = native[new + "post_attention_layernorm.weight"] = norm
        for old_name, new_name, shape in (("self_attention.query_key_value", None, (qkv_out, hidden)),
                                          ("self_attention.dense", "self_attn.o_proj", (hidden, heads * head_dim)),
                                          ("mlp.dense_h_to_4h", "mlp.gate_up_proj", (2 * ffn, hidden)),
                                          ("mlp.dense_4h_to_h", "mlp.down_proj", (hidden, ffn))):
            stored, weight = linear(*shape)
            published.update({f"{old}{old_name}.{k}": v for k, v in stored.items()})
            if new_name:
                native[f"{new}{new_name}.weight"] = weight
            else:
                qkv_weight = weight
        bias = published[old + "self_attention.query_key_value.bias"] = rand(qkv_out)
        sizes = [heads * head_dim, groups * head_dim, groups * head_dim]  # [q heads | k groups | v groups]
        for part, w, b in zip("qkv", torch.split(qkv_weight, sizes), torch.split(bias, sizes)):
            native[f"{new}self_attn.{part}_proj.weight"], native[f"{new}self_attn.{part}_proj.bias"] = w, b
    published["transformer.encoder.final_layernorm.weight"] = native["model.norm.weight"] = rand(hidden)
    published["transformer.output_layer.weight"] = native["lm_head.weight"] = rand(vocab, hidden)
    published["transformer.rotary_pos_emb.inv_freq"] = torch.rand(head_dim // 4)  # recomputed, not copied
    config = {"model_type": "chatglm", "architectures": ["ChatGLMForConditionalGeneration"],
              "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
              "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "kv_channels": head_dim,
              "multi_query_attention": True, "multi_query_group_num": groups, "ffn_hidden_size": ffn,
              "padded_vocab_size": vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True, "add_bias_linear": False,
              "add_qkv_bias": True, "post_layer_norm": True, "apply_residual_connection_post_layernorm": False,
              "seq_length": 128, "eos_token_id": 2, "pad_token_id": 0, "quantization_bit": bits,
              "torch_dtype": "float16" if bits else "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    names = list(published)
    parts = [names[i::shards] for i in range(shards)]
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, part in enumerate(parts, 1):
        file = f"{stem}.{suffix}" if shards == 1 else f"{stem}-{number:05d}-of-{shards:05d}.{suffix}"
        tensors = {name: published[name].contiguous() for name in part}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(directory / file), metadata={"format": "pt"})
        else:  # legacy_last_shard: torch's pre-1.6 format, which cannot be memory-mapped
            legacy = legacy_last_shard and number == shards
            torch.save(tensors, directory / file, _use_new_zipfile_serialization=not legacy)
        weight_map.update({name: file for name in part})
    if shards > 1:
        (directory / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return native, sp


@pytest.mark.parametrize("shape", [
    dict(heads=3, groups=1, head_dim=8, hidden=20, ffn=36, bits=0, shards=3, fmt="bin", legacy_last_shard=True),
    dict(heads=4, groups=4, head_dim=4, hidden=16, ffn=24, bits=4, shards=2, fmt="safetensors",
         sp_settings="unigram"),
    dict(heads=2, groups=2, head_dim=8, hidden=16, ffn=32, bits=8, shards=1, fmt="bin",
         sp_settings="nfkc-no-dummy-prefix"),
])
def test_other_shapes_groups_shards_and_quantizations(tmp_path, shape):
    """Every native tensor equals what the published one means (q/k/v split by head counts, int4/int8 times
    scale in float16), .py files in SRC are never run, and the model generates with stock classes."""
    marker = tmp_path / "remote-code-ran"
    native, sp = make_chatglm2(tmp_path / "src", **shape)
    add_booby_traps(tmp_path / "src", marker)
    out = cg.convert(tmp_path / "src", tmp_path / "out", quiet=True)
    assert not marker.exists()
    model, tokenizer = load_native(out, dtype=None)
    state = model.state_dict()
    assert sorted(state) == sorted(native)
    for name, tensor in native.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    config = model.config
    assert (config.num_key_value_heads, config.head_dim) == (shape["groups"], shape["head_dim"])
    ids = tokenizer("你好")["input_ids"]
    assert ids == [sp.get_piece_size() + 1, sp.get_piece_size() + 3] + sp.encode("你好")
    model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)  # runs end to end


def test_int4_nibble_order():
    """Element 2j is the high nibble, 2j+1 the low one, both signed; then times the row's float16 scale."""
    packed = torch.tensor([[0x7F, 0x80], [0x18, -1]], dtype=torch.int16).to(torch.int8)
    scale = torch.tensor([1.0, 0.5], dtype=torch.float16)
    expected = torch.tensor([[7, -1, -8, 0], [0.5, -4, -0.5, -0.5]], dtype=torch.float16)
    assert torch.equal(cg.unpack_int4(packed, scale), expected)


# ------------------------------------------------------------------------------------------------ refusals, atomicity
def run_convert(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, str(ROOT / "ChatGLM.py"), "--convert", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=240, env=env)


def one_sentence(result):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    return line


def refusal(src, out):
    with pytest.raises(UserError) as error:
        cg.convert(src, out, quiet=True)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_other_directories_get_one_sentence(tmp_path):
    v1 = tmp_path / "chatglm-6b"
    v1.mkdir()
    (v1 / "config.json").write_text(json.dumps({  # ChatGLM-6B v1's config (its real fields)
        "model_type": "chatglm", "vocab_size": 130528, "hidden_size": 4096, "num_layers": 28,
        "num_attention_heads": 32, "inner_hidden_size": 16384, "position_encoding_2d": True,
        "max_sequence_length": 2048, "gmask_token_id": 130001, "bos_token_id": 130004, "quantization_bit": 4}))
    add_booby_traps(v1, tmp_path / "ran")
    line = one_sentence(run_convert(v1, tmp_path / "out"))  # through ChatGLM.py, in a real process
    assert "ChatGLM-6B" in line and "requirements-chatglm.txt" in line
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert "model_type" in refusal(gpt2, tmp_path / "out")
    assert "config.json" in refusal(tmp_path, tmp_path / "out")  # a random directory
    assert "找不到目录" in refusal(tmp_path / "missing", tmp_path / "out")
    half = tmp_path / "half"
    make_chatglm2(half, heads=2, groups=1, head_dim=4, hidden=8, ffn=8)
    config = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps(dict(config, pre_seq_len=128)))  # a P-Tuning v2 checkpoint
    assert "P-Tuning" in refusal(half, tmp_path / "out")
    (half / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "kv_channels"}))
    assert "kv_channels" in refusal(half, tmp_path / "out")
    (half / "config.json").write_text(json.dumps(dict(config, ffn_hidden_size=12)))  # weights of another shape
    assert "形状" in refusal(half, tmp_path / "out")
    (half / "config.json").write_text(json.dumps(dict(config, _name_or_path="THUDM/chatglm3-6b")))
    assert "ChatGLM3" in refusal(half, tmp_path / "out")
    (half / "config.json").write_text(json.dumps(config))
    (half / "tokenizer.model").write_bytes(b"not a sentencepiece model")  # e.g. GLM-4's tiktoken file
    assert "sentencepiece" in refusal(half, tmp_path / "out")
    (half / "model.safetensors").unlink()  # weights not downloaded
    assert "权重" in refusal(half, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran").exists()


def test_output_appears_only_when_complete(tmp_path, monkeypatch):
    make_chatglm2(tmp_path / "src", heads=2, groups=1, head_dim=4, hidden=8, ffn=8)
    written = []

    def failing_save(tensors, filename, metadata=None):
        written.append(filename)
        raise OSError(28, "No space left on device")  # the disk fills up half way

    monkeypatch.setattr(cg, "save_file", failing_save)
    with pytest.raises(OSError):
        cg.convert(tmp_path / "src", tmp_path / "out", quiet=True)
    assert written and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "the partial directory was left behind"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".out.partial-{int(dead.stdout)}"  # what a conversion killed with -9 leaves
    (abandoned / "part-00000.safetensors").parent.mkdir()
    (abandoned / "part-00000.safetensors").write_bytes(b"half")
    monkeypatch.undo()
    native, _ = make_chatglm2(tmp_path / "src", heads=2, groups=1, head_dim=4, hidden=8, ffn=8)  # the same again
    cg.convert(tmp_path / "src", tmp_path / "out", quiet=True, shard_bytes=256)  # tiny shards: several files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and sorted(index["weight_map"]) == sorted(native)
    assert not abandoned.exists()
    model, _ = load_native(tmp_path / "out", dtype=None)  # transformers follows the index
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in native.items())
    line = one_sentence(run_convert(tmp_path / "src", tmp_path / "out"))  # never overwrites
    assert "已经存在" in line


STREAM_SCRIPT = r"""
import sys, json, torch
sys.path.insert(0, sys.argv[1])
import convert_chatglm2 as cg
from transformers import GlmForCausalLM  # noqa: F401  (imported before the baseline is taken)
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
base = rss("VmRSS:")
cg.convert(sys.argv[2], sys.argv[3], quiet=True, shard_bytes=int(sys.argv[4]))
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_conversion_streams_tensor_by_tensor(tmp_path):
    """A 4-shard .bin checkpoint of ~290 MB: resident memory grows by at most one source shard's pages (memory-mapped,
    released shard by shard), one output shard (twice while safetensors writes it), one tensor and some slack,
    never by the whole checkpoint."""
    make_chatglm2(tmp_path / "src", heads=4, groups=2, head_dim=64, hidden=1024, ffn=2816, layers=8, shards=4,
                  fmt="bin")
    sources = [f.stat().st_size for f in (tmp_path / "src").glob("*.bin")]
    shard, largest_tensor = 16 * 2**20, 2 * 2816 * 1024 * 4
    result = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(ROOT), str(tmp_path / "src"),
                             str(tmp_path / "out"), str(shard)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    grew = memory["peak"] - memory["base"]
    bound = max(sources) + 2 * shard + largest_tensor + 64 * 2**20
    assert sum(sources) > 250 * 2**20 and bound < sum(sources)
    assert grew < bound, f"peak grew by {grew / 2**20:.0f} MB converting {sum(sources) / 2**20:.0f} MB"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 4


# ------------------------------------------------------------------------------------------------ loading, ChatGLM.py
def test_loading_plan_says_the_memory_and_falls_back_to_4bit(tmp_path, monkeypatch):
    make_chatglm2(tmp_path / "src", heads=2, groups=1, head_dim=4, hidden=8, ffn=8)
    out = cg.convert(tmp_path / "src", tmp_path / "out", quiet=True)
    monkeypatch.setattr(cg, "available_memory", lambda device: 64 * 2**30)
    kwargs, note = cg.loading_plan(out, "cpu")
    assert kwargs == {"dtype": torch.bfloat16} and "bfloat16" in note and "GB" in note
    monkeypatch.setattr(cg, "available_memory", lambda device: 2**30)  # less than the weights + headroom
    kwargs, note = cg.loading_plan(out, "cpu")
    assert kwargs["quantization_config"].load_in_4bit and kwargs["quantization_config"].bnb_4bit_quant_type == "nf4"
    assert "NF4" in note
    assert cg.loading_plan(out, "cpu", "fp32")[0] == {"dtype": torch.float32}  # even when memory is short
    # chatglm2-6b's real shapes: ~6.2 B parameters, 12.5 GB in bf16, under 4 GB with NF4 linear layers
    from transformers import GlmConfig
    real = cg.glm_config({"num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
                          "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696,
                          "padded_vocab_size": 65024, "layernorm_epsilon": 1e-5})
    assert isinstance(real, GlmConfig)
    assert 6.2e9 < sum(cg.parameter_counts(real)) < 6.3e9
    assert 3.5 < cg.estimate_bytes(real, torch.bfloat16, four_bit=True) / 2**30 < 4.2


def test_nf4_on_cpu_quantizes_the_decoder_linear_layers(tmp_path):
    """--dtype nf4 (and the automatic choice when memory is short): bitsandbytes 4-bit for q/k/v/o and the MLP,
    the embeddings and the head stay in bf16; the logits still follow the unquantised model's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    make_chatglm2(tmp_path / "src", heads=4, groups=2, head_dim=16, hidden=64, ffn=128, bits=4)  # bnb's CPU blocks: 64
    out = cg.convert(tmp_path / "src", tmp_path / "out", quiet=True)
    kwargs, note = cg.loading_plan(out, "cpu", quant="4bit")
    quantized = AutoModelForCausalLM.from_pretrained(out, **kwargs)
    assert type(quantized.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(quantized.lm_head).__name__ == "Linear" and quantized.lm_head.weight.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 8]])
    with torch.no_grad():
        a, b = quantized(ids).logits.float().flatten(), reference(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.8
    assert quantized.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


@needs_fixtures
def test_ask_converts_once_then_chats(tmp_path):
    """`python ChatGLM.py --model model/chatglm2-tiny-int4 --ask ...`: converts beside it (and says where), answers
    with the reply greedy generation gives for ChatGLM2's prompt, and reuses the conversion the next time."""
    marker = tmp_path / "remote-code-ran"
    copy_fixture(NAMES[1], tmp_path / "model" / NAMES[1], marker)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    command = [sys.executable, str(ROOT / "ChatGLM.py"), "--model", f"model/{NAMES[1]}", "--ask", "你好",
               "--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "fp32"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "model" / f"{NAMES[1]}-glm"
    assert str(Path("model") / out.name) in first.stderr and "GB" in first.stderr
    model, tokenizer = load_native(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    reply = model.generate(**prompt, do_sample=False, max_new_tokens=12)[0, prompt["input_ids"].shape[1]:]
    expected = tokenizer.decode(reply, skip_special_tokens=True)
    assert len(expected) > 5 and expected in first.stdout, (expected, first.stdout)
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert second.returncode == 0 and "使用已转换的" in second.stderr and second.stdout == first.stdout
    assert not marker.exists()


@needs_fixtures
def test_a_converted_directory_given_directly_gets_the_same_loading_plan(converted, capsys):
    """`--model model/chatglm2-6b-int4-glm` chooses its precision like the original directory (bf16 on a CPU,
    with the memory it needs said first), instead of the generic path's float32."""
    import ChatGLM
    out, _ = converted[NAMES[0]]
    model, _, _ = ChatGLM.load_model(str(out), device="cpu")
    assert model.dtype == torch.bfloat16 and "GB" in capsys.readouterr().err
