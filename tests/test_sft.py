"""Task 8: Supervised_Fine-Tuning.py and ChatGPT2-base.py, offline, with a tiny GPT-2 and a tiny tokenizer.

The tokenizer is a byte-level BPE trained here on the team's ShareGPT sample (data/samples/sharegpt_sample.json);
the model is a random 2-layer GPT-2. Both are saved with save_pretrained so the scripts' real loading code runs.
"""
import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from course_utils import UserError, load_script, parse_args

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "sharegpt_sample.json"
EOS = "<|endoftext|>"

sft = load_script(ROOT / "Supervised_Fine-Tuning.py")


def have_ours():
    try:
        from gpt2.modeling_gpt2 import GPT2LMHeadModel  # noqa: F401
        return True
    except Exception:
        return False


IMPLS = ["transformers",
         pytest.param("ours", marks=pytest.mark.skipif(not have_ours(), reason="gpt2/modeling_gpt2.py missing"))]


def gpt2_class(impl):
    if impl == "ours":
        from gpt2.modeling_gpt2 import GPT2LMHeadModel
    else:
        from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer and a random 2-layer GPT-2, saved like model/gpt2-base."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    texts = [json.dumps(r, ensure_ascii=False) for r in json.loads(SAMPLE.read_text(encoding="utf-8"))]
    texts += ["Human: hi\nchatgpt2-base: hello there\nSystem: ping pong again"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    out = tmp_path_factory.mktemp("gpt2-tiny")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tiny_dir)
    t.chat_template = sft.ChatFormat().jinja()
    return t


def train_argv(tiny_dir, tmp, *extra):
    return ["--model", str(tiny_dir), "--data", str(SAMPLE), "--out", str(tmp / "adapter"),
            "--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1", "--eval-size", "4",
            "--lr", "1e-2", "--max-length", "64", "--dtype", "fp32", *extra]


def impl_argv():
    """Our GPT-2 (the default, --model-impl repo) when gpt2/modeling_gpt2.py is there, else transformers'."""
    return [] if have_ours() else ["--model-impl", "transformers"]


def add_callback_to_trainer(monkeypatch, callback):
    """Wrap the script's Trainer builder from outside: the Trainer it builds gets one more callback."""
    build_trainer = sft.build_trainer

    def build_with_callback(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        trainer.add_callback(callback)
        return trainer
    monkeypatch.setattr(sft, "build_trainer", build_with_callback)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One real training run (our GPT-2 when present), with --merge."""
    tmp = tmp_path_factory.mktemp("sft-run")
    rc = sft.main(train_argv(tiny_dir, tmp, "--max-steps", "12", "--save-steps", "6", "--merge", *impl_argv()))
    assert rc == 0
    return tmp / "adapter"


# ------------------------------------------------------------------------------------------ data handling

EXPECTED_SKIPS = {"not an object": 2, "no turns": 2, "bad turn": 1, "non-string text": 2, "empty text": 1,
                  "unknown role": 1, "no assistant reply": 2}


def test_skip_counts_by_reason_json_and_jsonl(tmp_path):
    conversations, skipped = sft.load_conversations(SAMPLE)
    assert len(conversations) == 25
    assert skipped == Counter(EXPECTED_SKIPS)
    # The same records as JSONL, plus a line that is not JSON at all.
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    jsonl = tmp_path / "sample.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n{oops\n", encoding="utf-8")
    conversations2, skipped2 = sft.load_conversations(jsonl)
    assert conversations2 == conversations
    assert skipped2 == Counter({**EXPECTED_SKIPS, "not JSON": 1})


def test_roles_layouts_and_dropped_turns():
    norm = lambda r: sft.normalize_record(r)[0]
    assert norm({"conversations": [{"from": "user", "value": " a "}, {"from": "bing", "value": "b"}]}) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert norm({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi!"},
                              {"role": "user", "content": "q"}, {"role": "chatgpt", "content": "r"},
                              {"role": "user", "content": "unanswered"}]}) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert sft.normalize_record({"items": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}) == (
        None, "no assistant reply")


def test_exact_label_mask_hand_checked(tok):
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say <|endoftext|> please"},
            {"role": "assistant", "content": "<|endoftext|> ok"}]
    (blocks,) = sft.encode_conversations([conv], tok, sft.ChatFormat())
    (ids, labels), = sft.window_conversation(blocks, 1024)[0]
    eos = tok.eos_token_id
    piece = lambda s: tok(s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    # Hand-built: every piece of the format, and which of them are learned.
    expected = [(piece("Human:"), 0), (piece(" Hi there"), 0), (piece("\n"), 0),
                (piece("chatgpt2-base:"), 0), (piece(" Hello!"), 1), ([eos], 1),
                (piece("Human:"), 0), (piece(" Say <|endoftext|> please"), 0), (piece("\n"), 0),
                (piece("chatgpt2-base:"), 0), (piece(" <|endoftext|> ok"), 1), ([eos], 1)]
    assert ids == [t for p, _ in expected for t in p]
    assert labels == [t if learned else -100 for p, learned in expected for t in p]
    # The typed "<|endoftext|>" is plain text: the EOS id appears exactly at the two ends of replies, and is learned.
    assert [i for i, t in enumerate(ids) if t == eos] == [i for i, t in enumerate(labels) if t == eos]
    assert ids.count(eos) == 2 and labels[-1] == eos
    learned_text = tok.decode([t for t in labels if t != -100])
    assert learned_text == " Hello!<|endoftext|> <|endoftext|> ok<|endoftext|>"
    assert tok.decode(ids) == ("Human: Hi there\nchatgpt2-base: Hello!<|endoftext|>"
                               "Human: Say <|endoftext|> please\nchatgpt2-base: <|endoftext|> ok<|endoftext|>")


def test_chat_template_renders_exactly_the_trained_tokens(tok):
    conversations, _ = sft.load_conversations(SAMPLE)
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x  \n y"},
                          {"role": "assistant", "content": "  z's 12,5!\n\n"}])
    encoded = sft.encode_conversations(conversations, tok, sft.ChatFormat())
    for conv, blocks in zip(conversations, encoded):
        ours = [t for b in blocks for t in b.ids]
        sanitized = tok.apply_chat_template(conv, tokenize=True, return_dict=False, sanitize_control_tokens=True)
        if not any(EOS in m["content"] for m in conv):
            assert tok.apply_chat_template(conv, tokenize=True, return_dict=False) == ours
            assert sanitized == ours
        else:  # a typed "<|endoftext|>" stays text (tokens may split differently around it): EOS ends replies only
            assert sanitized.count(tok.eos_token_id) == ours.count(tok.eos_token_id) == 1
        # add_generation_prompt ends exactly where the first learned token begins.
        first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt = tok.apply_chat_template(conv[:first], add_generation_prompt=True, tokenize=True, return_dict=False,
                                         sanitize_control_tokens=True)
        prefix = [t for b in blocks[:first] for t in b.ids] + blocks[first].prefix
        if not any(EOS in m["content"] for m in conv):
            assert prompt == prefix


def test_windowing_keeps_context_and_learns_each_reply_once(tok):
    replies = [f"Answer number {i} is a fairly long sentence about topic {i}." for i in range(6)]
    conv = []
    for i, r in enumerate(replies):
        conv += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": r}]
    (blocks,) = sft.encode_conversations([conv], tok, sft.ChatFormat())
    total = sum(len(b) for b in blocks)
    max_length = 64
    assert total > 2 * max_length
    windows, cut = sft.window_conversation(blocks, max_length)
    assert cut == 0 and len(windows) >= 3
    starts = {tuple(b.ids[:len(b.prefix)]) for b in blocks}
    learned = []
    for n, (ids, labels) in enumerate(windows):
        assert len(ids) == len(labels) <= max_length
        assert any(t != -100 for t in labels)
        assert labels[-1] == tok.eos_token_id  # every window ends with a complete reply
        assert any(ids[:len(s)] == list(s) for s in starts)  # starts at a turn boundary
        text = tok.decode(ids)
        if n > 0:  # preceding conversation kept as (unlearned) context
            assert labels[0] == -100 and text.startswith("Human: Question")
        learned.append(tok.decode([t for t in labels if t != -100]))
    assert "".join(learned) == "".join(f" {r}{EOS}" for r in replies)

    # A single reply longer than the window is cut (without EOS: it did not end there).
    long_reply = " ".join(["word"] * 200)
    (blocks,) = sft.encode_conversations([[{"role": "user", "content": "Talk."},
                                           {"role": "assistant", "content": long_reply}]], tok, sft.ChatFormat())
    (ids, labels), = sft.window_conversation(blocks, max_length)[0]
    assert sft.window_conversation(blocks, max_length)[1] == 1
    assert len(ids) == max_length and tok.eos_token_id not in labels
    assert tok.decode(ids).startswith("Human: Talk.\nchatgpt2-base: word word")


def test_no_gpu_falls_back_and_says_so(capsys, monkeypatch):
    assert sft.pick_quant("4bit", cuda=False) is None
    assert sft.pick_quant("auto", cuda=False) is None
    with pytest.raises(UserError, match=r"--dtype fp16 needs a GPU; on a CPU use --dtype bf16 or fp32\."):
        sft.training_dtype("fp16", "cpu")
    monkeypatch.setattr(sft, "cpu_supports_bf16", lambda: False)  # bf16 would be emulated, slower than fp32
    assert sft.training_dtype("bf16", "cpu") == "fp32"
    assert sft.training_dtype("auto", "cpu") == "fp32"
    out = capsys.readouterr().out
    assert "no CUDA GPU: 4bit quantization is for GPUs here, training without quantization." in out
    assert "this device has no bf16 support: training in fp32." in out


def test_old_option_names_are_hidden_aliases(capsys):
    new = parse_args(sft.build_parser(), ["--out", "x", "--dtype", "bf16", "--model-impl", "transformers"])
    old = parse_args(sft.build_parser(), ["--output", "x", "--precision", "bf16", "--reference"])
    assert vars(new) == vars(old)
    assert parse_args(sft.build_parser(), []).model_impl == "repo"
    chat_new = parse_args(chat.build_parser(), ["--model", "m", "--model-impl", "transformers"])
    assert vars(chat_new) == vars(parse_args(chat.build_parser(), ["--base", "m", "--reference"]))
    for module in (sft, chat):
        with pytest.raises(SystemExit):
            module.build_parser().parse_args(["--help"])
        help_text = capsys.readouterr().out
        assert "--model-impl" in help_text
        assert not re.search(r"--(output|precision|reference|base)\b", help_text)
    with pytest.raises(UserError, match=r"unrecognized arguments: --outptu"):
        parse_args(sft.build_parser(), ["--outptu", "x"])
    # A notebook kernel's own arguments are dropped.
    assert parse_args(sft.build_parser(), ["-f", "/root/kernel-1.json"]).out == sft.DEFAULT_OUT


def test_a_user_error_is_one_line_and_exit_status_2():
    run = subprocess.run([sys.executable, str(ROOT / "Supervised_Fine-Tuning.py"), "--max-length", "8"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "Error: --max-length 8 is too short: use at least 32 tokens.\n"


def test_collator_pads_to_longest_without_masking_eos():
    collate = sft.PadToLongest(pad_id=0)
    batch = collate([{"input_ids": [5, 6, 0], "labels": [-100, 6, 0], "length": 3},
                     {"input_ids": [7], "labels": [7], "length": 1}])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 0], [7, -100, -100]]  # the real EOS (id 0 = pad id) is learned
    assert "attention_mask" not in batch  # padding only at the end: causal attention never looks at it


def lora_model(impl, tiny_dir, dtype=torch.float32):
    """A tiny GPT-2 with LoRA whose B matrices are not zero (so the adapter changes the model), no dropout."""
    from peft import LoraConfig, get_peft_model
    base = gpt2_class(impl).from_pretrained(tiny_dir, dtype=dtype, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=sft.LORA_TARGETS,
                        fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(base, config).train()


@pytest.mark.parametrize("impl", IMPLS)
def test_fast_loss_and_lora_gradients_equal_the_full_logits_computation(tiny_dir, tok, impl, monkeypatch):
    """What the training runs (no attention mask, fused GELU, lm_head only at labelled positions, in slices)
    against the straightforward computation: padding mask, GPT-2's own gelu_new, the model's loss on all logits."""
    conversations, _ = sft.load_conversations(SAMPLE)
    examples, _ = sft.build_examples(conversations[:6], tok, sft.ChatFormat(), 64)
    features = sorted(examples, key=lambda e: e["length"])[-4:]
    assert len({f["length"] for f in features}) > 1  # the batch has padding
    batch = sft.PadToLongest(tok.eos_token_id)(features)
    n_learned = sum(sum(l != -100 for l in f["labels"][1:]) for f in features)  # Trainer's count
    mask = torch.tensor([[1] * f["length"] + [0] * (batch["input_ids"].size(1) - f["length"]) for f in features])

    torch.manual_seed(0)
    reference = lora_model(impl, tiny_dir)
    loss_ref = reference(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"],
                         num_items_in_batch=n_learned).loss
    loss_ref.backward()

    torch.manual_seed(0)
    fast = lora_model(impl, tiny_dir)
    sft.use_fused_gelu(fast)
    base = fast.get_base_model()
    weight = base.lm_head.weight
    base.lm_head = torch.nn.Identity()
    monkeypatch.setattr(sft, "LOSS_SLICE", 7)  # several slices, the last one partial
    monkeypatch.setattr(sft, "SOFTMAX_ROWS", 3)  # and several softmax passes in each, the last one partial
    loss = sft.assistant_loss(weight)(fast(input_ids=batch["input_ids"]), batch["labels"], n_learned)
    loss.backward()

    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 4 * 2  # lora_A, lora_B x 4 layers x 2 blocks
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # Without a count (evaluation), the mean over the labelled tokens of this batch.
    with torch.no_grad():
        assert sft.assistant_loss(weight)(fast(input_ids=batch["input_ids"]), batch["labels"]).item() == \
            pytest.approx(loss_ref.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_sum_equals_cross_entropy_in_both_layouts(dtype, monkeypatch):
    """head_loss_sum (fp32 on a CPU: logits as (vocabulary, rows); bf16: rows in cache-sized passes) against
    cross_entropy on the full logits: the summed loss and the gradient with respect to the hidden states."""
    torch.manual_seed(0)
    weight = torch.randn(300, 16) * 0.5
    hidden = torch.randn(23, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 300, (23,))
    monkeypatch.setattr(sft, "LOSS_SLICE", 10)  # slices 10, 10, 3
    monkeypatch.setattr(sft, "SOFTMAX_ROWS", 4)
    loss = sft.head_loss_sum(hidden, weight, targets)
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_()
    logits = (reference_hidden @ weight.to(dtype).t()).float()
    reference = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    reference.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, reference, rtol=tol, atol=tol)
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad.float(), rtol=tol, atol=tol)
    with torch.no_grad():  # evaluation: the same number, no gradient work
        assert sft.head_loss_sum(hidden.detach(), weight, targets).item() == pytest.approx(loss.item(), rel=1e-6)


def test_keep_mask_drops_with_the_asked_probability_and_keeps_the_expectation():
    x = torch.empty(400, 1000)
    for p in (0.05, 0.1, 0.5):
        torch.manual_seed(1)
        keep, scale = sft.keep_mask(x, p)
        dropped = 1 - keep.float().mean().item()
        assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5  # within 4 standard deviations
        assert keep.dtype == torch.bool and scale == pytest.approx(1 / (1 - p), rel=1e-4)
        assert (keep.float() * scale).mean().item() == pytest.approx(1.0, abs=3e-3)  # E[mask * scale] = 1
    torch.manual_seed(1)
    again, _ = sft.keep_mask(x, 0.5)
    assert torch.equal(again, keep)  # torch's generator: seeded runs (and resumed ones) draw the same masks


def grad_fn_names(tensor):
    """The names of every autograd node behind a tensor (what actually ran in the forward pass)."""
    names, todo, seen = [], [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_lean_dropout_and_lora_equal_peft_with_the_same_masks(tiny_dir, impl, dtype, monkeypatch):
    """use_lean_dropout + use_lean_lora (1-byte masks, LoRA's dropout folded into lora_A, LoRA in the base's
    dtype, one addmm) against PEFT's own forward and GPT-2's dropout replaying the same masks: the loss and every
    LoRA gradient (in fp32 exactly up to float rounding; with a bf16 base within bf16 rounding, since PEFT
    computes the adapter in fp32 there); eval mode is PEFT's forward, bit for bit."""
    from peft import LoraConfig, get_peft_model

    def model(lean):
        torch.manual_seed(0)
        base = gpt2_class(impl).from_pretrained(tiny_dir, dtype=dtype, attn_pdrop=0.0, resid_pdrop=0.1,
                                                embd_pdrop=0.1)
        config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.2, target_modules=sft.LORA_TARGETS,
                            fan_in_fan_out=True, init_lora_weights=False)
        m = get_peft_model(base, config).train()
        assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)  # PEFT's fp32 adapters
        if lean:
            sft.use_lean_dropout(m)
            sft.use_lean_lora(m)
        return m

    masks = []  # the reference replays the masks the lean model drew, in the same order

    def replay(module, args, output):  # forward hook on every nn.Dropout of the reference
        if not module.training or module.p == 0:
            return output
        keep, scale = masks.pop(0)
        return args[0] * keep * scale

    recorded = sft.keep_mask

    def recording(like, p):
        keep, scale = recorded(like, p)
        masks.append((keep, scale))
        return keep, scale

    in_place = []  # base outputs computed fresh, with the LoRA term added in place (GPT-2's Conv1D)
    fresh_conv1d = sft.frozen_conv1d_output

    def counting(layer, x):
        out = fresh_conv1d(layer, x)
        in_place.append(out is not None)
        return out

    ids = torch.randint(0, 200, (2, 24))
    lean, reference = model(True), model(False)
    assert lean.state_dict().keys() == reference.state_dict().keys()
    monkeypatch.setattr(sft, "keep_mask", recording)
    monkeypatch.setattr(sft, "frozen_conv1d_output", counting)
    loss = lean(input_ids=ids, labels=ids).loss
    monkeypatch.undo()
    n_masks = len(masks)
    assert n_masks == 1 + 2 * 2 + 4 * 2  # embeddings, 2 residual dropouts and 4 LoRA layers per block, 2 blocks
    ran = grad_fn_names(loss)
    assert ran.count("DropoutLinearBackward") == 4 * 2 and "AddmmBackward0" in ran  # the lean LoRA path ran
    assert in_place == [True] * 4 * 2 and "CopySlices" not in ran  # no copy of the base output, no view rebase
    for module in reference.modules():
        if type(module) is torch.nn.Dropout:
            module.register_forward_hook(replay)
    assert sum(type(m) is torch.nn.Dropout and m.p > 0 for m in reference.modules()) == n_masks
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    assert not masks  # every recorded mask was used once
    ref_loss.backward()
    exact = dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6 if exact else 1e-2, atol=1e-6 if exact else 1e-2)
    grads = {n: p.grad for n, p in lean.named_parameters() if p.requires_grad}
    assert len(grads) == 4 * 2 * 2 and all(g.dtype == torch.float32 for g in grads.values())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            if exact:
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
            else:  # bf16 rounding of the activations: compare the whole gradient, relative to its size
                assert (grads[name] - p.grad).norm() <= 0.03 * p.grad.norm(), name
    lean.eval(), reference.eval()
    with torch.no_grad():
        assert torch.equal(lean(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_bf16_base_loss_is_close_to_fp32(tiny_dir, tok):
    """The CPU default: bf16 base weights (no fp32 copy), fp32 LoRA parameters; the loss within bf16 rounding."""
    conversations, _ = sft.load_conversations(SAMPLE)
    examples, _ = sft.build_examples(conversations[:4], tok, sft.ChatFormat(), 64)
    batch = sft.PadToLongest(tok.eos_token_id)(examples[:4])
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = lora_model("transformers", tiny_dir, dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        base = model.get_base_model()
        weight, base.lm_head = base.lm_head.weight, torch.nn.Identity()
        losses[dtype] = sft.assistant_loss(weight)(model(input_ids=batch["input_ids"]), batch["labels"])
        losses[dtype].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert losses[torch.bfloat16].dtype == torch.float32
    assert losses[torch.bfloat16].item() == pytest.approx(losses[torch.float32].item(), rel=2e-2)


def test_memory_check_says_in_one_sentence_when_a_batch_cannot_fit(monkeypatch, capsys):
    import psutil
    free = types_namespace(available=6 * 2**30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    sft.check_memory(4, 1024, bf16=True, checkpointing=False)  # the CPU default fits in 6 GB free, bf16 or fp32...
    sft.check_memory(4, 1024, bf16=False, checkpointing=False)
    with pytest.raises(UserError, match=r"^batch 8 x 1024 tokens needs about [0-9.]+ GB of memory and 6.0 GB "
                                        r"are free: use a smaller --batch-size .* or pass --gradient-checkpointing\.$"):
        sft.check_memory(8, 1024, bf16=False, checkpointing=False)  # ...batch 8 does not
    sft.check_memory(8, 1024, bf16=False, checkpointing=True)
    assert "GB free" in capsys.readouterr().out


def types_namespace(**kwargs):
    import types
    return types.SimpleNamespace(**kwargs)


def test_dump_dataset(tiny_dir, tok, tmp_path, capsys):
    out = tmp_path / "dump.jsonl"
    assert sft.main(train_argv(tiny_dir, tmp_path, "--dump-dataset", str(out))) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    assert f"Training examples: {len(rows)} windows" in printed
    assert "kept 25, skipped 11" in printed
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 64 for r in rows)
    # Every window ends with a learned reply; only the replies that had to be cut end without EOS.
    assert all(r["labels"][-1] == r["input_ids"][-1] for r in rows)
    no_eos = sum(r["labels"][-1] != tok.eos_token_id for r in rows)
    assert no_eos > 0 and f"{no_eos} over-long replies cut" in printed
    assert not (tmp_path / "adapter").exists()


def test_clear_errors(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"data file .*missing\.json not found: pass --data"):
        sft.main(train_argv(tiny_dir, tmp_path, "--data", str(tmp_path / "missing.json")))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device cuda was asked for, but PyTorch sees no GPU: use --device cpu"):
            sft.main(train_argv(tiny_dir, tmp_path, "--device", "cuda"))
    monkeypatch.chdir(tmp_path)  # no model/gpt2-base here (nor next to the script), and the hub is off
    monkeypatch.setattr(sft, "HERE", str(tmp_path))
    with pytest.raises(UserError, match=r"put the files of hub id `gpt2` at model/gpt2-base"):
        sft.resolve_model(sft.DEFAULT_MODEL)
    with pytest.raises(UserError, match=r"put `sharegpt_gpt4.json` of the dataset "
                                        r"`openchat/openchat_sharegpt4_dataset` at data/sharegpt_gpt4.json"):
        sft.resolve_data(sft.DEFAULT_DATA)
    (tmp_path / "adapter-checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(UserError, match="pass --resume to continue it, or --overwrite"):
        sft.main(train_argv(tiny_dir, tmp_path))


# ------------------------------------------------------------------------------------------------ training

def test_training_lowers_eval_loss_and_saves_atomically(trained, tok):
    metrics = json.loads((trained / "train_metrics.json").read_text())
    assert metrics["global_step"] == 12 and not metrics["interrupted"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.05
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert (trained / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in trained.parent.iterdir() if p.name.startswith((".partial-", ".old-"))]
    # readable like any directory (tempfile.mkdtemp alone would leave them private to the owner)
    assert (trained.stat().st_mode & 0o777) == (Path(str(trained) + "-merged").stat().st_mode & 0o777) == 0o755
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(trained).chat_template == sft.ChatFormat().jinja()
    config = json.loads((trained / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"} and config["fan_in_fan_out"] is True


@pytest.mark.parametrize("impl", IMPLS)
def test_adapter_loads_with_stock_peft_and_merges(trained, tiny_dir, impl):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel
    x = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        base_logits = gpt2_class(impl).from_pretrained(tiny_dir).eval()(x).logits
        model = PeftModel.from_pretrained(gpt2_class(impl).from_pretrained(tiny_dir), str(trained)).eval()
        logits = model(x).logits
        reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_dir), str(trained)).eval()(x).logits
        merged_model = AutoModelForCausalLM.from_pretrained(str(trained) + "-merged").eval()  # transformers alone
        merged = merged_model(x).logits
    assert type(merged_model) is GPT2LMHeadModel
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)


def test_ctrl_c_saves_the_adapter(tiny_dir, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    class CtrlC(TrainerCallback):
        mlp_calls = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            mlp = model.base_model.model.transformer.h[0].mlp
            # a pre-hook: recomputation stops as soon as it has what backward needs, maybe before the MLP returns
            mlp.register_forward_pre_hook(lambda *_: setattr(self, "mlp_calls", self.mlp_calls + 1))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    # Also LoRA with gradient checkpointing (see PITFALLS), on our GPT-2 when present, and --device cpu.
    ctrl_c = CtrlC()
    add_callback_to_trainer(monkeypatch, ctrl_c)
    rc = sft.main(train_argv(tiny_dir, tmp_path, "--max-steps", "10", "--save-steps", "100", "--eval-size", "0",
                             "--gradient-checkpointing", "--device", "cpu", *impl_argv()))
    assert rc == 130
    assert ctrl_c.mlp_calls == 2 * 3  # checkpointing is on: each block runs again in the backward pass
    metrics = json.loads((tmp_path / "adapter" / "train_metrics.json").read_text())
    assert metrics["interrupted"] and metrics["global_step"] == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])  # the repository root
from course_utils import load_script, run_main
from transformers import TrainerCallback
sft = load_script(os.path.join(sys.argv[1], "Supervised_Fine-Tuning.py"))

class Kill(TrainerCallback):  # a hard kill right after checkpoint 4 was written (like Colab dying)
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

build_trainer = sft.build_trainer

def build_trainer_that_dies(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.add_callback(Kill())
    return trainer

sft.build_trainer = build_trainer_that_dies
run_main(lambda: sft.main(sys.argv[2:]))
"""


def test_resume_after_kill(tiny_dir, tmp_path, capsys):
    argv = train_argv(tiny_dir, tmp_path, "--max-steps", "8", "--save-steps", "2", "--model-impl", "transformers")
    run = subprocess.run([sys.executable, "-c", KILLER, str(ROOT), *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    before = float(re.search(r"Before training: eval loss ([0-9.]+)", run.stdout).group(1))
    ckpts = tmp_path / "adapter-checkpoints"
    assert (ckpts / "checkpoint-4").is_dir() and not (tmp_path / "adapter").exists()
    assert sft.main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert f"Resuming from {ckpts / 'checkpoint-4'}" in out
    metrics = json.loads((tmp_path / "adapter" / "train_metrics.json").read_text())
    assert metrics["global_step"] == 8
    assert metrics["eval_loss_before"] == pytest.approx(before, abs=1e-4)  # the handed-in figures survive a resume
    steps = [h["step"] for h in metrics["log_history"] if "loss" in h]
    assert steps[-4:] == [5, 6, 7, 8] and steps.count(5) == 1  # continued, not restarted


# ---------------------------------------------------------------------------------------------------- chat

chat = load_script(ROOT / "ChatGPT2-base.py")


@pytest.fixture(scope="session")
def parrot_dir(tiny_dir, tok, tmp_path_factory):
    """A tiny GPT-2 trained until it knows one conversation by heart: "hi" -> "hello there" + EOS, then
    "ping" -> "pong" followed by a new user turn it writes itself ("\\nHuman: again")."""
    from transformers import GPT2LMHeadModel
    fmt = sft.ChatFormat()
    (blocks,) = sft.encode_conversations([[{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello there"},
                                           {"role": "user", "content": "ping"}]], tok, fmt)
    ids = [t for b in blocks for t in b.ids] + tok(fmt.prefix("assistant") + " pong\nHuman: again")["input_ids"]
    ids += [tok.eos_token_id]
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(tiny_dir)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    for _ in range(200):
        loss = model(x, labels=x).loss
        if loss.item() < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    out = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chat_argv(model_dir, *extra):
    return ["--model", str(model_dir), "--temperature", "0", "--repetition-penalty", "1.0",
            "--max-new-tokens", "40", *extra]


def test_ask_streams_and_stops_at_end_of_reply_and_new_user_turn(parrot_dir, tmp_path, capsys):
    transcript = tmp_path / "chat.md"
    argv = chat_argv(parrot_dir, "--ask", "hi", "--ask", "ping", "--save", str(transcript), *impl_argv())
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    assert "Human: hi\nchatgpt2-base: hello there\n" in out
    assert "Human: ping\nchatgpt2-base: pong\n" in out
    assert "again" not in out and "Human:" not in out.split("pong")[1]
    md = transcript.read_text(encoding="utf-8")
    assert "**Human:** hi\n\n**chatgpt2-base:** hello there\n\n**Human:** ping\n\n**chatgpt2-base:** pong" in md


def test_stdin_turns_and_commands(parrot_dir, tmp_path):
    saved = tmp_path / "saved.md"
    stdin = f"hi\nping\n/save {saved}\n/clear\nhi\n/help\n/exit\nping\n"
    argv = chat_argv(parrot_dir, "--model-impl", "transformers")
    run = subprocess.run([sys.executable, str(ROOT / "ChatGPT2-base.py"), *argv], input=stdin,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("chatgpt2-base: hello there\n") == 2  # after /clear "hi" starts over
    assert run.stdout.count("chatgpt2-base: pong\n") == 1  # nothing is answered after /exit
    assert "/save FILE" in run.stdout  # /help
    assert "**chatgpt2-base:** pong" in saved.read_text(encoding="utf-8")


def test_chat_with_adapter_and_compare(trained, tiny_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoTokenizer
    impl = "ours" if have_ours() else "transformers"
    md = tmp_path / "compare.md"
    argv = ["--model", str(tiny_dir), "--adapter", str(trained), "--ask", "hi", "--compare", "--temperature", "0",
            "--max-new-tokens", "8", "--save", str(md), *impl_argv()]
    assert chat.main(argv) == 0
    out = capsys.readouterr().out
    assert "[base GPT-2] chatgpt2-base:" in out and "[fine-tuned] chatgpt2-base:" in out
    # The same greedy replies computed here: the base model alone, and base + adapter through stock PEFT.
    args, tokenizer = parse_args(chat.build_parser(), argv), AutoTokenizer.from_pretrained(trained)
    question = [{"role": "user", "content": "hi"}]
    base = gpt2_class(impl).from_pretrained(tiny_dir).eval()
    tuned = PeftModel.from_pretrained(gpt2_class(impl).from_pretrained(tiny_dir), str(trained)).eval()
    base_reply, tuned_reply = (reply_of(model, tokenizer, question, args) for model in (base, tuned))
    assert base_reply != tuned_reply
    text = md.read_text(encoding="utf-8")
    assert f"**chatgpt2-base (base GPT-2):** {base_reply}\n" in text
    assert f"**chatgpt2-base (fine-tuned):** {tuned_reply}\n" in text


def reply_of(model, tokenizer, messages, args):
    """One reply of `model` with ChatGPT2-base.py's settings, through the same chat engine."""
    engine = chat.ChatEngine(model, tokenizer, batching="generate")
    try:
        reply = engine.reply(messages, chat.options(args))
        "".join(reply)
    finally:
        engine.close()
    return reply.text


def test_chat_missing_adapter_is_one_sentence(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="run Supervised_Fine-Tuning.py first"):
        chat.main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "nothing"), "--ask", "hi"])


@pytest.mark.parametrize("impl", IMPLS)
def test_4bit_lora_code_path(tiny_dir, tmp_path, impl):
    """The GPU recipe, run on the CPU (bitsandbytes >= 0.45 has CPU kernels): Conv1D becomes Linear4bit, so LoRA
    must use fan_in_fan_out=False; k-bit preparation + gradient checkpointing train; the adapter then loads with
    stock PEFT on the unquantized transformers GPT-2."""
    pytest.importorskip("bitsandbytes")
    import types

    from peft import PeftModel
    from transformers import BitsAndBytesConfig, GPT2LMHeadModel
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = gpt2_class(impl).from_pretrained(tiny_dir, quantization_config=bnb, device_map="cpu")
    model.train()  # before any forward: an eval-mode forward on this CPU repacks the 4-bit weights (PITFALLS)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    model = sft.add_lora(model, types.SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0), "4bit", True)
    assert model.peft_config["default"].fan_in_fan_out is False
    x = torch.randint(0, 700, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for p in trainable.values())
    # lora_B starts at zero, so it is the one with a gradient on the first step
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    with torch.no_grad():  # one SGD step, so that lora_B is no longer zero
        for p in trainable.values():
            p -= 0.1 * p.grad
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_dir), str(tmp_path / "a"))
    loaded_params = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert loaded_params.keys() == trainable.keys()
    for name, p in trainable.items():
        torch.testing.assert_close(loaded_params[name], p.float(), msg=name)
