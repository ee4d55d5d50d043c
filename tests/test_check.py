"""The checker passes the reference and correct rewrites by a wide margin, and fails every single-point mistake a
student (or a careful imitator) can make, inside and outside the handout's masks, by a wide margin too."""
import json
import os
import subprocess
import sys

import pytest
import torch

from course_utils import UserError, load_script
from gpt2_helpers import CHECKER, MODELING, ROOT, TINY

check = load_script(CHECKER)
N_ROWS = 15  # checks per weight set
MARGIN = 10  # a wrong file fails some check by >= 10x its tolerance; a correct one stays under 1/10 everywhere


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread on a loaded 2-core machine; restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (name, text in the reference, its mistaken replacement, the module the checker must blame first or None)
MUTANTS = [
    ("exact GELU instead of tanh GELU",
     "return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))",
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
    ("positions off by one", "position_ids = torch.arange(past_length, past_length + length,",
     "position_ids = torch.arange(past_length + 1, past_length + length + 1,", "embeddings"),
    ("positions ignore the cache", "position_ids = torch.arange(past_length, past_length + length,",
     "position_ids = torch.arange(0, length,", None),
    ("no attention residual", "hidden_states = hidden_states + attn_output  # residual",
     "hidden_states = attn_output  # residual", "block 0 ln_2"),
    ("no MLP residual", "hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))",
     "hidden_states = self.mlp(self.ln_2(hidden_states))", None),
    ("ln_1 reused before the MLP", "self.mlp(self.ln_2(hidden_states))", "self.mlp(self.ln_1(hidden_states))",
     "block 0 ln_2"),
    ("heads merged without transpose", "output = output.transpose(1, 2).reshape(batch, length, width)",
     "output = output.reshape(batch, length, width)", "block 0 attention"),
    ("q and k swapped", "query, key, value = self.c_attn(hidden_states).split(width, dim=2)",
     "key, query, value = self.c_attn(hidden_states).split(width, dim=2)", "block 0 attention"),
    ("softmax over the wrong axis", "weights = F.softmax(scores, dim=-1)", "weights = F.softmax(scores, dim=-2)",
     "block 0 attention"),
    ("no final LayerNorm", "hidden_states = self.ln_f(hidden_states)", "hidden_states = hidden_states", "final norm"),
    ("no position embedding", "hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))",
     "hidden_states = self.drop(inputs_embeds)", "embeddings"),
    ("loss without the shift", "shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]", "shift_labels = labels",
     None),
    ("untied head", '_tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}', "_tied_weights_keys = {}",
     None),
    ("SDPA without the causal flag", "is_causal=attention_mask is None and length > 1", "is_causal=False", None),
    ("SDPA ignores the mask", "query, key, value, attn_mask=attention_mask,", "query, key, value, attn_mask=None,",
     None),
    ("cache not used", "key, value = cache.update(key, value, self.layer_idx)",
     "cache.update(key, value, self.layer_idx)", None),
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
    inputs = dict(inputs, teacher=reference["teacher_inputs"])
    return check.compare(reference, check.run_checks_on(module.GPT2LMHeadModel, weights, inputs), inputs)


def test_reference_passes_every_check(tiny_setup):
    rows = run_candidate(MODELING, tiny_setup)
    assert [r["check"] for r in rows if not r["passed"]] == []
    assert len(rows) == N_ROWS
    assert max(r["ratio"] for r in rows) < 1 / MARGIN
    assert tiny_setup[2]["low_precision"] == []  # transformers' GPT-2 computes all in float64 there


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


# ----------------------------------------------------------------------------------------------------------
# Hand-written wrong variants and correct rewrites, on three kinds of weights, with the margin both ways
# ----------------------------------------------------------------------------------------------------------

BLOCK = "class GPT2Block(GradientCheckpointingLayer):"
LN2 = "hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))"
SOFTMAX = "weights = F.softmax(scores, dim=-1).type(value.dtype)"
GELU = "return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))"


def layer_norm_by_hand(body):
    """A hand-written LayerNorm used in place of ln_2 (body: the normalising expression of x, mean, var, ln)."""
    helper = ("def layer_norm(ln, x):\n    mean = x.mean(-1, keepdim=True)\n"
              f"    var = (x - mean).pow(2).mean(-1, keepdim=True)\n    return {body}\n\n\n" + BLOCK)
    return [(BLOCK, helper), (LN2, "hidden_states = hidden_states + self.mlp(layer_norm(self.ln_2, hidden_states))")]


# (name, [(text of the reference, its replacement), ...]): mistakes a student or a careful imitator could make
WRONG_VARIANTS = [
    ('exact GELU (F.gelu)', [('self.act = gelu_new', 'self.act = F.gelu')]),
    ('GELU constant 0.0447', [('0.044715 * torch.pow', '0.0447 * torch.pow')]),
    ('GELU with x squared', [('torch.pow(x, 3.0)', 'torch.pow(x, 2.0)')]),
    ('MLP without its dropout', [('return self.dropout(hidden_states)', 'return hidden_states')]),
    ('attention without resid_dropout', [
        ('output = self.resid_dropout(self.c_proj(output))',
         'output = self.c_proj(output)'),
    ]),
    ('attention probabilities not dropped', [
        ('torch.matmul(self.attn_dropout(weights), value)',
         'torch.matmul(weights, value)'),
    ]),
    ('dropout on the scores, before softmax', [
        (SOFTMAX,
         'weights = F.softmax(self.attn_dropout(scores), dim=-1).type(value.dtype)'),
        ('torch.matmul(self.attn_dropout(weights), value)',
         'torch.matmul(weights, value)'),
    ]),
    ('resid_dropout before c_proj', [
        ('self.resid_dropout(self.c_proj(output))',
         'self.c_proj(self.resid_dropout(output))'),
    ]),
    ('MLP dropout after GELU, not after c_proj', [
        ('hidden_states = self.act(hidden_states)',
         'hidden_states = self.dropout(self.act(hidden_states))'),
        ('return self.dropout(hidden_states)',
         'return hidden_states'),
    ]),
    ('embedding dropout before adding positions', [
        ('self.drop(inputs_embeds + self.wpe(position_ids))',
         'self.drop(inputs_embeds) + self.wpe(position_ids)'),
    ]),
    ('MLP dropout with attn_pdrop', [
        ('self.dropout = nn.Dropout(config.resid_pdrop)',
         'self.dropout = nn.Dropout(config.attn_pdrop)'),
    ]),
    ('extra dropout after the final LayerNorm', [
        ('hidden_states = self.ln_f(hidden_states)',
         'hidden_states = self.drop(self.ln_f(hidden_states))'),
    ]),
    ('F.dropout without training=: dropout in eval too', [
        ('return self.dropout(hidden_states)',
         'return F.dropout(hidden_states, self.dropout.p)'),
    ]),
    ('LayerNorm by hand, eps outside the sqrt', layer_norm_by_hand(
        '(x - mean) / (var.sqrt() + ln.eps) * ln.weight + ln.bias')),
    ('LayerNorm by hand, unbiased variance', layer_norm_by_hand(
        '(x - mean) / torch.sqrt(x.var(-1, keepdim=True) + ln.eps) * ln.weight + ln.bias')),
    ('mask filled with -inf (NaN on padded rows)', [('torch.finfo(scores.dtype).min)', "float('-inf'))")]),
    ('positions from the attention mask', [
        ('position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device).unsqueeze(0)',
         'position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device).unsqueeze(0)\n'
         '            if attention_mask is not None:\n'
         '                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]'),
    ]),
    ('scale by the width, not the head size', [
        ('self.scale = self.head_dim**-0.5 if',
         'self.scale = config.hidden_size**-0.5 if'),
    ]),
    ('softmax in bfloat16', [(SOFTMAX, 'weights = F.softmax(scores.bfloat16(), dim=-1).type(value.dtype)')]),
    ('labels padded with token 0, not -100', [
        ('F.pad(labels, (0, 1), value=-100)',
         'F.pad(labels, (0, 1), value=0)'),
    ]),
    ("query/key/value without c_attn's bias", [
        ('self.c_attn(hidden_states).split(width, dim=2)',
         '(hidden_states @ self.c_attn.weight).split(width, dim=2)'),
    ]),
    ('mask value of float64 (-inf in float32: NaN on padded rows)', [
        ('torch.finfo(scores.dtype).min)',
         'torch.finfo(torch.float64).min)'),
    ]),
    ('no position embeddings when given inputs_embeds', [
        ('self.drop(inputs_embeds + self.wpe(position_ids))',
         'self.drop(inputs_embeds + (self.wpe(position_ids) if input_ids is not None else 0))'),
    ]),
    ('num_items_in_batch: mean, then divided again', [
        ('reduction = "sum" if num_items_in_batch is not None else "mean"', 'reduction = "mean"'),
    ]),
    ('logits_to_keep ignored', [
        ('if isinstance(logits_to_keep, int) and logits_to_keep > 0:', 'if False:'),
    ]),
    ('no mask for a chunk after the cache (SDPA causal from the top left)', [
        ('if attention_mask is None and (past_length == 0 or length == 1):',
         'if attention_mask is None:'),
    ]),
]

# Rewrites that compute the same function: each must pass by a wide margin.
CORRECT_REWRITES = [
    ("F.gelu(x, approximate='tanh')", [
        ('self.act = gelu_new',
         'self.act = lambda x: F.gelu(x, approximate="tanh")'),
    ]),
    ('x @ W + b instead of addmm', [
        ('out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)\n        return '
         'out.view(*x.shape[:-1], self.nf)',
         'return x @ self.weight + self.bias'),
    ]),
    ('softmax in float32', [(SOFTMAX, 'weights = F.softmax(scores.float(), dim=-1).type(value.dtype)')]),
    ('1 / math.sqrt(d)', [('self.scale = self.head_dim**-0.5 if', 'self.scale = 1 / math.sqrt(self.head_dim) if')]),
    ('GELU as Megatron writes it, x * (1 + c x^2)', [
        (GELU,
         'return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * x * (1.0 + 0.044715 * x * x)))'),
    ]),
    ('LayerNorm by hand', layer_norm_by_hand("(x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias")),
    ('LayerNorm upcast to float32', layer_norm_by_hand(
        'F.layer_norm(x.float(), x.shape[-1:], ln.weight.float(), ln.bias.float(), ln.eps).type_as(x)')),
    ('query scaled before the product', [
        ('scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale',
         'scores = torch.matmul(query * self.scale, key.transpose(-1, -2))'),
    ]),
    ('einsum attention scores', [
        ('torch.matmul(query, key.transpose(-1, -2))',
         "torch.einsum('bhqd,bhkd->bhqk', query, key)"),
    ]),
    ('torch.where mask instead of an additive one', [
        ('scores = scores + bias.masked_fill(~allowed, torch.finfo(scores.dtype).min)',
         'scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)'),
    ]),
    ('F.dropout with training=self.training', [
        ('return self.dropout(hidden_states)',
         'return F.dropout(hidden_states, self.dropout.p, self.training)'),
    ]),
]


def apply(edits):
    text = MODELING.read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} no longer matches the reference exactly once"
        text = text.replace(old, new)
    return text


def standard_init(directory, **config):
    """A checkpoint as GPT2LMHeadModel(GPT2Config(...)) makes it: std 0.02, zero biases, unit LayerNorms."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(directory)
    return directory


def pretrained_like(directory):
    """What Pretraining.py leaves: a standard-initialised GPT-2 after some AdamW steps (biases no longer 0)."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(standard_init(directory, **{**TINY, "n_layer": 3}))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        ids = torch.randint(0, 60, (4, 32), generator=gen)  # a small "language": 60 of the 300 tokens
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def weight_sets(tmp_path_factory, tiny_setup):
    """Three kinds of weights a user may pass, each with its inputs and reference outputs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path_factory.mktemp("weight_sets")
    dirs = {"stress": tiny_setup[0], "standard init": standard_init(base / "standard", **TINY),
            "pretrained": pretrained_like(base / "pretrained")}
    sets = {}
    for name, directory in dirs.items():
        inputs = check.make_inputs(GPT2Config.from_pretrained(directory))
        reference = check.run_checks_on(GPT2LMHeadModel, directory, inputs)
        sets[name] = (directory, dict(inputs, teacher=reference["teacher_inputs"]), reference)
    return sets


def worst_ratio(source, tmp_path, weight_set):
    """(max of measured/tolerance over the rows, that row's name) for a source file on one weight set."""
    path = tmp_path / f"candidate_{abs(hash(source))}.py"
    path.write_text(source)
    directory, inputs, reference = weight_set
    outputs = check.run_checks_on(check.load_module(path).GPT2LMHeadModel, directory, inputs)
    rows = check.compare(reference, outputs, inputs)
    worst = max(rows, key=lambda r: r["ratio"])
    return worst["ratio"], worst["check"], rows


@pytest.mark.parametrize("name,edits", WRONG_VARIANTS, ids=[v[0] for v in WRONG_VARIANTS])
def test_wrong_variant_fails_by_a_wide_margin_on_every_weight_set(tmp_path, weight_sets, name, edits):
    source = apply(edits)
    for set_name, weight_set in weight_sets.items():
        ratio, row, rows = worst_ratio(source, tmp_path, weight_set)
        assert ratio >= MARGIN, f"{name} on {set_name}: worst check {row} only {ratio:.3g}x its tolerance"
        assert any(not r["passed"] for r in rows)


@pytest.mark.parametrize("name,edits", CORRECT_REWRITES, ids=[v[0] for v in CORRECT_REWRITES])
def test_correct_rewrite_passes_by_a_wide_margin_on_every_weight_set(tmp_path, weight_sets, name, edits):
    source = apply(edits)
    for set_name, weight_set in weight_sets.items():
        ratio, row, rows = worst_ratio(source, tmp_path, weight_set)
        assert ratio <= 1 / MARGIN, f"{name} on {set_name}: {row} at {ratio:.3g}x its tolerance"
        assert all(r["passed"] for r in rows)


def test_the_issues_examples_on_the_exact_standard_init_model(tmp_path):
    """GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64)) as the issue made it (vocabulary 50257)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = standard_init(tmp_path / "standard", n_layer=2, n_head=4, n_embd=64)
    inputs = check.make_inputs(GPT2Config.from_pretrained(directory), length=12)
    reference = check.run_checks_on(GPT2LMHeadModel, directory, inputs)
    weight_set = (directory, dict(inputs, teacher=reference["teacher_inputs"]), reference)
    wrong = dict(WRONG_VARIANTS)
    issue = ("exact GELU (F.gelu)", "GELU constant 0.0447", "MLP without its dropout",
             "attention without resid_dropout")
    for name in issue:
        ratio, row, _rows = worst_ratio(apply(wrong[name]), tmp_path, weight_set)
        assert ratio >= MARGIN, (name, row, ratio)
    for name, edits in CORRECT_REWRITES[:2]:  # (all of them run on the three tiny weight sets above)
        ratio, row, _rows = worst_ratio(apply(edits), tmp_path, weight_set)
        assert ratio <= 1 / MARGIN, (name, row, ratio)


def test_wrong_variants_name_the_module(tmp_path, weight_sets):
    """The note of a failing file points at the module where the mistake is."""
    wrong = dict(WRONG_VARIANTS)
    cases = {"GELU constant 0.0447": "block 0 MLP", "MLP without its dropout": "block 0 MLP",
             "attention without resid_dropout": "block 0 attention",
             "LayerNorm by hand, eps outside the sqrt": "block 0 ln_2"}
    for name, module in cases.items():
        _ratio, _row, rows = worst_ratio(apply(wrong[name]), tmp_path, weight_sets["stress"])
        notes = " ".join(r["note"] for r in rows if not r["passed"])
        assert f"first divergence: {module}" in notes, (name, notes)


def test_float32_inside_a_module_is_noticed_and_held_to_float32s_tolerance(tmp_path, weight_sets):
    _directory, inputs, reference = weight_sets["stress"]
    source = apply(dict(CORRECT_REWRITES)["softmax in float32"])
    _ratio, _row, rows = worst_ratio(source, tmp_path, weight_sets["stress"])
    assert "float32 inside block 0 attention, block 1 attention" in rows[0]["note"]
    tolerances = {r["check"]: r["tolerance"] for r in rows}
    logits_scale = float(reference["logits"][inputs["attention_mask"].bool()].abs().max())
    assert tolerances["float64: logits, padded batch"] == pytest.approx(check.TOLERANCE["float32"] * logits_scale)


def test_masked_handout_is_rejected_with_the_line(tmp_path):
    masked = tmp_path / "modeling_gpt2.py"
    lines = MODELING.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if "self.act = gelu_new" in line)
    lines[number] = lines[number].replace("gelu_new", "[MASK]")
    masked.write_text("\n".join(lines))
    with pytest.raises(UserError, match=f"line {number + 1}"):
        check.load_module(masked)


def _run_cli(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # no PYTHONPATH: the script finds course_utils next to itself
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(CHECKER), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


def test_cli_passes_reference_and_writes_json(tmp_path, tiny_setup):
    weights = tiny_setup[0]
    out = tmp_path / "result.json"
    result = _run_cli("--model", str(weights), "--json", str(out), "-f", "/ignored/kernel.json")  # a notebook's argv
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ALL CHECKS PASSED ({2 * N_ROWS}/{2 * N_ROWS})" in result.stdout  # the weights given, and stress weights
    data = json.loads(out.read_text())
    assert data["passed"] is True and len(data["checks"]) == 2 * N_ROWS
    assert str(weights) in data["weights"] and "stress weights" in data["weight_sets"][1]["weights"]
    assert all(r["ratio"] < 1 / MARGIN for r in data["checks"])


def test_cli_fails_a_broken_file_with_exit_1_and_names_the_module(tmp_path, tiny_setup):
    broken = tmp_path / "modeling_gpt2.py"
    broken.write_text(MODELING.read_text().replace("self.act = gelu_new", "self.act = F.relu"))
    result = _run_cli("--file", str(broken), "--model", str(tiny_setup[0]))
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "first divergence: block 0 MLP" in result.stdout


def test_cli_clear_errors(tmp_path):
    missing = _run_cli("--file", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("Error: ")
    bad_dir = _run_cli("--model", str(tmp_path / "no" / "such" / "dir"))
    assert bad_dir.returncode == 2 and "no such model directory" in bad_dir.stderr
    syntax = tmp_path / "modeling_gpt2.py"
    syntax.write_text("class GPT2LMHeadModel(:\n")
    result = _run_cli("--file", str(syntax))
    assert result.returncode == 2 and "does not import" in result.stderr and "Traceback" not in result.stderr
    typo = _run_cli("--jsn", "out.json")  # a typo is an error, not silently ignored
    assert typo.returncode == 2 and typo.stderr.startswith("Error: unrecognized arguments: --jsn out.json")


def test_cli_checks_exact_gelu_weights_as_gpt2(tmp_path, tiny_setup):
    """Weights from Pretraining.py (exact GELU by default) are checked as GPT-2 (tanh GELU), and it says so; the
    user's directory is left as it was."""
    model = check.sensitive_random_gpt2(**TINY)
    model.config.activation_function = "gelu"
    model.save_pretrained(tmp_path / "exact-gelu")
    before = (tmp_path / "exact-gelu" / "config.json").read_text()
    result = _run_cli("--model", str(tmp_path / "exact-gelu"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained with the activation 'gelu'; checked as GPT-2" in result.stdout
    assert f"ALL CHECKS PASSED ({2 * N_ROWS}/{2 * N_ROWS})" in result.stdout
    assert (tmp_path / "exact-gelu" / "config.json").read_text() == before
    broken = tmp_path / "modeling_gpt2.py"  # an exact GELU in the file under check is still a mistake
    broken.write_text(MODELING.read_text().replace("self.act = gelu_new", "self.act = F.gelu"))
    assert _run_cli("--file", str(broken), "--model", str(tmp_path / "exact-gelu")).returncode == 1


def test_offline_fallback_message(monkeypatch, tmp_path, capsys):
    """With no model/gpt2-base and no network, random weights at 124M's shape are used and said so."""
    monkeypatch.setattr(check, "DEFAULT_MODEL", tmp_path / "model" / "gpt2-base")
    monkeypatch.setattr(check, "ROOT", tmp_path)
    def offline(path, hub_id, *args, **kwargs):  # not on disk, not in the hub cache, and no network
        raise check.UserError(f"{path} not found and the Hugging Face hub cannot be reached (no network, or "
                              f"HF_HUB_OFFLINE=1): put the files of hub id `{hub_id}` at {path}.")
    monkeypatch.setattr(check, "local_or_hub", offline)
    calls = []
    real_random = check.sensitive_random_gpt2

    def tiny_random(seed=check.SEED, **overrides):  # the 124M shape itself is tested below; keep this fast
        calls.append((seed, overrides))
        return real_random(seed, **TINY)

    monkeypatch.setattr(check, "sensitive_random_gpt2", tiny_random)
    directory, description, real = check.prepare_weights(str(check.DEFAULT_MODEL), tmp_path, default_used=True)
    printed = capsys.readouterr().out
    assert "no network" in printed and "random weights at GPT-2 124M's shape" in printed
    assert "model/gpt2-base" in printed
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
