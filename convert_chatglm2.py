"""ChatGLM2-6B(-int4) → a transformers-native `glm` directory (Task 0's default model without remote code).

THUDM published ChatGLM2 with its own modeling code, which only runs on transformers>=4.30,<4.42. Yet
transformers' own `GlmForCausalLM` (model_type "glm") computes exactly ChatGLM2's forward pass: partial rotary
embedding on half of each head (interleaved pairs), q/k/v biases, grouped-query attention with
`multi_query_group_num` key/value heads, SwiGLU with a merged gate/up projection (gate first), RMSNorm and an
untied head. So converting is renaming and splitting tensors:

    query_key_value → q_proj, k_proj, v_proj (split by head counts)     dense → o_proj
    dense_h_to_4h   → gate_up_proj                                       dense_4h_to_h → down_proj

The int4 checkpoint stores each of these four linear layers as int8 bytes holding two signed 4-bit values
(element 2j in the high nibble, 2j+1 in the low one) and one float16 scale per output row; we dequantise to
float16, as THUDM's CUDA kernels do. The tokenizer becomes a fast `tokenizer.json` built from the
sentencepiece model by transformers' own converter, with ChatGLM2's `[gMASK] sop` prefix and a chat template.

    python ChatGLM.py --convert model/chatglm2-6b-int4 model/chatglm2-6b-int4-glm
    python convert_chatglm2.py model/chatglm2-6b-int4 model/chatglm2-6b-int4-glm     # the same

Nothing in SRC is imported or run: only config.json, the weights and tokenizer.model are read.
"""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from course_utils import ArgumentParser, UserError, parse_args, run_main, torch_dtype

# ChatGLM2's tokenizer appends these five tokens after the sentencepiece vocabulary, in this order.
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
SHARD_BYTES = 1 << 30  # 1 GiB output shards: with save_file's own copy, peak memory stays near 2 GiB + a tensor
QUANTIZED = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # the linear layers int4 packs
FORMAT_NOTE = "chatglm2_conversion.json"  # written last inside OUT: where it came from

# ChatGLM2's prompt (tokenizer.build_prompt), as a chat template. ChatGLM2 has no system role: a system
# message is put before the first question, separated by a blank line (as ChatGLM.py always did for it).
# PREFIX becomes ChatGLM2's "[gMASK]sop" (get_prefix_tokens), which it puts before every input.
CHAT_TEMPLATE = (
    "{{- 'PREFIX' -}}"
    "{%- set ns = namespace(system='', round=0, asked=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.round > 0 -%}"
    "{{ raise_exception('ChatGLM2 has no system role: a system message can only come first') }}{%- endif -%}"
    "{%- set ns.system = ns.system ~ message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.asked -%}"
    "{{ raise_exception('ChatGLM2 conversations must alternate user and assistant messages') }}{%- endif -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{%- set question = (ns.system ~ '\\n\\n' ~ message['content']) if ns.round == 1 and ns.system "
    "else message['content'] -%}"
    "{{- '[Round ' ~ ns.round ~ ']\\n\\n问：' ~ question -}}"
    "{%- set ns.asked = true -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if not ns.asked -%}"
    "{{ raise_exception('ChatGLM2 conversations must alternate user and assistant messages') }}{%- endif -%}"
    "{{- '\\n\\n答：' ~ message['content'] ~ '\\n\\n' -}}"
    "{%- set ns.asked = false -%}"
    "{%- else -%}{{ raise_exception('ChatGLM2 knows the roles system, user and assistant, not ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.asked -%}{{- '\\n\\n答：' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------------------------
# 1. What SRC is
# ---------------------------------------------------------------------------------------------------------------
def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"无法读取 {path}（{error}）：它应是 ChatGLM2 发布目录里的 JSON 文件") from None


def is_chatglm_v1(config):
    """ChatGLM-6B (v1) has 2D positions, a plain LayerNorm MLP and a 130k vocabulary; ChatGLM2/3 have none of that."""
    return config.get("model_type") == "chatglm" and (
        "position_encoding_2d" in config or "inner_hidden_size" in config or "gmask_token_id" in config)


def check_chatglm2(config, src):
    """Raises a one-sentence UserError unless config.json describes a ChatGLM2/ChatGLM3-architecture model."""
    model_type = config.get("model_type")
    if model_type == "glm":
        raise UserError(f"{src} 已经是 transformers 原生的 glm 目录，不需要转换：直接 --model {src}")
    if model_type != "chatglm":
        raise UserError(f"{src} 不是 ChatGLM2 目录（config.json 的 model_type 是 {model_type!r}，应为 'chatglm'）")
    if is_chatglm_v1(config):
        raise UserError(f"{src} 是 ChatGLM-6B 第一代（二维位置编码，结构不同），不能转换："
                        "它只能用 THUDM 的 remote code，"
                        "请在单独的环境里 pip install -r requirements-chatglm.txt 后运行")
    required = ["num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                "padded_vocab_size", "layernorm_epsilon"]
    missing = [key for key in required
               if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool)]
    if missing:
        raise UserError(f"{src}/config.json 缺少 ChatGLM2 的字段 {', '.join(missing)}：请放入完整的 "
                        "THUDM/chatglm2-6b(-int4) 文件")
    chatglm2_settings = {"rmsnorm": True, "add_bias_linear": False, "post_layer_norm": True,
                         "apply_residual_connection_post_layernorm": False}
    for key, wanted in chatglm2_settings.items():
        if config.get(key, wanted) != wanted:
            raise UserError(f"{src} 的 {key}={config[key]}，与 ChatGLM2 的结构不同，transformers 的 glm 模型无法表示")
    if config.get("pre_seq_len"):
        raise UserError(f"{src} 是 P-Tuning v2 的前缀模型（pre_seq_len={config['pre_seq_len']}），不能转换：请用原始 "
                        "ChatGLM2 权重")
    if config.get("quantization_bit", 0) not in (0, 4, 8):
        raise UserError(f"{src} 的 quantization_bit={config['quantization_bit']}：只认识 0、4 和 8")


def glm_dtype(config):
    """The dtype the native weights are stored in: the source's, and float16 for dequantised int4/int8."""
    dtype = "float16" if config.get("quantization_bit") else config.get("torch_dtype", "float16")
    return dtype if dtype in ("float16", "bfloat16", "float32") else "float16"


def glm_config(config):
    """transformers' GlmConfig with ChatGLM2's shapes and settings."""
    from transformers import GlmConfig
    heads = config["num_attention_heads"]
    groups = config.get("multi_query_group_num", heads) if config.get("multi_query_attention") else heads
    eos = config.get("eos_token_id", 2)
    dtype = glm_dtype(config)
    return GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=config["kv_channels"],
        hidden_act="silu", max_position_embeddings=config.get("seq_length", 8192),
        rms_norm_eps=config["layernorm_epsilon"], attention_bias=bool(config.get("add_qkv_bias", True)),
        tie_word_embeddings=False, pad_token_id=config.get("pad_token_id", 0), eos_token_id=eos, bos_token_id=None,
        # ChatGLM2 rotates the first half of each head; ChatGLM2-32k / ChatGLM3 scale the base by rope_ratio
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config.get("rope_ratio", 1),
                         "partial_rotary_factor": 0.5},
        dtype=dtype, architectures=["GlmForCausalLM"])


# ---------------------------------------------------------------------------------------------------------------
# 2. Reading the published weights one tensor at a time
# ---------------------------------------------------------------------------------------------------------------
class Checkpoint:
    """The tensors of SRC by name, read lazily: safetensors through safe_open, .bin shards memory-mapped."""

    def __init__(self, src):
        self.src, self.where, self._open = Path(src), {}, {}
        for shard in self.shard_files():
            for name in self._handle(shard).keys():
                self.where[name] = shard

    def shard_files(self):
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (self.src / index_name).exists():
                weight_map = read_json(self.src / index_name).get("weight_map", {})
                shards = sorted(set(weight_map.values()))
                absent = [s for s in shards if not (self.src / s).exists()]
                if absent:
                    raise UserError(f"{self.src} 缺少权重分片 {', '.join(absent)}（{index_name} 里列出了它们）："
                                    "请下载完整")
                return [self.src / s for s in shards]
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.src / single).exists():
                return [self.src / single]
        raise UserError(f"{self.src} 里没有权重文件（model.safetensors、pytorch_model.bin 或带 index.json 的分片）："
                        "请下载完整")

    def _handle(self, shard):
        if shard not in self._open:
            try:
                if shard.suffix == ".safetensors":
                    self._open[shard] = safe_open(str(shard), framework="pt")
                else:  # mmap: only the tensors we touch are read; weights_only: no pickled code runs
                    self._open[shard] = load_bin(shard)
            except Exception as error:
                raise UserError(f"无法读取权重文件 {shard}（{str(error).splitlines()[0][:200]}）：文件可能不完整，"
                                "请重新下载") from None
        return self._open[shard]

    def get(self, name):
        handle = self._handle(self.where[name])
        return handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]

    def close_shard(self, shard):
        """Drops a shard's memory map once its tensors are written, so resident memory does not add up."""
        self._open.pop(shard, None)


def load_bin(shard):
    """A pytorch_model*.bin shard, memory-mapped; one in torch's pre-1.6 format cannot be, so it is read whole."""
    try:
        return torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "_use_new_zipfile_serialization" not in str(error):
            raise
        return torch.load(shard, map_location="cpu", weights_only=True)


def unpack_int4(packed, scale):
    """int8 bytes (out, in/2) of two signed 4-bit values each (element 2j high nibble, 2j+1 low) → float16 (out, in).

    Each value is multiplied by its row's float16 scale and rounded to float16, as THUDM's CUDA kernel does."""
    wide = packed.to(torch.int16)
    high = wide >> 4  # arithmetic shift keeps the sign of the high nibble
    low = ((wide & 0xF) ^ 8) - 8  # the low nibble, sign-extended from 4 bits
    values = torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)
    return values.to(torch.float16) * scale.to(torch.float16)[:, None]


def dequantize(weight, scale, bits):
    if bits == 4:
        return unpack_int4(weight, scale)
    return weight.to(torch.float16) * scale.to(torch.float16)[:, None]  # int8: one value per byte


LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def converted_tensors(checkpoint, config):
    """Yields (native name, tensor) for every tensor of the native model, reading SRC one tensor at a time."""
    bits = config.get("quantization_bit", 0)
    heads, head_dim = config["num_attention_heads"], config["kv_channels"]
    groups = config.get("multi_query_group_num", heads) if config.get("multi_query_attention") else heads
    qkv_sizes = [heads * head_dim, groups * head_dim, groups * head_dim]
    last_shard = None
    for name in checkpoint.where:  # shard by shard, in the order the shards were listed
        if last_shard is not None and checkpoint.where[name] != last_shard:
            checkpoint.close_shard(last_shard)  # its tensors are converted: unmap it, so resident memory stays low
        last_shard = checkpoint.where[name]
        if name.endswith(".weight_scale") or name.endswith("rotary_pos_emb.inv_freq"):
            continue  # scales go with their weight; the rotary frequencies are recomputed from the config
        tensor = checkpoint.get(name)
        if bits and tensor.dtype == torch.int8 and name.rsplit(".", 2)[-2] in QUANTIZED:
            scale_name = name + "_scale"
            if scale_name not in checkpoint.where:
                raise UserError(f"{checkpoint.src} 的 config.json 说 quantization_bit={bits}，但 {name} 没有 "
                                "weight_scale")
            tensor = dequantize(tensor, checkpoint.get(scale_name), bits)
        if name in TOP_LEVEL:
            yield TOP_LEVEL[name], tensor
            continue
        match = LAYER.fullmatch(name)
        if match is None or (match.group(2) not in RENAMES and "query_key_value" not in match.group(2)):
            raise UserError(f"{checkpoint.src} 里有 ChatGLM2 没有的张量 {name}：这不是 ChatGLM2 的权重")
        prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
        if "query_key_value" in rest:  # [q heads | k groups | v groups] along the output dimension
            kind = rest.rsplit(".", 1)[-1]  # weight or bias
            if tensor.shape[0] != sum(qkv_sizes):
                raise UserError(f"{name} 有 {tensor.shape[0]} 行，但 config.json 的头数算出 {sum(qkv_sizes)}："
                                "权重与配置不符")
            for part, piece in zip("qkv", torch.split(tensor, qkv_sizes, dim=0)):
                yield f"{prefix}self_attn.{part}_proj.{kind}", piece
        else:
            yield prefix + RENAMES[rest], tensor


# ---------------------------------------------------------------------------------------------------------------
# 3. Writing the native directory atomically
# ---------------------------------------------------------------------------------------------------------------
def write_weights(checkpoint, config, work, expected, shard_bytes=SHARD_BYTES):
    """Streams converted tensors into safetensors shards of about shard_bytes; returns {name: file}."""
    shards, buffer, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal buffer, size
        if buffer:
            file = f"part-{len(shards):05d}.safetensors"
            save_file(buffer, str(work / file), metadata={"format": "pt"})
            shards.append((file, list(buffer)))
            buffer, size = {}, 0

    bar = tqdm(total=len(expected), desc="转换 ChatGLM2 权重", unit="tensor")
    for name, tensor in converted_tensors(checkpoint, config):
        if tuple(tensor.shape) != expected.get(name, tuple(tensor.shape)):
            raise UserError(f"{checkpoint.src} 的张量 {name} 形状是 {tuple(tensor.shape)}，config.json 算出 "
                            f"{expected[name]}：权重与配置不符")
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        buffer[name] = tensor.clone()  # our own contiguous copy: q/k/v are views, and the source map can go
        size += nbytes
        bar.update()
    flush()
    bar.close()
    # Standard names now that the count is known: model-00001-of-00003.safetensors, ...
    total = len(shards)
    for number, (file, names) in enumerate(shards, 1):
        final = "model.safetensors" if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
        os.replace(work / file, work / final)
        weight_map.update({name: final for name in names})
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        raise UserError(f"{checkpoint.src} 缺少张量 {missing[0]} 等 {len(missing)} 个：权重不完整，请重新下载")
    if total > 1:
        total_size = sum((work / f).stat().st_size for f in set(weight_map.values()))
        (work / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return weight_map


def expected_shapes(glm):
    """{name: shape} of GlmForCausalLM's state dict for this config (built on the meta device: no memory)."""
    from transformers import GlmForCausalLM
    with torch.device("meta"):
        model = GlmForCausalLM(glm)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def convert(src, out, quiet=False, shard_bytes=SHARD_BYTES):
    """Converts SRC (THUDM's layout) into OUT (native glm). OUT appears only when complete. Returns OUT."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if not src.is_dir():
        raise UserError(f"找不到目录 {src}：请先下载 THUDM/chatglm2-6b-int4（或 chatglm2-6b）到这里")
    if not (src / "config.json").exists():
        raise UserError(f"{src} 里没有 config.json：这不是 ChatGLM2 的发布目录")
    config = read_json(src / "config.json")
    check_chatglm2(config, src)
    names = [config.get("_name_or_path", "")]
    if (src / "tokenizer_config.json").exists():
        names.append(read_json(src / "tokenizer_config.json").get("name_or_path", ""))
    if any("chatglm3" in str(name).lower() for name in names):  # same weights layout, another prompt format
        raise UserError(f"{src} 是 ChatGLM3：它的对话格式（<|user|> 等特殊 token）和 ChatGLM2 不同，这个转换器只支持 "
                        "ChatGLM2")
    if out.exists():
        raise UserError(f"{out} 已经存在：换一个输出目录，或先删掉它")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(f"输出目录 {out} 不能在源目录 {src} 里面")
    started = time.time()
    glm = glm_config(config)
    expected = expected_shapes(glm)
    checkpoint = Checkpoint(src)
    tokenizer = build_tokenizer(src, config)  # first: a bad tokenizer.model fails before gigabytes are written
    need = estimate_bytes(glm, torch.float16 if config.get("quantization_bit") else getattr(torch, glm_dtype(config)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"无法创建 {out.parent}（{error.strerror}）：换一个输出目录") from None
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.05:
        raise UserError(f"{out.parent} 只剩 {free / 2**30:.1f} GB 磁盘空间，转换结果约 {need / 2**30:.1f} GB："
                        "请先腾出空间")
    remove_abandoned_work(out, say)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"  # a hidden sibling: same file system, so rename is atomic
    try:
        work.mkdir()
    except OSError as error:
        raise UserError(f"无法在 {out.parent} 里写入（{error.strerror}）：用 python ChatGLM.py --convert SRC OUT "
                        f"把结果写到一个可写的目录，再 --model OUT") from None
    try:
        say(f"把 {src} 转成 transformers 原生格式，写到 {out}（约 {need / 2**30:.1f} GB）…")
        write_weights(checkpoint, config, work, expected, shard_bytes)
        glm.save_pretrained(work)
        generation_config(config).save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / FORMAT_NOTE).write_text(json.dumps({
            "converted_from": str(src.resolve()), "by": "convert_chatglm2.py",
            "quantization_bit": config.get("quantization_bit", 0), "seconds": round(time.time() - started, 1)},
            ensure_ascii=False, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        for file in work.iterdir():  # safetensors writes its files owner-only: make them like any other file
            file.chmod(0o666 & ~umask)
        os.replace(work, out)  # the only moment OUT appears, and it is complete
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    say(f"转换完成（{time.time() - started:.0f} 秒）：{out}")
    return out


def remove_abandoned_work(out, say):
    """A conversion killed outright (kill -9, a closed Colab tab) leaves its hidden partial directory: remove
    those whose process is gone, so that gigabytes of half-written shards do not pile up."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(partial.name.rsplit("-", 1)[1]), 0)
            continue  # that conversion is still running
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError, OSError):
            continue
        say(f"删除上次中断的转换留下的 {partial}")
        shutil.rmtree(partial, ignore_errors=True)


def generation_config(config):
    from transformers import GenerationConfig
    return GenerationConfig(eos_token_id=config.get("eos_token_id", 2), pad_token_id=config.get("pad_token_id", 0))


# ---------------------------------------------------------------------------------------------------------------
# 4. The tokenizer: sentencepiece → tokenizer.json, following the settings stored in tokenizer.model
# ---------------------------------------------------------------------------------------------------------------
def read_sentencepiece(path):
    from transformers.convert_slow_tokenizer import import_protobuf
    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except OSError:
        raise UserError(f"{path.parent} 里没有 tokenizer.model：请放入完整的 ChatGLM2 文件") from None
    except Exception:
        proto.Clear()
    if not proto.pieces:
        raise UserError(f"{path} 不是 sentencepiece 模型（GLM-4 之类的 tiktoken 词表不属于 ChatGLM2）")
    return proto


def sentencepiece_decoder(proto, invisible):
    """Decodes as ChatGLM2 does: its special, control and <unk> tokens become nothing (its convert_id_to_token
    returns ""), the rest as SentencePiece decodes: at the start of the text it drops the dummy prefix's space,
    or every leading space when the model removes extra whitespace."""
    from tokenizers import Regex, decoders
    spec = proto.normalizer_spec
    steps = [decoders.Replace(Regex("^(?:" + "|".join(re.escape(t) for t in invisible) + ")$"), ""),
             decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())  # one string, so that Strip only touches the start of the text
    if spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(content=" ", left=1 << 30))
    elif spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    return decoders.Sequence(steps)


def build_tokenizer(src, config=None):
    """A PreTrainedTokenizerFast that encodes and decodes as ChatGLM2's tokenizer, with its chat template."""
    from tokenizers import processors
    from transformers import AddedToken, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_sentencepiece(Path(src) / "tokenizer.model")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    elif proto.trainer_spec.model_type == 1:  # Unigram
        vocab = pieces
    else:
        raise UserError(f"{src}/tokenizer.model 是 sentencepiece 的 {proto.trainer_spec.model_type} 型模型，ChatGLM2 "
                        "用的是 BPE")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)

    # sentencepiece's <unk>, <s>, </s> keep their ids; ChatGLM2's five special tokens follow its vocabulary: ids
    # n, n+1, ... (n = number of pieces). Written literally in a text, all of them are read as that token (as
    # in every 🤗 tokenizer; the chat template needs it for "[gMASK]sop"); "sop"/"eop" only as whole words.
    controls = [p.piece for p in proto.pieces if p.type in (2, 3)]
    backend.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in controls])
    known = {piece for piece, _ in pieces}
    names = [name if name not in known else f"<{name}>" for name in SPECIAL_TOKENS]  # never two ids for one string
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False, single_word=name.isalpha())
                                for name in names])
    first = len(pieces)
    if [backend.token_to_id(name) for name in names] != list(range(first, first + len(names))):
        raise UserError(f"{src}/tokenizer.model：无法让 {', '.join(names)} 保持 ChatGLM2 的编号 {first}…{first + 4}")
    gmask, sop = names[1], names[3]
    eos_id = proto.trainer_spec.eos_id if proto.trainer_spec.eos_id >= 0 else 2
    eos_piece = proto.pieces[eos_id].piece
    backend.post_processor = processors.TemplateProcessing(
        single=f"{gmask} {sop} $A", pair=f"{gmask} {sop} $A $B {eos_piece}",
        special_tokens=[(gmask, first + 1), (sop, first + 3), (eos_piece, eos_id)])
    backend.decoder = sentencepiece_decoder(proto, invisible=names + controls)

    unk_id = proto.trainer_spec.unk_id
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_piece, unk_token=proto.pieces[unk_id].piece,
        pad_token=proto.pieces[unk_id].piece,  # ChatGLM2 pads with <unk> (id 0), on the left
        padding_side="left", clean_up_tokenization_spaces=False,
        model_max_length=(config or {}).get("seq_length", 8192),
        chat_template=CHAT_TEMPLATE.replace("PREFIX", gmask + sop))
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# 5. Loading the native directory: how much memory, fp16/bf16 or 4-bit
# ---------------------------------------------------------------------------------------------------------------
def parameter_counts(glm):
    """(parameters in the decoder's linear layers, all other parameters) for a GlmConfig."""
    h, heads, groups, d = glm.hidden_size, glm.num_attention_heads, glm.num_key_value_heads, glm.head_dim
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * glm.intermediate_size
    linear = glm.num_hidden_layers * per_layer
    other = 2 * glm.vocab_size * h + glm.num_hidden_layers * (2 * h + (heads + 2 * groups) * d) + h
    return linear, other


def estimate_bytes(glm, dtype=None, four_bit=False):
    """Bytes of the weights in memory: `dtype` everywhere, or NF4 linear layers + dtype elsewhere (NF4: 4 bits per
    weight plus one float32 absmax per block of 64, bitsandbytes' default)."""
    dtype = dtype or torch.bfloat16
    size = torch.tensor([], dtype=dtype).element_size()
    linear, other = parameter_counts(glm)
    return int(linear * (0.5 + 4 / 64) + other * size) if four_bit else (linear + other) * size


def available_memory(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def nf4_kwargs(device, compute_dtype):
    """from_pretrained arguments for 4-bit NF4 through bitsandbytes (CUDA, or CPU since bitsandbytes 0.45)."""
    from transformers import BitsAndBytesConfig
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=compute_dtype),
            "device_map": {"": 0} if device == "cuda" else {"": "cpu"}}


def loading_plan(glm_dir, device, dtype_name="auto", quant="auto"):
    """Chooses how to load a converted ChatGLM2 and says how much memory that needs.

    dtype auto: float16 on a GPU, bfloat16 on a CPU; fp32 / fp16 / bf16: exactly that. quant 4bit: 4-bit NF4;
    auto: NF4 when the free memory does not hold the half-precision weights.
    Returns (from_pretrained kwargs, one line for the user)."""
    from transformers import AutoConfig
    glm = AutoConfig.from_pretrained(glm_dir)
    half = torch.float16 if device == "cuda" else torch.bfloat16
    headroom = 1.5 * 2**30  # activations, the KV cache and the framework itself
    free = available_memory(device)
    dtype = half if dtype_name == "auto" else torch_dtype(dtype_name)
    too_big = estimate_bytes(glm, dtype) + headroom >= free
    where = "显存" if device == "cuda" else "内存"
    if quant == "4bit" or (quant == "auto" and dtype_name == "auto" and too_big):
        need = estimate_bytes(glm, half, four_bit=True)
        kwargs = {"dtype": half, **nf4_kwargs(device, half)}
        how = "4-bit NF4（bitsandbytes）"
    else:
        need = estimate_bytes(glm, dtype)
        kwargs = {"dtype": dtype}
        how = str(dtype).split(".")[-1]
    note = (f"以 {how} 加载 {glm_dir}，权重约需 {need / 2**30:.1f} GB {where}"
            f"（另加约 1.5 GB 运行开销；当前可用 {free / 2**30:.1f} GB）")
    return kwargs, note


def native_dir_for(course_dir):
    """Where the converted copy lives: beside the course's model/<name> directory, named <name>-glm."""
    base = Path(course_dir)
    return base.with_name(base.name + "-glm")


def main(argv=None):
    p = ArgumentParser(description="把 THUDM 发布的 ChatGLM2 目录转成 transformers 原生的 glm 目录")
    p.add_argument("src", metavar="SRC", help="THUDM 发布的 ChatGLM2 目录")
    p.add_argument("out", metavar="OUT", help="新目录（不能已经存在）")
    args = parse_args(p, argv)
    convert(args.src, args.out)


if __name__ == "__main__":
    run_main(main)
