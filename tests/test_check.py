"""The checker passes the reference and fails every single-point mistake a student can make."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2_helpers import MODELING, ROOT, TINY, load_checker

check = load_checker()

# (name, text in the reference, its mistaken replacement, the module the checker must blame first or None)
MUTANTS = [
    ("exact GELU instead of tanh GELU", "return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))",
     "return F.gelu(x)", "block 0 MLP"),
    ("ReLU", "self.act = gelu_new", "self.act = F.relu", "block 0 MLP"),
    ("no 1/sqrt(d) scale", "self.scale = self.head_dim**-0.5 if", "self.scale = 1.0 if", "block 0 attention"),
    ("1/d scale", "self.scale = self.head_dim**-0.5 if", "self.scale = self.head_dim**-1.0 if", "block 0 attention"),
    ("LayerNorm epsilon 1e-6 in ln_1", "self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)",
     "self.ln_1 = nn.LayerNorm(config.hidden_size, eps=1e-6)", None),
    ("LayerNorm epsilon 1e-12 in ln_f", "self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)",
     "self.ln_f = nn.LayerNorm(config.hidden_size, eps=1e-12)", None),
    ("mask off by one", "mask = (key_pos <= query_pos)", "mask = (key_pos < query_pos)", None),
    ("no causal mask", "mask = (key_pos <= query_pos)", "mask = (key_pos >= 0)", None),
    ("padding ignored", "mask = mask & attention_mask.bool().view(batch, 1, 1, total)", "mask = mask", None),
    ("positions off by one", "position_ids = torch.arange(past_length, past_length + length,", "position_ids = torch.arange(past_length + 1, past_length + length + 1,", "embeddings"),
    ("positions ignore the cache", "position_ids = torch.arange(past_length, past_length + length,", "position_ids = torch.arange(0, length,", None),
    ("no attention residual", "hidden_states = hidden_states + attn_output  # residual", "hidden_states = attn_output  # residual", "block 0 MLP"),
    ("no MLP residual", "hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))", "hidden_states = self.mlp(self.ln_2(hidden_states))", None),
    ("ln_1 reused before the MLP", "self.mlp(self.ln_2(hidden_states))", "self.mlp(self.ln_1(hidden_states))", "block 0 MLP"),
    ("heads merged without transpose", "output = output.transpose(1, 2).reshape(batch, length, width)", "output = output.reshape(batch, length, width)", "block 0 attention"),
    ("q and k swapped", "query, key, value = self.c_attn(hidden_states).split(width, dim=2)", "key, query, value = self.c_attn(hidden_states).split(width, dim=2)", "block 0 attention"),
    ("softmax over the wrong axis", "weights = F.softmax(scores, dim=-1)", "weights = F.softmax(scores, dim=-2)", "block 0 attention"),
    ("no final LayerNorm", "hidden_states = self.ln_f(hidden_states)", "hidden_states = hidden_states", "final norm"),
    ("no position embedding", "hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))", "hidden_states = self.drop(inputs_embeds)", "embeddings"),
    ("loss without the shift", "shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]", "shift_labels = labels", None),
    ("untied head", '_tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}', "_tied_weights_keys = {}", None),
    ("SDPA without the causal flag", "is_causal=attention_mask is None and length > 1", "is_causal=False", None),
    ("SDPA ignores the mask", "query, key, value, attn_mask=attention_mask,", "query, key, value, attn_mask=None,", None),
    ("cache not used", "key, value = cache.update(key, value, self.layer_idx)", "cache.update(key, value, self.layer_idx)", None),
]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Sensitive random weights at a tiny shape, their inputs, and the reference outputs."""
    from transformers import GPT2LMHeadModel

    weights = tmp_path_factory.mktemp("weights")
    check.sensitive_random_gpt2(**TINY).save_pretrained(weights)
    config = GPT2LMHeadModel.config_class.from_pretrained(weights)
    inputs = check.make_inputs(config)
    reference = check.run_checks_on(GPT2LMHeadModel, weights, inputs)
    return weights, inputs, reference


def run_candidate(path, tiny_setup):
    weights, inputs, reference = tiny_setup
    module = check.load_module(path)
    return check.compare(reference, check.run_checks_on(module.GPT2LMHeadModel, weights, inputs), inputs)


def test_reference_passes_every_check(tiny_setup):
    rows = run_candidate(MODELING, tiny_setup)
    assert [r["check"] for r in rows if not r["passed"]] == []
    assert len(rows) == 10


@pytest.mark.parametrize("name,old,new,culprit", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_single_point_mistakes_fail(tmp_path, tiny_setup, name, old, new, culprit):
    source = MODELING.read_text()
    assert source.count(old) == 1, f"mutant '{name}' no longer matches the reference"
    mutant = tmp_path / "modeling_gpt2.py"
    mutant.write_text(source.replace(old, new))
    try:
        rows = run_candidate(mutant, tiny_setup)
    except Exception as error:  # a mutant may not even run; the CLI reports that as a failure
        pytest.fail(f"the checker crashed on mutant '{name}': {error}")
    failed = [r for r in rows if not r["passed"]]
    assert failed, f"mutant '{name}' passed every check"
    if culprit:
        notes = " ".join(r["note"] for r in failed)
        assert f"first divergence: {culprit}" in notes, notes


def test_masked_handout_is_rejected_with_the_line(tmp_path):
    masked = tmp_path / "modeling_gpt2.py"
    lines = MODELING.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if "self.act = gelu_new" in line)
    lines[number] = lines[number].replace("gelu_new", "[MASK]")
    masked.write_text("\n".join(lines))
    with pytest.raises(check.CheckError, match=f"line {number + 1}"):
        check.load_module(masked)


def _run_cli(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "Check_gpt2-base.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_cli_passes_reference_and_writes_json(tmp_path, tiny_setup):
    weights = tiny_setup[0]
    out = tmp_path / "result.json"
    result = _run_cli("--model", str(weights), "--json", str(out), "-f", "/ignored/kernel.json")  # a notebook's argv
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALL CHECKS PASSED (10/10)" in result.stdout
    data = json.loads(out.read_text())
    assert data["passed"] is True and len(data["checks"]) == 10
    assert str(weights) in data["weights"]


def test_cli_fails_a_broken_file_with_exit_1_and_names_the_module(tmp_path, tiny_setup):
    broken = tmp_path / "modeling_gpt2.py"
    broken.write_text(MODELING.read_text().replace("self.act = gelu_new", "self.act = F.relu"))
    result = _run_cli("--file", str(broken), "--model", str(tiny_setup[0]))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "first divergence: block 0 MLP" in result.stdout


def test_cli_clear_errors(tmp_path):
    missing = _run_cli("--file", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad_dir = _run_cli("--model", str(tmp_path / "no" / "such" / "dir"))
    assert bad_dir.returncode == 2 and "no such model directory" in bad_dir.stderr
    syntax = tmp_path / "modeling_gpt2.py"
    syntax.write_text("class GPT2LMHeadModel(:\n")
    result = _run_cli("--file", str(syntax))
    assert result.returncode == 2 and "does not import" in result.stderr and "Traceback" not in result.stderr


def test_offline_fallback_message(monkeypatch, tmp_path, capsys):
    """With no model/gpt2-base and no network, random weights at 124M's shape are used and said so."""
    monkeypatch.setattr(check, "DEFAULT_MODEL", tmp_path / "model" / "gpt2-base")
    monkeypatch.setattr(check, "ROOT", tmp_path)
    monkeypatch.setattr(check, "hub_reachable", lambda timeout=3.0: False)
    calls = []
    real_random = check.sensitive_random_gpt2

    def tiny_random(seed=check.SEED, **overrides):  # the 124M shape itself is tested below; keep this fast
        calls.append((seed, overrides))
        return real_random(seed, **TINY)

    monkeypatch.setattr(check, "sensitive_random_gpt2", tiny_random)
    directory, description, real = check.prepare_weights(str(check.DEFAULT_MODEL), tmp_path, default_used=True)
    printed = capsys.readouterr().out
    assert "no network" in printed and "random weights at GPT-2 124M's shape" in printed and "model/gpt2-base" in printed
    assert real is False and "random weights" in description
    assert calls == [(0, {})]  # the defaults: GPT-2 124M, fixed seed
    assert (directory / "config.json").is_file()


def test_random_weights_have_gpt2_124m_shape_and_no_trivial_parameters():
    model = check.sensitive_random_gpt2()
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small
    for name, param in model.named_parameters():
        # zero biases or unit LayerNorm weights would hide a forgotten bias or a swapped weight/bias
        assert param.abs().min() < 0.5 or "ln" in name
        assert param.std() > 0.01, name


def test_real_weight_rows_the_dog_and_hello(tmp_path):
    """The rows only real gpt2 weights get: transformers' "The dog" test and the "Hello?" reply."""
    from transformers import GPT2LMHeadModel

    weights = tmp_path / "weights"
    check.sensitive_random_gpt2(**{**TINY, "vocab_size": 4000}).save_pretrained(weights)
    config = GPT2LMHeadModel.config_class.from_pretrained(weights)
    inputs = dict(check.make_inputs(config), the_dog=True, hello_ids=torch.tensor([[15496, 30][:1] + [30]]) % 4000)
    reference = check.run_checks_on(GPT2LMHeadModel, weights, inputs)
    ours = check.run_checks_on(check.load_module(MODELING).GPT2LMHeadModel, weights, inputs)
    rows = {r["check"]: r for r in check.compare(reference, ours, inputs)}
    assert rows['reply to "Hello?" = reference']["passed"]
    assert reference["the_dog"].shape == (1, 20) and reference["the_dog"][0, :2].tolist() == check.THE_DOG
    # Random weights do not continue "The dog" as GPT-2 does; the real continuation passes.
    assert not rows['"The dog" greedy = transformers\' test']["passed"]
    ours["the_dog"] = torch.tensor([check.THE_DOG_EXPECTED])
    rows = {r["check"]: r for r in check.compare(reference, ours, inputs)}
    assert rows['"The dog" greedy = transformers\' test']["passed"]
