"""Tests for Pretraining.py (Task 5): tiny GPT-2s trained for a few steps on the team's sample text.

What they pin down: the output directory loads in stock transformers and gives the same logits as the
repository's model; the char / BPE tokenizers round-trip English and Chinese; a run killed mid-way and
resumed equals an uninterrupted one; 2 processes (DDP, gloo) equal 1 process with the same global batch;
foreseeable mistakes end with one sentence and exit code 2.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_utils import UserError, load_script, parse_args

ROOT = Path(__file__).resolve().parents[1]
Pretraining = load_script(ROOT / "Pretraining.py")
SAMPLES = ROOT / "data" / "samples"
TEXTS = [str(SAMPLES / "pretrain_en.txt"), str(SAMPLES / "pretrain_zh.txt")]
# A tiny model and short runs: every test here takes seconds on 2 CPU cores.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--dtype", "fp32", "--device", "cpu", "--no-progress", "--sample-tokens", "0", "--eval-iters", "2"]


def run_inprocess(*argv):
    Pretraining.main([str(a) for a in argv])


# `python -c KILLED_AFTER_SAVE Pretraining.py STEP ARGS...`: Pretraining.py with ARGS, killed like a crash (SIGKILL,
# no cleanup at all) right after it saved the checkpoint of STEP. The script has no hook for this: its
# save_checkpoint is wrapped from outside.
KILLED_AFTER_SAVE = """
import inspect, os, signal, sys
import course_utils
module = course_utils.load_script(sys.argv[1])
kill_at, save = int(sys.argv[2]), module.save_checkpoint

def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    if inspect.signature(save).bind(*args, **kwargs).arguments["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

module.save_checkpoint = save_then_die
course_utils.run_main(lambda: module.main(sys.argv[3:]))
"""


def run_subprocess(*argv, torchrun=0, kill_after_save=0, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable]
    if kill_after_save:
        cmd += ["-c", KILLED_AFTER_SAVE, str(ROOT / "Pretraining.py"), str(kill_after_save)]
    elif torchrun:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    if not kill_after_save:
        cmd += [str(ROOT / "Pretraining.py")]
    cmd += [str(a) for a in argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def load_params(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "model.safetensors"))


def metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("char")
    run_inprocess("--data", *TEXTS, "--tokenizer", "char", "--max-steps", 40, "--lr", "3e-3",
                  "--eval-steps", 20, "--out", out, *TINY)
    return str(out)


def test_char_output_loads_in_transformers_and_matches_repo_model(char_run):
    from transformers import AutoTokenizer
    from transformers import GPT2LMHeadModel as HFGPT2

    from gpt2.modeling_gpt2 import GPT2LMHeadModel as RepoGPT2
    tok = AutoTokenizer.from_pretrained(char_run)
    text = "A language model 读一段文字，猜下一个字。\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|endoftext|>"

    hf = HFGPT2.from_pretrained(char_run).eval()
    repo = RepoGPT2.from_pretrained(char_run).eval()
    # Trained with the exact GELU (the default); gpt2/modeling_gpt2.py builds GPT-2's tanh form, the scripts that
    # load it with a GPT-2 of any activation call use_fused_gelu, which makes it follow the config.
    assert hf.config.activation_function == "gelu"
    with torch.no_grad():
        assert not torch.allclose(hf(torch.tensor([ids])).logits, repo(torch.tensor([ids])).logits, atol=1e-6)
    Pretraining.use_fused_gelu(repo)
    # The config carries the small tokenizer's ids, not GPT-2's 50256.
    assert hf.config.eos_token_id == hf.config.bos_token_id == tok.eos_token_id
    assert hf.config.vocab_size == len(tok)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, repo(x).logits, rtol=1e-5, atol=1e-5)
    out = hf.generate(x[:, :5], max_new_tokens=10, do_sample=False)
    assert out.shape == (1, 15)


def test_char_run_learns_and_writes_curve_and_checkpoint(char_run):
    m = metrics(char_run)
    losses = [loss for _, loss in m["history"]["train"]]
    assert len(losses) == 40
    assert losses[0] > losses[-1] + 1.0, losses  # from ~ln(vocab) down, clearly learning
    assert [s for s, _ in m["history"]["val"]] == [20, 40]
    assert m["tokens_per_s"] > 0 and 0 < m["mfu"] < 1
    assert os.path.getsize(os.path.join(char_run, "loss_curve.png")) > 1000
    ckpt = torch.load(os.path.join(char_run, "ckpt.pt"), weights_only=False)
    assert ckpt["step"] == 40 and {"model", "optimizer", "scaler", "history", "config"} <= set(ckpt)
    assert len(m["history"]["grad_norm"]) == 40 and all(n > 0 for n in m["history"]["grad_norm"])


def test_weight_decay_on_matrices_only_and_the_tied_embedding_once():
    from transformers import GPT2Config

    from gpt2.modeling_gpt2 import GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2))
    assert model.lm_head.weight is model.transformer.wte.weight
    args = parse_args(Pretraining.build_parser(), ["--weight-decay", "0.1", "--lr", "1e-3"])
    decay, no_decay = Pretraining.configure_optimizer(model, args, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # named_parameters lists a tied weight once
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    assert all(n.endswith(".weight") and ".ln_" not in n for n in decayed), decayed
    assert all(n.endswith(".bias") or ".ln_" in n for n in (names[id(p)] for p in no_decay["params"]))
    # Every parameter is optimized exactly once (a tied weight listed twice would be updated twice).
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(names)


def test_lr_schedule_warms_up_then_decays_to_min():
    args = parse_args(Pretraining.build_parser(), ["--max-steps", "100"])
    args.lr, args.min_lr, args.warmup_steps = 1e-3, 1e-4, 10
    lrs = [Pretraining.get_lr(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-2)


def test_bpe_on_chinese_and_jsonl_with_a_bad_record(tmp_path, capsys):
    lines = Path(TEXTS[1]).read_text(encoding="utf-8").split("\n\n")
    jsonl = tmp_path / "zh.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for para in lines:
            f.write(json.dumps({"text": para}, ensure_ascii=False) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"title": "no text field"}) + "\n")
    out = tmp_path / "out"
    run_inprocess("--data", str(tmp_path / "*.jsonl"), TEXTS[0], "--tokenizer", "bpe", "--vocab-size", 400,
                  "--max-steps", 3, "--eval-steps", 0, "--out", out, *TINY)
    assert "Skipped 2 JSON records" in capsys.readouterr().out
    from transformers import AutoTokenizer
    from transformers import GPT2LMHeadModel as HFGPT2
    tok = AutoTokenizer.from_pretrained(out)
    text = "检查点比大多数人想象的更重要。Checkpoints matter."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges learned: fewer tokens than bytes
    assert len(tok) <= 400
    assert HFGPT2.from_pretrained(out).config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("precision", [["--dtype", "fp32"], ["--dtype", "bf16", "--master-weights"]],
                         ids=["fp32", "bf16-master-weights"])
def test_killed_run_resumes_to_the_same_result(tmp_path, precision):
    common = ["--data", *TEXTS, "--tokenizer", "char", "--max-steps", 8, "--eval-steps", 0,
              "--save-steps", 3, "--lr", "3e-3", "--dropout", "0.1", *TINY, *precision]
    full, broken = tmp_path / "full", tmp_path / "broken"
    # All three runs in subprocesses with the same thread count, so the arithmetic is bit-for-bit the same.
    r = run_subprocess(*common, "--out", full)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_subprocess(*common, "--out", broken, kill_after_save=3)  # killed right after the checkpoint of step 3
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert torch.load(broken / "ckpt.pt", weights_only=False)["step"] == 3
    r = run_subprocess(*common, "--out", broken, "--resume")
    assert r.returncode == 0 and "Resuming from" in r.stdout, r.stderr[-2000:]
    a, b = load_params(full), load_params(broken)
    for k in a:
        assert a[k].dtype == torch.float32, k  # the fp32 master weights are what is saved, also after bf16
        assert torch.equal(a[k], b[k]), k
    assert metrics(full)["history"]["train"] == metrics(broken)["history"]["train"]


def test_two_processes_and_accumulation_equal_one_big_batch(tmp_path):
    """The same 8 sequences per step as 1x8, as 4 accumulated micro-batches of 2, and over 2 processes (DDP)."""
    common = ["--data", *TEXTS, "--tokenizer", "char", "--max-steps", 4, "--eval-steps", 0, "--lr", "3e-3", *TINY]
    big, accum, two = tmp_path / "big", tmp_path / "accum", tmp_path / "two"
    run_inprocess(*common, "--grad-accum", 1, "--batch-size", 8, "--out", big)
    run_inprocess(*common, "--grad-accum", 4, "--batch-size", 2, "--out", accum)
    r = run_subprocess(*common, "--grad-accum", 4, "--batch-size", 2, "--out", two, torchrun=2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "x2" in r.stdout  # really ran as 2 processes
    ref = metrics(big)["history"]
    for out in (accum, two):
        # Adam's update hardly changes when every gradient is scaled by the same factor, so the weights alone
        # would not notice a missing 1/grad_accum or gradients summed instead of averaged over processes:
        # the gradient norm does. The weights catch a micro-batch dropped, repeated, or not synchronised.
        h = metrics(out)["history"]
        assert h["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), out.name
        assert [loss for _, loss in h["train"]] == pytest.approx([loss for _, loss in ref["train"]], rel=1e-5)
        # Summation order differs, so allow float rounding. Adam divides each gradient by its own size, so a
        # weight whose true gradient is ~0 (the attention key bias, a dead GELU unit) moves by up to ~lr on
        # rounding noise alone: 1e-4 leaves room for that, while a real bug moves nearly every weight by ~lr = 3e-3.
        a, b = load_params(big), load_params(out)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-4, msg=f"{out.name}: {k}")


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/corpus"], "No .txt/.jsonl files found"),
    (["--data", TEXTS[0], "--tokenizer", "gpt2", "--tokenizer-path", "/nonexistent/gpt2-base"],
     "--tokenizer bpe or --tokenizer char"),
    (["--data", TEXTS[0], "--tokenizer", "char", "--block-size", "4096"], "lower --block-size"),
    (["--data", TEXTS[0], "--tokenizer", "char", "--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a GPU"),
    (["--data", "{tmp}/broken.json", "--tokenizer", "char"], "is not valid JSON"),
    (["--data", TEXTS[0], "--size", "huge"], "invalid choice: 'huge'"),
    (["--data", TEXTS[0], "--device", "gpu"], "use auto, cpu, cuda or cuda:N"),
    (["--data", TEXTS[0], "--tokenizer", "char", "--n-embd", "30", "--n-head", "4"], "must be a multiple of --n-head"),
])
def test_foreseeable_mistakes_end_with_one_sentence(tmp_path, extra, message):
    (tmp_path / "broken.json").write_text('[{"text": "a list cut short"', encoding="utf-8")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = TINY + ["--max-steps", "1", "--out", str(tmp_path / "out")] + extra  # argparse: the last value wins
    with pytest.raises(UserError, match=re.escape(message)):
        Pretraining.main(argv)


def test_a_mistake_on_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    r = run_subprocess("--data", "/nonexistent/corpus", "--out", tmp_path / "out", *TINY)
    assert r.returncode == 2
    assert r.stderr.startswith("Error: No .txt/.jsonl files found") and "Traceback" not in r.stderr, r.stderr


def test_old_option_names_are_hidden_aliases():
    parser = Pretraining.build_parser()
    args = parse_args(parser, ["--eval-interval", "5", "--save-interval", "7"])
    assert (args.eval_steps, args.save_steps) == (5, 7)
    assert "--eval-interval" not in parser.format_help() and "--eval-steps" in parser.format_help()


def test_gpt2_tokenizer_from_a_local_directory(tmp_path):
    """--tokenizer gpt2 loads model/gpt2-base (here: a small GPT-2-style tokenizer saved the same way)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train(TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    base = tmp_path / "gpt2-base"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(base)
    out = tmp_path / "out"
    run_inprocess("--data", *TEXTS, "--tokenizer", "gpt2", "--tokenizer-path", base, "--max-steps", 2,
                  "--eval-steps", 0, "--out", out, *TINY)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok) and cfg["eos_token_id"] == tok.eos_token_id
    # The cached token stream is the tokenizer's encoding of the files, with <|endoftext|> between them.
    with open(out / "data" / "meta.json") as f:
        meta = json.load(f)
    expected = sum(len(tok(Path(t).read_text(encoding="utf-8"))["input_ids"]) + 1 for t in TEXTS)
    assert meta["n_tokens"] == expected


def tiny_model(seed=0, vocab=40):
    from transformers import GPT2Config

    from gpt2.modeling_gpt2 import GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def test_fused_gelu_follows_the_configured_activation():
    """The exact GELU ("gelu") in the repo's GPT-2 computes what transformers' GPT-2 computes with that config;
    an activation the repo's GPT-2 cannot build is one clear error, not a silently different model."""
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel as HFGPT2

    from course_utils import UserError
    from gpt2.modeling_gpt2 import GPT2LMHeadModel
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2, activation_function="gelu")
    repo = GPT2LMHeadModel(config).eval()
    hf = HFGPT2(config).eval()
    hf.load_state_dict(repo.state_dict())
    Pretraining.use_fused_gelu(repo)
    assert repo.transformer.h[0].mlp.act.approximate == "none"
    x = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(repo(input_ids=x).logits, hf(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    config.activation_function = "relu"
    with pytest.raises(UserError, match="relu"):
        Pretraining.use_fused_gelu(GPT2LMHeadModel(config))


def test_fused_gelu_computes_what_gpt2s_gelu_does():
    """use_fused_gelu swaps the activation only: same logits and gradients, same saved parameters."""
    slow, fast = tiny_model(), tiny_model()
    Pretraining.use_fused_gelu(fast)
    assert isinstance(fast.transformer.h[0].mlp.act, torch.nn.GELU)
    assert fast.state_dict().keys() == slow.state_dict().keys()
    x = torch.randint(0, 40, (3, 16))
    for m in (slow, fast):
        m(input_ids=x).logits.square().mean().backward()
    torch.testing.assert_close(fast(input_ids=x).logits, slow(input_ids=x).logits, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(slow.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])  # 0.25: a loss divided by 4 accumulated micro-batches
def test_cpu_cross_entropy_equals_torchs(dtype, grad_scale, monkeypatch):
    """The training loss with its gradient computed in the forward pass, against F.cross_entropy on the same
    logits (cast to fp32 first, as before): the loss, and the gradient reaching bf16 or fp32 logits."""
    monkeypatch.setattr(Pretraining.CrossEntropyCPU, "CHUNK", 7 * 1000)  # 7 rows a pass: 8 passes, the last partial
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 1000) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (3, 17))
    loss = Pretraining.lm_loss(logits, targets)
    (loss * grad_scale).backward()
    ours = logits.grad
    logits.grad = None
    reference = torch.nn.functional.cross_entropy(logits.float().view(-1, 1000), targets.view(-1))
    (reference * grad_scale).backward()
    assert loss.dtype == torch.float32 and ours.dtype == dtype
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    tolerance = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(ours.float(), logits.grad.float(), **tolerance)


def test_cpu_bf16_takes_the_textbook_attention_for_short_blocks_and_it_computes_the_same():
    """Up to 512 tokens a CPU bf16 run uses the model's eager attention (faster there); it is the same function
    as the fused kernel: same logits and gradients to bf16 rounding."""
    chosen = {}
    settings = (("cpu", "bf16", 512), ("cpu", "bf16", 1024), ("cpu", "fp32", 64), ("cuda", "bf16", 64))
    for device, dtype, block in settings:
        model = tiny_model()
        Pretraining.use_fast_cpu_bf16_attention(model, device, dtype, block)
        chosen[(device, dtype, block)] = model.config._attn_implementation
    assert chosen == {("cpu", "bf16", 512): "eager", ("cpu", "bf16", 1024): "sdpa", ("cpu", "fp32", 64): "sdpa",
                      ("cuda", "bf16", 64): "sdpa"}
    fused, eager = tiny_model(), tiny_model()
    Pretraining.use_fast_cpu_bf16_attention(eager, "cpu", "bf16", 16)
    x = torch.randint(0, 40, (3, 16))
    outputs = []
    for m in (fused, eager):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=x).logits
        logits.float().logsumexp(-1).mean().backward()
        outputs.append(logits.float())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=2e-2, atol=2e-2)
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=5e-2, atol=1e-3, msg=name)


def test_master_weights_sum_bf16_gradients_in_fp32_and_keep_the_tie():
    model = tiny_model()
    mixed = Pretraining.MasterWeights(model)
    low = mixed.compute
    assert low.lm_head.weight is low.transformer.wte.weight and low.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x1, x2 = torch.randint(0, 40, (2, 2, 16))
    expected = {}
    for x in (x1, x2):  # two micro-batches
        low(input_ids=x).logits.float().logsumexp(-1).mean().backward()
        for name, p in low.named_parameters():
            expected[name] = expected.get(name, 0) + p.grad.float()
        mixed.collect_grads()
        assert all(p.grad is None for p in low.parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    mixed.copy_to_compute()
    for (name, p), q in zip(model.named_parameters(), low.parameters()):
        assert torch.equal(q, p.to(torch.bfloat16)), name


def test_bf16_training_follows_the_fp32_loss_curve(tmp_path):
    """CPU bf16 (autocast, or bf16 weights + fp32 master) learns like fp32: same data and initial weights."""
    common = ["--data", *TEXTS, "--tokenizer", "char", "--max-steps", 20, "--eval-steps", 0, "--lr", "3e-3", *TINY]
    curves = {}
    for name, extra in (("fp32", ["--dtype", "fp32"]), ("autocast", ["--dtype", "bf16"]),
                        ("master", ["--dtype", "bf16", "--master-weights"])):
        run_inprocess(*common, *extra, "--out", tmp_path / name)
        curves[name] = [loss for _, loss in metrics(tmp_path / name)["history"]["train"]]
    assert curves["fp32"][0] > curves["fp32"][-1] + 1.0  # it learns
    # bf16 keeps 8 bits of mantissa: each step's loss agrees to about 1%, and the run ends where fp32 ends.
    for name in ("autocast", "master"):
        assert curves[name] == pytest.approx(curves["fp32"], rel=0.02), name
        assert curves[name] != curves["fp32"], name  # it really computed in bf16
