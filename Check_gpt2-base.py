"""Task 4 checker: prove that a hand-written `modeling_gpt2.py` computes exactly what transformers' GPT-2 does.

    python Check_gpt2-base.py                                  # checks gpt2/modeling_gpt2.py
    python Check_gpt2-base.py --file my_modeling_gpt2.py       # checks a completed handout
    python Check_gpt2-base.py --model model/gpt2-base --json result.json

Weights: `--model DIR` (default `model/gpt2-base`); if that directory is missing, the hub id `gpt2`; if there
is no network either, random weights at GPT-2 124M's shape with a fixed seed. The table says which.

Both models run in float32 with the textbook ("eager") attention and TF32 off, so a correct file agrees to
rounding error. Each check prints one row: PASS/FAIL, the measured difference and the tolerance; a failure
names the first module whose output diverges. The exit code is 0 only if every check passes.

The grader (`instructor/grade.py`) reuses `run_checks_on` and `compare` from this file: a student's model
computes its outputs in a sandboxed process, and the comparison happens here, in the grader's process.
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Pasted into a notebook cell there is no __file__: the cell runs in the repository root (after %cd).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DEFAULT_FILE = ROOT / "gpt2" / "modeling_gpt2.py"
DEFAULT_MODEL = ROOT / "model" / "gpt2-base"
HUB_ID = "gpt2"
TOLERANCE = 1e-4  # on logits, hidden states and gradients, relative to the tensor's scale when that exceeds 1
LOSS_TOLERANCE = 1e-5
NEW_TOKENS = 32
SEED = 0
# transformers' own integration test: greedy continuation of "The dog" with the real gpt2 weights.
THE_DOG = [464, 3290]
THE_DOG_EXPECTED = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262, 13, 198, 198, 464, 3290]


class CheckError(Exception):
    """A problem that ends the run with one clear sentence instead of a stack trace."""


# ----------------------------------------------------------------------------------------------------------
# Loading the file under test and the weights
# ----------------------------------------------------------------------------------------------------------

def load_module(path):
    """Import a modeling file from its path, under a name of its own (so it never shadows gpt2/)."""
    path = Path(path)
    if not path.is_file():
        raise CheckError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if "[MASK]" in line:
            raise CheckError(f"{path} still has a [MASK] on line {number}: fill in every [MASK] first")
    name = f"checked_modeling_gpt2_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a student's file can fail in any way; report it in one line
        raise CheckError(f"{path} does not import: {type(error).__name__}: {error}") from None
    if not hasattr(module, "GPT2LMHeadModel"):
        raise CheckError(f"{path} defines no GPT2LMHeadModel class")
    return module


def hub_reachable(timeout=3.0):
    """Can the hub be reached quickly? (The shared helper in hub_utils.py, imported only when needed, so the
    grader can load this file without the repository root on its path.)"""
    from hub_utils import hub_reachable as reachable

    return reachable(timeout)


def sensitive_random_gpt2(seed=SEED, **config_overrides):
    """transformers' GPT2LMHeadModel with random weights chosen so that every single-point bug shows.

    GPT-2's own initialisation (std 0.02, zero biases, unit LayerNorms) hides many mistakes: a forgotten
    bias or a swapped LayerNorm weight/bias changes nothing when biases are 0 and weights are 1, and small
    pre-activations make the tanh-GELU and the exact GELU almost equal. So every parameter is random here:
    matrices scaled for unit-size activations (the MLP's input larger, to exercise GELU's curve), non-zero
    biases, LayerNorm weights around 1. Logits stay of order 1, so the tolerance 1e-4 is absolute.
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
    """Return (directory with config + weights, description, whether these are the real gpt2 weights)."""
    import torch
    from transformers import GPT2LMHeadModel

    model_dir = Path(model_arg)
    if model_dir.is_dir():
        if not (model_dir / "config.json").is_file():
            raise CheckError(f"{model_dir} has no config.json: download all files of the hub repo '{HUB_ID}' into it")
        config = json.loads((model_dir / "config.json").read_text())
        real = config.get("n_embd") == 768 and config.get("n_layer") == 12 and config.get("vocab_size") == 50257
        return model_dir, f"weights from {model_dir}", real
    hub_id = HUB_ID if default_used else model_arg
    if not default_used and os.sep in model_arg:
        raise CheckError(f"no such model directory: {model_arg}")
    if hub_reachable():
        print(f"{model_dir} not found: downloading '{hub_id}' from the hub (about 550 MB, once) ...", flush=True)
        try:
            model = GPT2LMHeadModel.from_pretrained(hub_id, dtype=torch.float32)
        except Exception as error:
            raise CheckError(f"could not download '{hub_id}': {error}") from None
        target = Path(workdir) / "hub"
        model.save_pretrained(target)
        return target, f"weights of '{hub_id}' from the hub", hub_id == HUB_ID
    if not default_used:
        raise CheckError(f"no directory '{model_arg}' and no network to download it from the hub")
    print(
        f"No {DEFAULT_MODEL.relative_to(ROOT)} and no network: checking on random weights at GPT-2 124M's shape "
        f"(seed {SEED}). For the real weights put the files of the hub repo '{HUB_ID}' into {DEFAULT_MODEL.relative_to(ROOT)}/.",
        flush=True,
    )
    target = Path(workdir) / "random"
    sensitive_random_gpt2().save_pretrained(target)
    return target, f"random weights at GPT-2 124M's shape (seed {SEED}, no {DEFAULT_MODEL.relative_to(ROOT)} and no network)", False


# ----------------------------------------------------------------------------------------------------------
# The inputs every model sees
# ----------------------------------------------------------------------------------------------------------

def make_inputs(config, seed=SEED, length=24):
    """A left-padded batch of random token ids, its labels, and the probe tensors. Same seed, same inputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batch = 3
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, :5] = 0  # left padding, as generate() wants for a batch of prompts of unequal length
    attention_mask[2, :11] = 0
    pad_id = config.eos_token_id if config.eos_token_id is not None and config.eos_token_id < config.vocab_size else 0
    input_ids = input_ids.masked_fill(attention_mask == 0, pad_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    width = config.n_embd
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pad_id": pad_id,
        # LayerNorm probe: inputs of variance ~1e-6, where the epsilon (1e-5) decides the output.
        "norm_probe": torch.randn(2, 5, width, generator=gen) * 1e-3 + torch.randn(2, 5, 1, generator=gen) * 1e-3,
        # MLP probe: inputs of size ~3, where the tanh-GELU and the exact GELU (or ReLU) differ clearly.
        "mlp_probe": torch.randn(2, 5, width, generator=gen) * 3.0,
    }


def module_trace_names(n_layer):
    """The modules whose outputs we record, in the order the data flows through them."""
    names = [("embeddings", "transformer.h.0")]  # the input of block 0 is the embeddings' output
    for i in range(n_layer):
        names += [(f"block {i} attention", f"transformer.h.{i}.attn"), (f"block {i} MLP", f"transformer.h.{i}.mlp")]
    names += [("final norm", "transformer.ln_f"), ("head", "lm_head")]
    return names


# ----------------------------------------------------------------------------------------------------------
# Running one implementation: everything it computes goes into a dict of tensors
# ----------------------------------------------------------------------------------------------------------

def run_checks_on(model_class, weights_dir, inputs, device="cpu"):
    """Load `model_class` from `weights_dir` and compute every output the comparison needs.

    This function is the only code that touches the model under test, and it returns plain tensors,
    lists and strings, so it can also run in a separate, sandboxed process (the grader does that).
    Each stage runs on its own: if one crashes, its error is recorded under "errors" and the others go on.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"errors": {}}
    model = model_class.from_pretrained(weights_dir, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    config = model.config
    ids = inputs["input_ids"].to(device)
    mask = inputs["attention_mask"].to(device)
    labels = inputs["labels"].to(device)

    def stage(name, function):
        try:
            function()
        except Exception as error:
            out["errors"][name] = f"{type(error).__name__}: {error}"[:300]

    def cache_of(result):  # transformers 5 calls it `cache`; older code `past_key_values`
        return result.cache if getattr(result, "cache", None) is not None else getattr(result, "past_key_values", None)

    def parameters():
        out["parameters"] = [[name, list(p.shape)] for name, p in model.named_parameters()]
        out["tied"] = bool(model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())

    def forward_and_backward():
        """The padded batch forward and backward, recording each module's output on the way."""
        trace, hooks = {}, []

        def record(label, pre=False):
            def hook(module, args, kwargs_or_output, *rest):
                value = (kwargs_or_output.get("hidden_states", args[0] if args else None)) if pre else kwargs_or_output
                if isinstance(value, (tuple, list)):
                    value = value[0]
                if isinstance(value, torch.Tensor):
                    trace[label] = value.detach().float().cpu()
            return hook

        for label, name in module_trace_names(config.n_layer):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            if label == "embeddings":
                hooks.append(module.register_forward_pre_hook(record(label, pre=True), with_kwargs=True))
            else:
                hooks.append(module.register_forward_hook(record(label)))
        model.zero_grad(set_to_none=True)
        try:
            result = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
            out["trace"] = trace
        out["logits"] = result.logits.detach().float().cpu()
        out["hidden_states"] = [h.detach().float().cpu() for h in (result.hidden_states or ())]
        out["loss"] = result.loss.detach().float().cpu()
        result.loss.backward()
        out["gradients"] = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

    def default_attention():
        """The default attention (SDPA): the same numbers as eager, up to rounding."""
        model.set_attn_implementation("sdpa")
        if model.config._attn_implementation != "sdpa":
            raise RuntimeError("set_attn_implementation('sdpa') did not switch the model to SDPA")
        try:
            out["logits_sdpa"] = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
            out["logits_sdpa_unpadded"] = model(input_ids=ids[:1]).logits.float().cpu()  # the mask-free fast path
        finally:
            model.set_attn_implementation("eager")

    def kv_cache():
        """Feed the first half at once, then one token at a time through the cache."""
        # Positions count real tokens only (as generate() does), so padding does not shift them.
        half = ids.shape[1] // 2
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out["full_logits_positions"] = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, half - 1 :].float().cpu()
        step = model(input_ids=ids[:, :half], attention_mask=mask[:, :half], position_ids=positions[:, :half], use_cache=True)
        cached = [step.logits[:, -1]]
        for t in range(half, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                         cache=cache_of(step), use_cache=True)
            cached.append(step.logits[:, -1])
        out["cached_logits"] = torch.stack(cached, 1).float().cpu()
        # The same without position_ids and mask, on the unpadded row: the model must count the cached tokens.
        row = ids[:1]
        step = model(input_ids=row[:, :half], use_cache=True)
        plain = [step.logits[:, -1]]
        for t in range(half, row.shape[1]):
            step = model(input_ids=row[:, t : t + 1], cache=cache_of(step), use_cache=True)
            plain.append(step.logits[:, -1])
        out["cached_logits_plain"] = torch.stack(plain, 1).float().cpu()

    def generation():
        """Greedy and sampled generation from the padded prompts; eos is held off so all 32 tokens come."""
        common = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=inputs["pad_id"])
        out["greedy"] = model.generate(ids, do_sample=False, **common).cpu()
        torch.manual_seed(1234)
        out["sampled"] = model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, **common).cpu()

    def probes():
        """Module by module: LayerNorms on tiny inputs (epsilon matters), MLPs on large ones (GELU's shape)."""
        norm_probe, mlp_probe = inputs["norm_probe"].to(device), inputs["mlp_probe"].to(device)
        for i in range(config.n_layer):
            for norm in ("ln_1", "ln_2"):
                out[f"probe transformer.h.{i}.{norm}"] = model.get_submodule(f"transformer.h.{i}.{norm}")(norm_probe).float().cpu()
            out[f"probe transformer.h.{i}.mlp"] = model.get_submodule(f"transformer.h.{i}.mlp")(mlp_probe).float().cpu()
        out["probe transformer.ln_f"] = model.get_submodule("transformer.ln_f")(norm_probe).float().cpu()

    def real_weights():
        """With the real gpt2 weights: transformers' own "The dog" test and a reply to "Hello?"."""
        if inputs.get("the_dog"):
            dog = torch.tensor([THE_DOG], device=device)
            out["the_dog"] = model.generate(dog, do_sample=False, max_new_tokens=len(THE_DOG_EXPECTED) - 2, pad_token_id=50256).cpu()
        if inputs.get("hello_ids") is not None:
            hello = inputs["hello_ids"].to(device)
            out["hello"] = model.generate(hello, do_sample=False, max_new_tokens=20, pad_token_id=50256).cpu()

    stage("parameters", parameters)
    stage("forward and backward", forward_and_backward)
    with torch.no_grad():
        for name, function in (("default attention", default_attention), ("KV cache", kv_cache), ("generation", generation),
                               ("probes", probes), ("real weights", real_weights)):
            stage(name, function)
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparing: reference outputs against the candidate's, one row per check
# ----------------------------------------------------------------------------------------------------------

def max_diff(ref, cand, where=None):
    """(max |ref - cand|, the tolerance for it): tolerance 1e-4, scaled up by the tensor's size when > 1."""
    import torch

    if cand is None or not isinstance(cand, torch.Tensor) or cand.shape != ref.shape:
        return math.inf, TOLERANCE
    if where is not None:
        ref, cand = ref[where], cand[where]
    diff = (ref - cand).abs()
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max()) if diff.numel() else 0.0, TOLERANCE * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)


def first_divergence(ref_trace, cand_trace, where):
    """The first module (in data-flow order) whose output differs beyond tolerance, or None."""
    for label in ref_trace:
        diff, tol = max_diff(ref_trace[label], cand_trace.get(label), where)
        if not diff <= tol:
            return label
    return None


def compare(ref, cand, inputs):
    """Compare the reference's outputs with the candidate's. Returns a list of result rows (dicts)."""
    import torch

    rows = []
    real = inputs["attention_mask"].bool()  # padded positions carry no meaning: compare real tokens only
    culprit = first_divergence(ref["trace"], cand.get("trace", {}), real)

    errors = cand.get("errors", {})

    def row(name, ok, measured, tolerance, note="", stage=None):
        if not ok and stage in errors:  # the candidate crashed in this stage: say how
            note = f"crashed: {errors[stage]}"
        rows.append({"check": name, "passed": bool(ok), "measured": measured, "tolerance": tolerance, "note": note})

    def tensor_row(name, ref_t, cand_t, where=None, blame=True, stage=None):
        diff, tol = max_diff(ref_t, cand_t, where)
        ok = diff <= tol
        note = "" if ok else ("missing or wrong shape" if diff == math.inf else "")
        if not ok and blame and culprit:
            note = (note + "; " if note else "") + f"first divergence: {culprit}"
        row(name, ok, diff, tol, note, stage)

    ref_params, cand_params = ref["parameters"], cand.get("parameters", [])
    missing = sorted({n for n, _ in ref_params} - {n for n, _ in cand_params})
    extra = sorted({n for n, _ in cand_params} - {n for n, _ in ref_params})
    shapes = {n: s for n, s in cand_params}
    wrong = [n for n, s in ref_params if n in shapes and shapes[n] != s]
    note = "; ".join(p for p in (f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                                 f"wrong shape {wrong[:3]}" if wrong else "", "" if cand.get("tied") else "lm_head not tied to wte") if p)
    row("parameter names and shapes", not note, len(missing) + len(extra) + len(wrong) + (not cand.get("tied")), 0, note, "parameters")

    tensor_row("logits, left-padded batch", ref["logits"], cand.get("logits"), real, stage="forward and backward")
    loss_diff = abs(float(ref["loss"]) - float(cand["loss"])) if isinstance(cand.get("loss"), torch.Tensor) else math.inf
    row("loss (labels, -100 ignored)", loss_diff <= LOSS_TOLERANCE, loss_diff, LOSS_TOLERANCE, "" if loss_diff <= LOSS_TOLERANCE else f"first divergence: {culprit}" if culprit else "", "forward and backward")

    ref_hidden, cand_hidden = ref["hidden_states"], cand.get("hidden_states") or []
    worst, worst_tol, worst_layer = 0.0, TOLERANCE, None
    for i, h in enumerate(ref_hidden):
        diff, tol = max_diff(h, cand_hidden[i] if i < len(cand_hidden) else None, real)
        if worst_layer is None and not diff <= tol:
            worst_layer = i
        if diff / tol > worst / worst_tol:
            worst, worst_tol = diff, tol
    hidden_note = "" if worst_layer is None else f"hidden_states[{worst_layer}] differs first" + (f"; first divergence: {culprit}" if culprit else "")
    if len(cand_hidden) != len(ref_hidden):
        hidden_note = f"{len(cand_hidden)} hidden states instead of {len(ref_hidden)}"
    row("hidden states, every layer", not hidden_note, worst if not hidden_note or worst_layer is not None else math.inf, worst_tol, hidden_note, "forward and backward")

    worst, worst_tol, worst_name = 0.0, TOLERANCE, None
    cand_grads = cand.get("gradients") or {}
    for name, g in ref["gradients"].items():
        diff, tol = max_diff(g, cand_grads.get(name))
        if diff / tol > worst / worst_tol:
            worst, worst_tol, worst_name = diff, tol, name
    ok = worst <= worst_tol
    row("gradients of every parameter", ok, worst, worst_tol, "" if ok else f"worst: {worst_name}", "forward and backward")

    diff, tol = max_diff(ref["logits"], cand.get("logits_sdpa"), real)
    plain_diff, _ = max_diff(ref["logits"][:1], cand.get("logits_sdpa_unpadded"))  # row 0 has no padding
    row("default attention (SDPA) logits", max(diff, plain_diff) <= tol, max(diff, plain_diff), tol, "", "default attention")
    diff, tol = max_diff(ref["full_logits_positions"], cand.get("cached_logits"))
    plain_diff, plain_tol = max_diff(ref["full_logits_positions"][:1], cand.get("cached_logits_plain"))
    note = "" if plain_diff <= plain_tol else "wrong without position_ids: positions must continue after the cached tokens"
    row("KV-cache decoding = full forward", diff <= tol and not note, max(diff, plain_diff), tol, note, "KV cache")

    for key, name in (("greedy", f"greedy generation, {NEW_TOKENS} tokens"), ("sampled", "sampling, fixed seed")):
        same = isinstance(cand.get(key), torch.Tensor) and cand[key].shape == ref[key].shape
        mismatches = int((cand[key] != ref[key]).sum()) if same else ref[key].numel()
        row(name + " (identical ids)", mismatches == 0, mismatches, 0, "" if mismatches == 0 else f"{mismatches} ids differ", "generation")

    worst, worst_tol, worst_probe = 0.0, TOLERANCE, None
    for key in ref:
        if key.startswith("probe "):
            diff, tol = max_diff(ref[key], cand.get(key))
            if worst_probe is None and not diff <= tol:
                worst_probe = key[6:]
            if diff / tol > worst / worst_tol:
                worst, worst_tol = diff, tol
    row("module probes (LayerNorm eps, GELU)", worst_probe is None, worst, worst_tol, f"first divergence: {worst_probe}" if worst_probe else "", "probes")

    if "the_dog" in ref:
        got = cand.get("the_dog")
        got = got[0].tolist() if isinstance(got, torch.Tensor) else []
        row('"The dog" greedy = transformers\' test', got == THE_DOG_EXPECTED, sum(a != b for a, b in zip(got, THE_DOG_EXPECTED)) + abs(len(got) - len(THE_DOG_EXPECTED)), 0, "", "real weights")
    if "hello" in ref:
        same = isinstance(cand.get("hello"), torch.Tensor) and torch.equal(cand["hello"], ref["hello"])
        row('reply to "Hello?" = reference', same, 0 if same else 1, 0, "", "real weights")
    return rows


def print_table(rows, file=sys.stdout):
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  result  {'measured':>10}  {'tolerance':>10}  note", file=file)
    print("-" * (width + 48), file=file)
    for r in rows:
        measured = f"{r['measured']:.3g}" if isinstance(r["measured"], float) else str(r["measured"])
        tolerance = f"{r['tolerance']:.3g}" if isinstance(r["tolerance"], float) else str(r["tolerance"])
        print(f"{r['check']:<{width}}  {'PASS' if r['passed'] else 'FAIL':<6}  {measured:>10}  {tolerance:>10}  {r['note']}", file=file)


# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="the modeling_gpt2.py to check (default: %(default)s)")
    parser.add_argument("--model", default=None, help=f"weights directory or hub id (default: {DEFAULT_MODEL.relative_to(ROOT)}, else '{HUB_ID}', else random)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: CUDA if present)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args, _unknown = parser.parse_known_args(argv)  # a notebook kernel passes arguments of its own
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import GPT2LMHeadModel as ReferenceGPT2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    start = time.time()
    candidate = load_module(args.file)
    with tempfile.TemporaryDirectory() as workdir:
        weights_dir, description, real = prepare_weights(args.model or str(DEFAULT_MODEL), workdir, args.model is None)
        config = ReferenceGPT2.config_class.from_pretrained(weights_dir)
        inputs = make_inputs(config)
        if real:
            inputs["the_dog"] = True
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(weights_dir)
                inputs["hello_ids"] = tokenizer("Hello?", return_tensors="pt").input_ids
            except Exception:
                print(f"(no tokenizer in {weights_dir}: skipping the \"Hello?\" reply)")
                tokenizer = None
        print(f"Checking {args.file} against transformers' GPT2LMHeadModel on {device}, float32, eager attention")
        print(f"Weights: {description}\n", flush=True)
        try:
            reference = run_checks_on(ReferenceGPT2, weights_dir, inputs, device)
        except Exception as error:
            raise CheckError(f"the reference model failed to run on {weights_dir}: {error}") from None
        try:
            cand = run_checks_on(candidate.GPT2LMHeadModel, weights_dir, inputs, device)
            error_note = None
        except Exception as error:
            cand, error_note = {}, f"{type(error).__name__}: {error}"
        if error_note:
            import traceback

            traceback.print_exc(limit=-3)
            rows = [{"check": "the model runs", "passed": False, "measured": "error", "tolerance": "-", "note": error_note[:200]}]
        else:
            rows = compare(reference, cand, inputs)
        if real and "hello" in cand and tokenizer is not None:
            print('Reply to "Hello?":', repr(tokenizer.decode(cand["hello"][0])))
    print_table(rows)
    passed = all(r["passed"] for r in rows)
    print(f"\n{'ALL CHECKS PASSED' if passed else 'SOME CHECKS FAILED'} ({sum(r['passed'] for r in rows)}/{len(rows)}) in {time.time() - start:.0f} s")
    if args.json:
        result = {"file": str(args.file), "weights": description, "device": device, "passed": passed, "checks": rows}
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str, allow_nan=True))
        os.replace(tmp, args.json)  # atomic: a reader never sees half a file
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
