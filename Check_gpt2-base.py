"""Task 4 checker: prove that a hand-written `modeling_gpt2.py` computes exactly what transformers' GPT-2 does.

    python Check_gpt2-base.py                                  # checks gpt2/modeling_gpt2.py
    python Check_gpt2-base.py --file my_modeling_gpt2.py       # checks a completed handout
    python Check_gpt2-base.py --model model/gpt2-base --json result.json

Weights: `--model DIR` (default `model/gpt2-base`); if that directory is missing, the hub id `gpt2`; if there
is no network either, random "stress" weights at GPT-2 124M's shape with a fixed seed. Whatever the weights,
the checks also run on small stress weights (every parameter random, biases non-zero), which show mistakes
that GPT-2's own initialisation hides (a forgotten bias changes nothing when every bias is 0).

Both models run with the textbook ("eager") attention and TF32 off: one pass in float32, as students train,
then everything in float64, where a correct file agrees with transformers to ~1e-15, so the tolerance can be
1e-8 of each tensor's scale and a mistake of one part in a million still fails by a factor 100. Each module
is also checked on its own, fed the reference's input to it ("teacher forcing"), and a train-mode forward and
backward with a fixed seed checks the dropouts: they are part of the answer. Each check prints one row:
PASS/FAIL, the measured difference, the tolerance and their ratio; a failure names the first module whose
output diverges. The exit code is 0 only if every check passes.

The grader (`instructor/grade.py`) reuses `run_checks_on` and `compare` from this file: a student's model
computes its outputs in a sandboxed process, and the comparison happens here, in the grader's process.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from course_utils import (
    GELU_KERNELS,
    ArgumentParser,
    UserError,
    atomic_path,
    load_script,
    local_or_hub,
    parse_args,
    pick_device,
    run_main,
    script_dir,
)

ROOT = Path(script_dir(globals()))  # pasted into a notebook cell: the current directory, the repository root
DEFAULT_FILE = ROOT / "gpt2" / "modeling_gpt2.py"
DEFAULT_MODEL = ROOT / "model" / "gpt2-base"
HUB_ID = "gpt2"
# Tolerances relative to the largest entry of the reference tensor. float64: a correct file is at ~1e-15; a GELU
# constant off by 3e-4 (0.0447) moves outputs by ~1e-6, 100x this tolerance. (A constant written to 8 digits, like
# Megatron's 0.79788456 for sqrt(2/pi), moves them by ~1e-9 to 3e-9: it passes, but near the tolerance.)
# float32: ~1e-7 per rounding.
# Gradients get 10x more: each is a sum over every token, and GELU's slope amplifies a constant's last digits.
TOLERANCE = {"float64": 1e-8, "float64 gradients": 1e-7, "float32": 1e-4, "float32 gradients": 1e-3}
LOSS_TOLERANCE = 1e-5  # float32 cross-entropy, relative to the loss when that exceeds 1
TINY_SCALE = 1e-30  # a reference tensor that is all zeros is compared with an (almost) absolute tolerance
# Train mode: a distinct probability per kind of dropout, so that using one in place of another shows.
TRAIN_DROPOUT = dict(embd_pdrop=0.1, attn_pdrop=0.2, resid_pdrop=0.3)
TRAIN_SEED = 4321
GRADIENT_ROWS = 256  # of a larger gradient matrix, this many fixed random rows are compared
# The stress weights every run also checks (small: a few seconds).
STRESS_SHAPE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=96, vocab_size=300, bos_token_id=0, eos_token_id=0)
NEW_TOKENS = 32
SEED = 0
# transformers' own integration test: greedy continuation of "The dog" with the real gpt2 weights.
THE_DOG = [464, 3290]
THE_DOG_EXPECTED = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262, 13, 198, 198,
                    464, 3290]


# ----------------------------------------------------------------------------------------------------------
# Loading the file under test and the weights
# ----------------------------------------------------------------------------------------------------------

def load_module(path):
    """Import a modeling file from its path, under a name of its own (so it never shadows gpt2/), afresh on every
    call: a notebook that checks the file again after an edit must get the edit, not the module loaded before."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}; give the modeling file to check with --file.")
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if "[MASK]" in line:
            raise UserError(f"{path} still has a [MASK] on line {number}: fill in every [MASK] first.")
    name = f"checked_modeling_gpt2_{abs(hash(str(path.resolve())))}"
    sys.modules.pop(name, None)  # else load_script would hand back the module of an earlier check
    try:
        module = load_script(path, name)
    except Exception as error:  # a student's file can fail in any way; report it in one line
        raise UserError(f"{path} does not import ({type(error).__name__}: {error}): fix it and check again.") from None
    if not hasattr(module, "GPT2LMHeadModel"):
        raise UserError(f"{path} defines no GPT2LMHeadModel class: the checker loads the model from that class.")
    return module


def sensitive_random_gpt2(seed=SEED, **config_overrides):
    """transformers' GPT2LMHeadModel with random weights chosen so that every single-point bug shows.

    GPT-2's own initialisation (std 0.02, zero biases, unit LayerNorms) hides many mistakes: a forgotten
    bias or a swapped LayerNorm weight/bias changes nothing when biases are 0 and weights are 1, and small
    pre-activations make the tanh-GELU and the exact GELU almost equal. So every parameter is random here:
    matrices scaled for unit-size activations (the MLP's input larger, to exercise GELU's curve), non-zero
    biases, LayerNorm weights around 1. Logits stay of order 1.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    settings.update(config_overrides)
    config = GPT2Config(**settings)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    width = config.n_embd
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "transformer.wte.weight":  # also the output layer: keeps logits of order 1
                param.normal_(0.0, 0.5 / math.sqrt(width))
            elif name == "transformer.wpe.weight":
                param.normal_(0.0, 1.0)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.normal_(1.0, 0.2)
            elif name.endswith("c_fc.weight"):
                param.normal_(0.0, 2.0 / math.sqrt(param.shape[0]))  # pre-activations of size ~2
            elif name.endswith(".weight"):
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[0]))
            else:  # every bias, LayerNorm biases included
                param.normal_(0.0, 0.2)
    return model


def prepare_weights(model_arg, workdir, default_used):
    """Return (directory with config + weights, description, whether these are the real gpt2 weights).

    A local directory, else the hub cache, else a download; for the default only, with neither: random weights."""
    model_dir = Path(model_arg)
    if model_dir.is_dir():
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir} has no config.json: download all files of the hub repo '{HUB_ID}' into it.")
        config = json.loads((model_dir / "config.json").read_text())
        real = config.get("n_embd") == 768 and config.get("n_layer") == 12 and config.get("vocab_size") == 50257
        return model_dir, f"weights from {model_dir}", real
    hub_id = HUB_ID if default_used else model_arg
    if not default_used and os.sep in model_arg:
        raise UserError(f"no such model directory: {model_arg}; give --model a directory with config.json and "
                        f"the weights, or a hub id.")
    try:
        found = local_or_hub(model_arg, hub_id, ROOT, announce=lambda text: print(text, flush=True))
        return Path(found), f"weights of '{hub_id}' from the hub", hub_id == HUB_ID
    except UserError as error:
        if not default_used:
            raise
        why = str(error)  # not on disk, not in the hub cache, and no network (or the download failed)
    print(f"{why} So the check runs on random weights at GPT-2 124M's shape (seed {SEED}) instead.", flush=True)
    target = Path(workdir) / "random"
    sensitive_random_gpt2().save_pretrained(target)
    where = DEFAULT_MODEL.relative_to(ROOT)
    return target, f"random weights at GPT-2 124M's shape (seed {SEED}; {where} could not be found or fetched)", False


# ----------------------------------------------------------------------------------------------------------
# The inputs every model sees
# ----------------------------------------------------------------------------------------------------------

def token_batch(config, gen, batch, length, padding):
    """Random token ids and their attention mask; padding[r] = (first, end) of row r's padding (None: none)."""
    import torch

    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row, span in enumerate(padding):
        if span:
            attention_mask[row, span[0]:span[1]] = 0
    pad_id = config.eos_token_id if config.eos_token_id is not None and config.eos_token_id < config.vocab_size else 0
    return input_ids.masked_fill(attention_mask == 0, pad_id), attention_mask, pad_id


def make_inputs(config, seed=SEED, length=24):
    """The batches and probe tensors every model sees. Same seed, same inputs.

    The main batch (forward, backward, train mode) has padding at the end of one row and in the middle of
    another, never at the start: so every token, padding included, sees at least one real token, and no row
    of the attention is masked out entirely (a softmax over nothing is where a correct float32 softmax and
    float64 part ways). The generation, KV-cache and SDPA checks use left padding, as generate() wants.
    A second, smaller batch feeds the teacher-forced module checks, so the reference's internals handed to
    the candidate for those say nothing about the main batch.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids, attention_mask, pad_id = token_batch(config, gen, 3, length, (None, (length - 5, length), (7, 12)))
    left_ids, left_mask, _ = token_batch(config, gen, 3, length, (None, (0, 5), (0, 11)))
    teacher_ids, teacher_mask, _ = token_batch(config, gen, 2, max(8, length * 2 // 3), (None, (5, 8)))
    width = config.n_embd
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
        "pad_id": pad_id,
        "left_ids": left_ids,
        "left_mask": left_mask,
        "teacher_ids": teacher_ids,
        "teacher_mask": teacher_mask,
        # LayerNorm probe: inputs of variance ~1e-6, where the epsilon (1e-5) decides the output.
        "norm_probe": torch.randn(2, 5, width, generator=gen) * 1e-3 + torch.randn(2, 5, 1, generator=gen) * 1e-3,
        # MLP probe: scaled per block (see mlp_probe_scale) so GELU's pre-activations are of size ~1.5, where the
        # tanh-GELU, the exact GELU and a GELU with a slightly wrong constant differ most.
        "mlp_probe": torch.randn(2, 5, width, generator=gen),
    }


def module_trace_names(n_layer):
    """The modules whose outputs we record, in the order the data flows through them."""
    names = [("embeddings", "transformer.h.0")]  # the input of block 0 is the embeddings' output
    for i in range(n_layer):
        names += [(f"block {i} ln_1", f"transformer.h.{i}.ln_1"), (f"block {i} attention", f"transformer.h.{i}.attn"),
                  (f"block {i} ln_2", f"transformer.h.{i}.ln_2"), (f"block {i} MLP", f"transformer.h.{i}.mlp")]
    names += [("final norm", "transformer.ln_f"), ("head", "lm_head")]
    return names


# ----------------------------------------------------------------------------------------------------------
# Running one implementation: everything it computes goes into a dict of tensors
# ----------------------------------------------------------------------------------------------------------

def first_tensor(value):
    """A module's main output: the tensor itself, or the first element of the tuple it returns."""
    import torch

    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def with_first_tensor(args, kwargs, value):
    """(args, kwargs) of a module call with its hidden-states input replaced by `value` (teacher forcing)."""
    if args:
        return (value,) + tuple(args[1:]), kwargs
    for key in ("hidden_states", "x", "input", "inputs"):
        if key in kwargs:
            return args, {**kwargs, key: value}
    return args, kwargs


class PrecisionWatch:
    """Notes which modules compute anything in a precision below the model's float64.

    A module that does part of its work in float32 (softmax in fp32, a LayerNorm upcast, a float32 constant
    tensor) is correct code, but in the float64 run it carries float32 rounding; such a module, and the
    whole-model checks, are then held to the float32 tolerance. Everything else is held to float64's.
    """

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        watch = self
        self.low, self.current = set(), None

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                watch.note(result)
                return result

        self.mode = Mode()

    def note(self, result):
        import torch

        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.low.update(("anywhere", self.current) if self.current else ("anywhere",))

    def label_hooks(self, model, names):
        """Hooks that tell the watch which module is running; returns the handles."""
        handles = []
        for label, name in names:
            module = get_module(model, name)
            if module is None or label == "embeddings":
                continue
            handles.append(module.register_forward_pre_hook(lambda *a, label=label: setattr(self, "current", label)))
            handles.append(module.register_forward_hook(lambda *a: setattr(self, "current", None)))
        return handles


def get_module(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def record_trace(model, names, trace, teacher=None):
    """Hooks that store each module's output in `trace`; with `teacher`, each module's input is first replaced
    by the reference's input to that module (teacher forcing), so each module is checked on its own."""
    handles = []

    def store(label):
        def hook(module, args, output):
            value = first_tensor(output)
            if value is not None and label not in trace:  # a module called twice: its first call counts
                trace[label] = value.detach().clone().cpu()
        return hook

    def store_input(label):  # the input of block 0: what the embeddings produced
        def hook(module, args, kwargs):
            value = first_tensor(args) if args else first_tensor(kwargs.get("hidden_states"))
            if value is not None:
                trace[label] = value.detach().clone().cpu()
        return hook

    def force(label):
        def hook(module, args, kwargs):
            value = teacher[label]
            device = next((t.device for t in list(args) + list(kwargs.values()) if hasattr(t, "device")), value.device)
            return with_first_tensor(args, kwargs, value.to(device))
        return hook

    for label, name in names:
        module = get_module(model, name)
        if module is None:
            continue
        if label == "embeddings":
            handles.append(module.register_forward_pre_hook(store_input(label), with_kwargs=True))
            continue
        if teacher is not None and label in teacher:
            handles.append(module.register_forward_pre_hook(force(label), with_kwargs=True))
        handles.append(module.register_forward_hook(store(label)))
    return handles


def remove(handles):
    for handle in handles:
        handle.remove()


def cache_of(result):  # transformers 5 calls it `cache`; older code `past_key_values`
    return result.cache if getattr(result, "cache", None) is not None else getattr(result, "past_key_values", None)


def weighted_sum(logits, mask):
    """A loss that weighs every logit of every real token with a fixed random number: its gradient reaches
    every parameter through every output, and (unlike the cross-entropy, which transformers computes in
    float32) it stays in float64."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 7)
    weights = torch.randn(logits.shape, generator=gen, dtype=torch.float64).to(logits.device, logits.dtype)
    return (logits * weights * mask[..., None].to(logits.dtype)).sum()


def gradients_of(model, dtype=None):
    """{name: gradient} of every parameter; of a large matrix, a fixed random sample of GRADIENT_ROWS rows only, so
    that two runs' float64 gradients at the 124M shape fit in memory (a wrong gradient is wrong in most rows)."""
    import torch

    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.detach()
        if grad.dim() == 2 and grad.shape[0] > GRADIENT_ROWS:  # the first rows (wpe: the positions used), and more
            rest = torch.randperm(grad.shape[0] - 32, generator=torch.Generator().manual_seed(grad.shape[0])) + 32
            rows = torch.cat([torch.arange(32), rest[:GRADIENT_ROWS - 32].sort().values])
            grad = grad[rows.to(grad.device)]
        grads[name] = grad.to(dtype or grad.dtype).cpu()
    return grads


def stage_parameters(model, out):
    out["parameters"] = [[name, list(p.shape)] for name, p in model.named_parameters()]
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    out["tied"] = bool(head.data_ptr() == embeddings.data_ptr())


def stage_float32(model, batch, out):
    """float32: the padded batch forward with labels and its backward, as a student's training would run it."""
    import torch

    ids, mask, labels = batch
    model.zero_grad(set_to_none=True)
    result = model(input_ids=ids, attention_mask=mask, labels=labels)
    out["logits32"] = result.logits.detach().float().cpu()
    out["loss32"] = result.loss.detach().float().cpu()
    result.loss.backward()
    out["gradients32"] = gradients_of(model, torch.float32)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # the same batch as embeddings (what PEFT's prompt tuning and generate(inputs_embeds=) pass)
        embeds = model.get_input_embeddings()(ids)
        out["logits32_embeds"] = model(inputs_embeds=embeds, attention_mask=mask).logits.float().cpu()
        # Only the last 3 positions' logits (generate() asks for 1), and the loss as Trainer computes it under
        # gradient accumulation: the sum over this batch divided by the token count of the whole accumulated batch.
        out["logits32_last3"] = model(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits.float().cpu()
        items = torch.tensor(int((labels[:, 1:] != -100).sum()) * 2 + 7, device=ids.device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
        out["loss32_items"] = loss.detach().float().cpu()


def forward_backward(model, batch, names, out, prefix=""):
    """One forward (recording each module's output) and the backward of `weighted_sum`."""
    ids, mask, _labels = batch
    model.zero_grad(set_to_none=True)
    trace = {}
    handles = record_trace(model, names, trace)
    try:
        every_layer = not prefix  # (not in train mode)
        result = model(input_ids=ids, attention_mask=mask, output_hidden_states=every_layer,
                       output_attentions=every_layer)
    finally:
        remove(handles)
        out[prefix + "trace"] = trace
    out[prefix + "logits"] = result.logits.detach().cpu()
    if not prefix:
        out["hidden_states"] = [h.detach().cpu() for h in (result.hidden_states or ())]
        out["attentions"] = [a.detach().cpu() for a in (result.attentions or ())]
    weighted_sum(result.logits, mask).backward()
    out[prefix + "gradients"] = gradients_of(model)
    model.zero_grad(set_to_none=True)


def stage_teacher(model, inputs, names, device, out):
    """Each module on the second batch. For the reference this records every module's input and output; for a
    candidate, every module gets the reference's input (teacher forcing) and its output is recorded."""
    import torch

    teacher = inputs.get("teacher")
    trace = {}
    handles = record_trace(model, names, trace, teacher)
    inputs_seen = {}
    if teacher is None:  # the reference: also keep what went into each module
        handles += record_inputs(model, names, inputs_seen)
    try:
        with torch.no_grad():
            model(input_ids=inputs["teacher_ids"].to(device), attention_mask=inputs["teacher_mask"].to(device))
    finally:
        remove(handles)
    if teacher is None:
        out["teacher_inputs"] = inputs_seen
    else:  # a module the candidate never called as a module: call it directly, where one input is all it takes
        with torch.no_grad():
            for label, name in names:
                module = get_module(model, name)
                if label not in trace and label in teacher and module is not None and "attention" not in label:
                    trace[label] = first_tensor(module(teacher[label].to(device))).detach().clone().cpu()
    out["teacher_outputs"] = trace


def record_inputs(model, names, seen):
    handles = []
    for label, name in names:
        module = get_module(model, name)
        if module is None or label == "embeddings":
            continue

        def hook(module, args, kwargs, label=label):
            value = first_tensor(args) if args else first_tensor(kwargs.get("hidden_states"))
            if value is not None:
                seen[label] = value.detach().clone().cpu()
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def mlp_probe_scale(model, i):
    """How much to scale the unit-size MLP probe so that block i's GELU inputs are of size ~1.5."""
    try:
        weight = model.get_parameter(f"transformer.h.{i}.mlp.c_fc.weight").detach()
    except AttributeError:
        return 1.0
    pre_activation_size = float(weight.double().pow(2).sum(0).mean().sqrt())  # for an input of unit size per entry
    return 1.5 / pre_activation_size if pre_activation_size > 0 else 1.0


def stage_probes(model, inputs, device, out):
    """Module by module: LayerNorms on tiny inputs (epsilon matters), MLPs where GELU's curve matters."""
    import torch

    norm_probe = inputs["norm_probe"].to(device, torch.float64)
    for i in range(model.config.n_layer):
        for norm in ("ln_1", "ln_2"):
            out[f"probe block {i} {norm}"] = model.get_submodule(f"transformer.h.{i}.{norm}")(norm_probe).cpu()
        mlp_probe = inputs["mlp_probe"].to(device, torch.float64) * mlp_probe_scale(model, i)
        out[f"probe block {i} MLP"] = first_tensor(model.get_submodule(f"transformer.h.{i}.mlp")(mlp_probe)).cpu()
    out["probe final norm"] = model.get_submodule("transformer.ln_f")(norm_probe).cpu()


def stage_sdpa(model, batch, out):
    """The default attention (SDPA): the same numbers as eager, up to rounding."""
    ids, mask, _labels = batch
    out["logits_left"] = model(input_ids=ids, attention_mask=mask).logits.cpu()  # eager, for the reference
    model.set_attn_implementation("sdpa")
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError("set_attn_implementation('sdpa') did not switch the model to SDPA")
    try:
        out["logits_sdpa"] = model(input_ids=ids, attention_mask=mask).logits.cpu()
        out["logits_sdpa_unpadded"] = model(input_ids=ids[:1]).logits.cpu()  # the mask-free fast path
    finally:
        model.set_attn_implementation("eager")


def stage_kv_cache(model, batch, out):
    """Feed the first half at once, then one token at a time through the cache."""
    ids, mask, _labels = batch
    # Positions count real tokens only (as generate() does), so padding does not shift them.
    half = ids.shape[1] // 2
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    out["full_logits_positions"] = full[:, half - 1:].cpu()
    step = model(input_ids=ids[:, :half], attention_mask=mask[:, :half], position_ids=positions[:, :half],
                 use_cache=True)
    cached = [step.logits[:, -1]]
    for t in range(half, ids.shape[1]):
        step = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=positions[:, t:t + 1],
                     cache=cache_of(step), use_cache=True)
        cached.append(step.logits[:, -1])
    out["cached_logits"] = stack(cached)
    out["cached_logits_plain"] = plain_cached_logits(model, ids[:1], half)


def plain_cached_logits(model, row, half):
    """Without position_ids and mask, on an unpadded row, with the default attention (SDPA): the model must count
    the cached tokens. After the first half, a chunk of 3 tokens goes in at once (each must see the cache and the
    tokens before it in the chunk), then one token at a time."""
    import torch

    model.set_attn_implementation("sdpa")
    try:
        step = model(input_ids=row[:, :half], use_cache=True)
        plain, t = [step.logits[:, -1:]], half
        while t < row.shape[1]:
            size = 3 if t == half else 1
            step = model(input_ids=row[:, t:t + size], cache=cache_of(step), use_cache=True)
            plain.append(step.logits)
            t += size
    finally:
        model.set_attn_implementation("eager")
    return torch.cat(plain, 1).cpu()


def stack(tensors):
    import torch

    return torch.stack(tensors, 1).cpu()


def stage_generation(model, batch, pad_id, out):
    """Greedy and sampled generation from the padded prompts; eos is held off so all 32 tokens come."""
    import torch

    ids, mask, _labels = batch
    common = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=pad_id)
    out["greedy"] = model.generate(ids, do_sample=False, **common).cpu()
    torch.manual_seed(1234)
    out["sampled"] = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **common).cpu()


def stage_real_weights(model, inputs, device, out):
    """With the real gpt2 weights: transformers' own "The dog" test and a reply to "Hello?"."""
    import torch

    if inputs.get("the_dog"):
        dog = torch.tensor([THE_DOG], device=device)
        out["the_dog"] = model.generate(dog, do_sample=False, max_new_tokens=len(THE_DOG_EXPECTED) - 2,
                                        pad_token_id=50256).cpu()
    if inputs.get("hello_ids") is not None:
        hello = inputs["hello_ids"].to(device)
        out["hello"] = model.generate(hello, do_sample=False, max_new_tokens=20, pad_token_id=50256).cpu()


def stage_train(model, batch, names, out):
    """Training behaviour: dropout on, the same seed right before the forward, so the same random draws in the
    same order give the same masks. A dropout missing, added, moved or with the wrong probability changes the
    numbers. (Dropout is drawn as transformers' GPT-2 draws it with eager attention: embeddings, then per block
    the attention probabilities, after the attention's c_proj, after the MLP's c_proj.)"""
    import torch

    model.train()
    torch.manual_seed(TRAIN_SEED)
    try:
        forward_backward(model, batch, names, out, prefix="train_")
    finally:
        model.eval()


def load_model(model_class, weights_dir, dtype, device, **config):
    model = model_class.from_pretrained(weights_dir, dtype=dtype, attn_implementation="eager", **config)
    return model.to(device).eval()


def run_checks_on(model_class, weights_dir, inputs, device="cpu"):
    """Load `model_class` from `weights_dir` and compute every output the comparison needs.

    This function is the only code that touches the model under test, and it returns plain tensors,
    lists and strings, so it can also run in a separate, sandboxed process (the grader does that).
    Each stage runs on its own: if one crashes, its error is recorded under "errors" and the others go on.
    First a float32 pass (what students run), then everything else in float64, where a correct file agrees
    with transformers to ~1e-15, so a tolerance of 1e-8 of each tensor's scale leaves a wide margin both ways.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"errors": {}}

    def stage(name, function, *args):
        try:
            function(*args)
        except Exception as error:
            out["errors"][name] = f"{type(error).__name__}: {error}"[:300]

    batch = tuple(inputs[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    left = (inputs["left_ids"].to(device), inputs["left_mask"].to(device), None)

    model = load_model(model_class, weights_dir, torch.float32, device)
    stage("parameters", stage_parameters, model, out)
    stage("float32", stage_float32, model, batch, out)
    with torch.no_grad():
        stage("default attention", stage_sdpa, model, left, out)
        stage("KV cache", stage_kv_cache, model, left, out)
        stage("generation", stage_generation, model, left, inputs["pad_id"], out)
    del model

    model = load_model(model_class, weights_dir, torch.float64, device, **TRAIN_DROPOUT)
    names = module_trace_names(model.config.n_layer)
    watch = PrecisionWatch()
    labels = watch.label_hooks(model, names)
    try:
        with watch.mode:
            stage("forward and backward", forward_backward, model, batch, names, out)
            stage("teacher forcing", stage_teacher, model, inputs, names, device, out)
            with torch.no_grad():
                stage("probes", stage_probes, model, inputs, device, out)
            stage("train mode", stage_train, model, batch, names, out)
    finally:
        remove(labels)
    out["low_precision"] = sorted(watch.low)
    with torch.no_grad():
        stage("real weights", stage_real_weights, model, inputs, device, out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparing: reference outputs against the candidate's, one row per check
# ----------------------------------------------------------------------------------------------------------

def relative_tolerance(low_precision, label="anywhere", kind=""):
    """float64's tolerance, or float32's where the candidate computed (part of) that module in float32."""
    return TOLERANCE[("float32" if label in low_precision else "float64") + kind]


def max_diff(ref, cand, where=None, rel=TOLERANCE["float32"]):
    """(max |ref - cand|, tolerance): the tolerance is `rel` times the reference's largest entry."""
    import torch

    if cand is None or not isinstance(cand, torch.Tensor) or cand.shape != ref.shape:
        return math.inf, rel * max_abs(ref)
    if where is not None:
        ref, cand = ref[where], cand[where]
    diff = torch.nan_to_num((ref.double() - cand.double()).abs(), nan=math.inf)
    return (float(diff.max()) if diff.numel() else 0.0), rel * max_abs(ref)


def max_abs(tensor):
    return max(float(tensor.abs().max()), TINY_SCALE) if tensor.numel() else 1.0


def ratio_of(measured, tolerance):
    if measured == 0:
        return 0.0
    return measured / tolerance if tolerance > 0 else math.inf


def worst_of(pairs):
    """pairs: {name: (measured, tolerance)} -> (name, measured, tolerance) of the worst ratio (name None if empty)."""
    worst = (None, 0.0, 1.0)
    for name, (measured, tolerance) in pairs.items():
        if worst[0] is None or ratio_of(measured, tolerance) > ratio_of(worst[1], worst[2]):
            worst = (name, measured, tolerance)
    return worst


def first_divergence(ref_trace, cand_trace, where, low_precision):
    """The first module (in data-flow order) whose output differs beyond tolerance, or None."""
    for label in ref_trace:
        diff, tol = max_diff(ref_trace[label], cand_trace.get(label), where, relative_tolerance(low_precision, label))
        if not diff <= tol:
            return label
    return None


def parameter_row(ref, cand):
    ref_params, cand_params = ref["parameters"], cand.get("parameters", [])
    missing = sorted({n for n, _ in ref_params} - {n for n, _ in cand_params})
    extra = sorted({n for n, _ in cand_params} - {n for n, _ in ref_params})
    shapes = {n: s for n, s in cand_params}
    wrong = [n for n, s in ref_params if n in shapes and shapes[n] != s]
    parts = (f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
             f"wrong shape {wrong[:3]}" if wrong else "", "" if cand.get("tied") else "lm_head not tied to wte")
    note = "; ".join(p for p in parts if p)
    return "parameter names and shapes", len(missing) + len(extra) + len(wrong) + (not cand.get("tied")), 0, note


def compare(ref, cand, inputs):
    """Compare the reference's outputs with the candidate's. Returns a list of result rows (dicts)."""
    c = Comparison(ref, cand, inputs)
    name, measured, tolerance, note = parameter_row(ref, cand)
    rows = [c.row(name, measured, tolerance, note, "parameters")]
    rows += float32_rows(c) + float64_rows(c) + real_weight_rows(ref, cand)
    float32_inside = sorted(c.low - {"anywhere"})
    if float32_inside:
        rows[0]["note"] = (rows[0]["note"] + "; " if rows[0]["note"] else "") + \
            "float32 inside " + ", ".join(float32_inside[:4]) + " (float32 tolerance there)"
    return rows


class Comparison:
    """What the rows of one comparison share: both sets of outputs, which tokens are real (padded positions carry
    no meaning: only real tokens are compared), the tolerances (float32's where the candidate computes in float32),
    the stages the candidate crashed in, and the first module whose output diverges."""

    def __init__(self, ref, cand, inputs):
        self.ref, self.cand = ref, cand
        self.real = inputs["attention_mask"].bool()
        self.teacher_real = inputs["teacher_mask"].bool()
        self.left_real = inputs["left_mask"].bool()
        self.low = set(cand.get("low_precision") or []) | set(ref.get("low_precision") or [])
        self.rel = relative_tolerance(self.low)
        self.grad_rel = relative_tolerance(self.low, kind=" gradients")
        self.errors = cand.get("errors", {})
        self.culprit = first_divergence(ref["trace"], cand.get("trace") or {}, self.real, self.low)
        self.train_culprit = first_divergence(ref["train_trace"], cand.get("train_trace") or {}, self.real, self.low)

    def row(self, name, measured, tolerance, note="", stage=None, blame=None):
        ok = measured <= tolerance
        if not ok and stage in self.errors:  # the candidate crashed in this stage: say how
            note = f"crashed: {self.errors[stage]}"
        elif not ok and blame:
            note = (note + "; " if note else "") + f"first divergence: {blame}"
        return {"check": name, "passed": bool(ok), "measured": measured, "tolerance": tolerance,
                "ratio": ratio_of(measured, tolerance), "note": note}

    def tensor_row(self, name, key, where=None, stage=None, blame=None):
        diff, tol = max_diff(self.ref[key], self.cand.get(key), where, self.rel)
        return self.row(name, diff, tol, "missing or wrong shape" if diff == math.inf else "", stage, blame)

    def tensors_row(self, name, key, stage, blame, rel):
        ref_dict, cand_dict = self.ref[key], self.cand.get(key) or {}
        pairs = {n: max_diff(r, cand_dict.get(n), None, rel) for n, r in ref_dict.items()}
        worst, measured, tol = worst_of(pairs)
        return self.row(name, measured, tol, f"worst: {worst}" if ratio_of(measured, tol) > 1 else "", stage, blame)


def float32_rows(c):
    """As students train and generate: logits, loss and gradients, the default attention, the KV cache, generate()."""
    ref, cand, f32 = c.ref, c.cand, TOLERANCE["float32"]
    return [
        logits32_row(ref, cand, c.real, f32, c.errors.get("float32"), c.culprit),
        loss_row(ref, cand, c.errors.get("float32"), c.culprit),
        c.tensors_row("float32: gradients of every parameter", "gradients32", "float32", c.culprit,
                      TOLERANCE["float32 gradients"]),
        sdpa_row(ref, cand, c.left_real, f32, c.errors.get("default attention")),
        kv_cache_row(ref, cand, c.left_real, f32, c.errors.get("KV cache")),
    ] + generation_rows(c)


def generation_rows(c):
    """Greedy and sampled generation (fixed seed) must give the very same token ids."""
    import torch

    rows = []
    for key, name in (("greedy", f"greedy generation, {NEW_TOKENS} tokens"), ("sampled", "sampling, fixed seed")):
        same = isinstance(c.cand.get(key), torch.Tensor) and c.cand[key].shape == c.ref[key].shape
        mismatches = int((c.cand[key] != c.ref[key]).sum()) if same else c.ref[key].numel()
        rows.append(c.row("float32: " + name + " (identical ids)", mismatches, 0,
                          f"{mismatches} ids differ" if mismatches else "", "generation"))
    return rows


def float64_rows(c):
    """float64, where a correct file agrees to ~1e-15: the whole model, every layer, each module on its own, the
    gradients, and train mode (dropout)."""
    ref, cand = c.ref, c.cand
    probes = {k[6:]: ref[k] for k in ref if k.startswith("probe ")}
    cand_probes = {k[6:]: cand[k] for k in cand if k.startswith("probe ")}
    return [
        c.tensor_row("float64: logits, padded batch", "logits", c.real, stage="forward and backward",
                     blame=c.culprit),
        hidden_states_row(ref, cand, c.real, c.rel, c.culprit),
        module_row("float64: each module on the reference's input", ref["teacher_outputs"],
                   cand.get("teacher_outputs"), c.teacher_real, c.low, c.errors.get("teacher forcing")),
        module_row("float64: module probes (LayerNorm eps, GELU curve)", probes, cand_probes, None, c.low,
                   c.errors.get("probes")),
        c.tensors_row("float64: gradients of every parameter", "gradients", "forward and backward", c.culprit,
                      c.grad_rel),
        c.tensor_row("float64: train mode (dropout, fixed seed): logits", "train_logits", c.real, stage="train mode",
                     blame=c.train_culprit),
        c.tensors_row("float64: train mode: gradients of every parameter", "train_gradients", "train mode",
                      c.train_culprit, c.grad_rel),
    ]


def loss_row(ref, cand, crash, culprit):
    """The float32 loss, plain and with Trainer's num_items_in_batch."""
    import torch

    def diff(key):
        ok = isinstance(cand.get(key), torch.Tensor) and cand[key].shape == ref[key].shape
        return abs(float(ref[key]) - float(cand[key])) if ok else math.inf

    plain, items = diff("loss32"), diff("loss32_items")
    tol = LOSS_TOLERANCE * max(1.0, abs(float(ref["loss32"])))
    note = "" if items <= tol else "wrong with num_items_in_batch (Trainer's gradient accumulation)"
    if max(plain, items) > tol and crash:
        note = f"crashed: {crash}"
    elif plain > tol and culprit:
        note = f"first divergence: {culprit}"
    measured = max(plain, items)
    return {"check": "float32: loss (labels, -100 ignored; num_items_in_batch)", "passed": measured <= tol,
            "measured": measured, "tolerance": tol, "ratio": ratio_of(measured, tol), "note": note}


def logits32_row(ref, cand, real, rel, crash, culprit):
    """float32 logits of the padded batch, given as token ids, as embeddings (inputs_embeds), and the last 3 only."""
    diff, tol = max_diff(ref["logits32"], cand.get("logits32"), real, rel)
    embeds, _ = max_diff(ref["logits32"], cand.get("logits32_embeds"), real, rel)
    last3, _ = max_diff(ref["logits32"][:, -3:], cand.get("logits32_last3"), real[:, -3:], rel)
    measured = max(diff, embeds, last3)
    note = "" if embeds <= tol else "wrong when called with inputs_embeds"
    note = note if last3 <= tol else "wrong with logits_to_keep=3"
    if measured > tol and crash:
        note = f"crashed: {crash}"
    elif diff > tol and culprit:
        note = f"first divergence: {culprit}"
    return {"check": "float32: logits, padded batch (ids; inputs_embeds; logits_to_keep)", "passed": measured <= tol,
            "measured": measured, "tolerance": tol, "ratio": ratio_of(measured, tol), "note": note}


def module_row(name, ref_outputs, cand_outputs, where, low, crash):
    """The worst module, each held to its own tolerance (float32's where that module computes in float32)."""
    cand_outputs = cand_outputs or {}
    pairs = {label: max_diff(r, cand_outputs.get(label), where, relative_tolerance(low, label))
             for label, r in ref_outputs.items()}
    worst, measured, tol = worst_of(pairs)
    ok = measured <= tol
    note = "" if ok else (f"crashed: {crash}" if crash else f"first divergence: {first_failing(pairs)}; worst: {worst}")
    return {"check": name, "passed": ok, "measured": measured, "tolerance": tol, "ratio": ratio_of(measured, tol),
            "note": note}


def first_failing(pairs):
    return next((label for label, (m, t) in pairs.items() if not m <= t), None)


def hidden_states_row(ref, cand, real, rel, culprit):
    ref_hidden, cand_hidden = ref["hidden_states"], cand.get("hidden_states") or []
    pairs = {i: max_diff(h, cand_hidden[i] if i < len(cand_hidden) else None, real, rel)
             for i, h in enumerate(ref_hidden)}
    worst, measured, tol = worst_of(pairs)
    note = "" if measured <= tol else f"hidden_states[{first_failing(pairs)}] differs first" + \
        (f"; first divergence: {culprit}" if culprit else "")
    if len(cand_hidden) != len(ref_hidden):
        measured, note = math.inf, f"{len(cand_hidden)} hidden states instead of {len(ref_hidden)}"
    ref_att, cand_att = ref["attentions"], cand.get("attentions") or []
    queries = real[:, None, :, None].expand(-1, ref_att[0].shape[1], -1, ref_att[0].shape[-1]) if ref_att else None
    for i, a in enumerate(ref_att):  # output_attentions=True: the attention probabilities of every layer
        diff, a_tol = max_diff(a, cand_att[i] if i < len(cand_att) else None, queries, rel)
        if ratio_of(diff, a_tol) > ratio_of(measured, tol):
            measured, tol = diff, a_tol
        if diff > a_tol and not note:
            note = f"attentions[{i}] (output_attentions=True) differ"
    return {"check": "float64: hidden states and attentions, every layer", "passed": measured <= tol,
            "measured": measured, "tolerance": tol, "ratio": ratio_of(measured, tol), "note": note}


def sdpa_row(ref, cand, real, rel, crash):
    diff, tol = max_diff(ref["logits_left"], cand.get("logits_sdpa"), real, rel)
    plain, _ = max_diff(ref["logits_left"][:1], cand.get("logits_sdpa_unpadded"), None, rel)  # row 0: no padding
    measured = max(diff, plain)
    note = f"crashed: {crash}" if crash and measured > tol else ""
    return {"check": "float32: default attention (SDPA) logits", "passed": measured <= tol, "measured": measured,
            "tolerance": tol, "ratio": ratio_of(measured, tol), "note": note}


def kv_cache_row(ref, cand, real, rel, crash):
    real = real[:, real.shape[1] // 2 - 1:]  # the positions decoded through the cache; padding carries no meaning
    diff, tol = max_diff(ref["full_logits_positions"], cand.get("cached_logits"), real, rel)
    plain, plain_tol = max_diff(ref["full_logits_positions"][:1], cand.get("cached_logits_plain"), None, rel)
    measured = max(diff, plain * tol / plain_tol)
    note = "" if plain <= plain_tol else ("wrong without position_ids (SDPA; 3 tokens at once, then 1 by 1): positions "
                                          "and the causal mask must continue after the cached tokens")
    if crash and measured > tol:
        note = f"crashed: {crash}"
    return {"check": "float32: KV-cache decoding = full forward", "passed": measured <= tol, "measured": measured,
            "tolerance": tol, "ratio": ratio_of(measured, tol), "note": note}


def real_weight_rows(ref, cand):
    import torch

    rows = []
    if "the_dog" in ref:
        got = cand.get("the_dog")
        got = got[0].tolist() if isinstance(got, torch.Tensor) else []
        wrong = sum(a != b for a, b in zip(got, THE_DOG_EXPECTED)) + abs(len(got) - len(THE_DOG_EXPECTED))
        rows.append({"check": '"The dog" greedy = transformers\' test', "passed": wrong == 0, "measured": wrong,
                     "tolerance": 0, "ratio": ratio_of(wrong, 0), "note": ""})
    if "hello" in ref:
        same = isinstance(cand.get("hello"), torch.Tensor) and torch.equal(cand["hello"], ref["hello"])
        rows.append({"check": 'reply to "Hello?" = reference', "passed": same, "measured": 0 if same else 1,
                     "tolerance": 0, "ratio": 0.0 if same else math.inf, "note": ""})
    return rows


def print_table(rows, file=sys.stdout):
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  result  {'measured':>9}  {'tolerance':>9}  {'ratio':>8}  note", file=file)
    print("-" * (width + 56), file=file)
    for r in rows:
        measured = f"{r['measured']:.2e}" if isinstance(r["measured"], float) else str(r["measured"])
        tolerance = f"{r['tolerance']:.2e}" if isinstance(r["tolerance"], float) else str(r["tolerance"])
        ratio = f"{r['ratio']:.1e}" if isinstance(r.get("ratio"), float) else "-"
        result = "PASS" if r["passed"] else "FAIL"
        print(f"{r['check']:<{width}}  {result:<6}  {measured:>9}  {tolerance:>9}  {ratio:>8}  {r['note']}", file=file)


# ----------------------------------------------------------------------------------------------------------

def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=str(DEFAULT_FILE),
                        help="the modeling_gpt2.py to check (default: %(default)s)")
    parser.add_argument("--model", default=None, help=f"weights directory or hub id (default: "
                        f"{DEFAULT_MODEL.relative_to(ROOT)}, else '{HUB_ID}', else random)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: CUDA if present)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return parser


def check_weights(candidate_class, weights_dir, inputs, device):
    """Reference, then candidate, on one weight set: (rows, the candidate's outputs)."""
    from transformers import GPT2LMHeadModel as ReferenceGPT2

    try:
        reference = run_checks_on(ReferenceGPT2, weights_dir, inputs, device)
    except Exception as error:
        raise UserError(f"the reference model failed to run on {weights_dir} ({type(error).__name__}: {error}): "
                        f"give --model a complete GPT-2 weights directory.") from None
    inputs = dict(inputs, teacher=reference["teacher_inputs"])  # what the candidate's modules are fed
    try:
        cand = run_checks_on(candidate_class, weights_dir, inputs, device)
    except Exception as error:
        import traceback

        traceback.print_exc(limit=-3)
        note = f"{type(error).__name__}: {error}"[:200]
        return [{"check": "the model runs", "passed": False, "measured": "error", "tolerance": "-", "ratio": None,
                 "note": note}], {}
    return compare(reference, cand, inputs), cand


def real_weight_inputs(inputs, weights_dir):
    """The real gpt2 weights get two more rows; returns the tokenizer for printing the reply (or None)."""
    inputs["the_dog"] = True
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(weights_dir)
        inputs["hello_ids"] = tokenizer("Hello?", return_tensors="pt").input_ids
        return tokenizer
    except Exception:
        print(f"(no tokenizer in {weights_dir}: skipping the \"Hello?\" reply)")
        return None


def with_gpt2_activation(weights_dir, workdir):
    """The model under check is GPT-2, with GPT-2's tanh GELU. Weights trained with another activation (Pretraining.py
    trains with the exact GELU by default) are checked as GPT-2: a directory whose config.json names gelu_new, beside
    links to (or, where links are not allowed, copies of) the same weight files. Returns (directory, the activation
    replaced or None)."""
    config = json.loads((Path(weights_dir) / "config.json").read_text())
    activation = config.get("activation_function", "gelu_new")
    if GELU_KERNELS.get(activation) == "tanh":  # GPT-2's tanh GELU, under either of its names
        return weights_dir, None
    target = Path(workdir) / "as-gpt2"
    target.mkdir()
    for file in Path(weights_dir).iterdir():
        if file.is_file() and file.name != "config.json":
            try:
                (target / file.name).symlink_to(file.resolve())
            except OSError:  # Windows without the right to make links
                shutil.copy2(file, target / file.name)
    (target / "config.json").write_text(json.dumps(dict(config, activation_function="gelu_new"), indent=2))
    return target, activation


def weight_sets(args, workdir):
    """[(directory, description, real)]: the user's weights, then the stress weights (unless they are the same)."""
    weights_dir, description, real = prepare_weights(args.model or str(DEFAULT_MODEL), workdir, args.model is None)
    weights_dir, replaced = with_gpt2_activation(weights_dir, workdir)
    if replaced:
        description += f" (trained with the activation {replaced!r}; checked as GPT-2, with its tanh GELU)"
    sets = [(weights_dir, description, real)]
    if not description.startswith("random weights"):
        stress = Path(workdir) / "stress"
        sensitive_random_gpt2(SEED, **STRESS_SHAPE).save_pretrained(stress)
        shape = ", ".join(f"{k}={v}" for k, v in STRESS_SHAPE.items() if k.startswith("n_") or k == "vocab_size")
        sets.append((stress, f"stress weights, always checked too (random, every bias non-zero; {shape})", False))
    return sets


def write_json(path, result):
    with atomic_path(path) as tmp:  # a reader never sees half a file
        Path(tmp).write_text(json.dumps(result, indent=2, default=str, allow_nan=True))


def check_weight_set(candidate, weights_dir, description, real, device):
    """Check the candidate on one weight set and print its table; returns its rows."""
    import torch
    from transformers import GPT2Config

    config = GPT2Config.from_pretrained(weights_dir)
    inputs = make_inputs(config)
    tokenizer = real_weight_inputs(inputs, weights_dir) if real else None
    threads = torch.get_num_threads()
    if config.n_embd * config.n_layer <= 4096:  # a tiny model: one thread is faster (no contention)
        torch.set_num_threads(1)
    try:
        rows, cand = check_weights(candidate.GPT2LMHeadModel, weights_dir, inputs, device)
    finally:
        torch.set_num_threads(threads)
    print(f"\nWeights: {description}")
    if tokenizer is not None and "hello" in cand:
        print('Reply to "Hello?":', repr(tokenizer.decode(cand["hello"][0])))
    print_table(rows)
    return rows


def main(argv=None):
    args = parse_args(build_parser(), argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = pick_device(args.device)
    start = time.time()
    candidate = load_module(args.file)
    print(f"Checking {args.file} against transformers' GPT2LMHeadModel on {device}, eager attention, "
          "float32 and float64", flush=True)
    results, all_rows = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for weights_dir, description, real in weight_sets(args, workdir):
            rows = check_weight_set(candidate, weights_dir, description, real, device)
            results.append({"weights": description, "checks": rows})
            all_rows += [dict(r, weights=description) for r in rows]
    passed = all(r["passed"] for r in all_rows)
    print(f"\n{'ALL CHECKS PASSED' if passed else 'SOME CHECKS FAILED'} ({sum(r['passed'] for r in all_rows)}/"
          f"{len(all_rows)}) in {time.time() - start:.0f} s")
    if args.json:
        write_json(args.json, {"file": str(args.file), "weights": results[0]["weights"], "device": device,
                               "passed": passed, "checks": all_rows, "weight_sets": results})
    return 0 if passed else 1  # 1: a check failed (the numbers are wrong), not a mistake on the command line


if __name__ == "__main__":
    run_main(main)
