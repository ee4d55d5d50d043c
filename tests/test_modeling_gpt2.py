"""gpt2/modeling_gpt2.py computes what transformers' GPT-2 computes, and works with the tools around it."""
import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config
from transformers import GPT2LMHeadModel as RefLMHead
from transformers import GPT2Model as RefModel

from course_utils import load_script
from gpt2.modeling_gpt2 import GPT2LMHeadModel, GPT2Model
from gpt2_helpers import CHECKER, TINY

check = load_script(CHECKER)
EXACT = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny GPT-2 with every parameter random (non-zero biases, LayerNorms away from 1), saved by transformers."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    check.sensitive_random_gpt2(**TINY).save_pretrained(path)
    return path


def pair(weights, attn="eager", **kwargs):
    ref = RefLMHead.from_pretrained(weights, attn_implementation=attn, **kwargs).eval()
    ours = GPT2LMHeadModel.from_pretrained(weights, attn_implementation=attn, **kwargs).eval()
    return ref, ours


def padded_batch(vocab=TINY["vocab_size"], batch=3, length=12, seed=0, side="left"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pads in enumerate([0, 3, 7][:batch]):
        if side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, length - pads :] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_parameter_names_shapes_and_tying(weights):
    ref, ours = pair(weights)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [(n, p.shape) for n, p in ours.named_parameters()]
    assert ours.lm_head.weight is ours.transformer.wte.weight
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_matches_reference(weights, attn, side):
    ref, ours = pair(weights, attn)
    ids, mask = padded_batch(side=side)
    labels = ids.masked_fill(mask == 0, -100)
    a = ref(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    b = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    real = mask.bool()
    assert_close(b.logits[real], a.logits[real], **EXACT)
    assert_close(b.loss, a.loss, **EXACT)
    assert len(b.hidden_states) == len(a.hidden_states) == TINY["n_layer"] + 1
    for h_ref, h_ours in zip(a.hidden_states, b.hidden_states):
        assert_close(h_ours[real], h_ref[real], **EXACT)
    if attn == "eager":  # same formula, same order of operations: identical to the last bit, padding included
        assert torch.equal(b.logits, a.logits)


def test_attentions_and_inputs_embeds(weights):
    ref, ours = pair(weights, "eager")
    ids, mask = padded_batch()
    a = ref(ids, attention_mask=mask, output_attentions=True)
    b = ours(ids, attention_mask=mask, output_attentions=True)
    assert len(b.attentions) == TINY["n_layer"]
    for w_ref, w_ours in zip(a.attentions, b.attentions):
        assert_close(w_ours, w_ref, **EXACT)
    # Under SDPA, asking for attentions takes the eager path instead of returning nothing.
    sdpa = GPT2LMHeadModel.from_pretrained(weights).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    assert_close(sdpa(ids, attention_mask=mask, output_attentions=True).attentions[0], a.attentions[0], **EXACT)
    embeds = ours.transformer.wte(ids)
    assert_close(ours(inputs_embeds=embeds, attention_mask=mask).logits, b.logits, **EXACT)
    with pytest.raises(ValueError, match="exactly one"):
        ours(input_ids=ids, inputs_embeds=embeds)


def test_loss_ignores_minus_100_and_supports_num_items(weights):
    _, ours = pair(weights)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    logits = ours(ids, attention_mask=mask).logits
    # By hand: position t predicts label t+1.
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                                ignore_index=-100)
    assert_close(ours(ids, attention_mask=mask, labels=labels).loss, by_hand, **EXACT)
    n = int((labels[:, 1:] != -100).sum())
    summed = ours(ids, attention_mask=mask, labels=labels, num_items_in_batch=2 * n).loss
    assert_close(summed, by_hand / 2, **EXACT)


def test_model_without_head_and_tuple_outputs(weights):
    ref = RefModel.from_pretrained(weights, attn_implementation="eager").eval()
    ours = GPT2Model.from_pretrained(weights, attn_implementation="eager").eval()
    ids, mask = padded_batch()
    assert_close(ours(ids, attention_mask=mask).last_hidden_state, ref(ids, attention_mask=mask).last_hidden_state,
                 **EXACT)
    logits, cache = GPT2LMHeadModel.from_pretrained(weights).eval()(ids, attention_mask=mask, return_dict=False)[:2]
    assert logits.shape == (3, 12, TINY["vocab_size"]) and cache.get_seq_length() == 12


def test_checkpoint_round_trips_both_ways(weights, tmp_path):
    ours = GPT2LMHeadModel.from_pretrained(weights)
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    ref = RefLMHead.from_pretrained(tmp_path / "ours")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, ref.state_dict()[name]), name
    ref.save_pretrained(tmp_path / "ref")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ref")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    assert back.lm_head.weight is back.transformer.wte.weight


def test_loads_an_old_style_pytorch_model_bin(weights, tmp_path):
    """The hub's gpt2 also ships pytorch_model.bin in the old layout: no lm_head, causal-mask buffers."""
    ref = RefLMHead.from_pretrained(weights)
    old = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    for i in range(TINY["n_layer"]):
        old[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
        old[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ref.config.save_pretrained(tmp_path)
    torch.save(old, tmp_path / "pytorch_model.bin")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name
    assert ours.lm_head.weight is ours.transformer.wte.weight


@pytest.mark.parametrize(
    "settings",
    [dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.9), dict(num_beams=3, do_sample=False)],
    ids=["greedy", "sampling", "beam"],
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_left_padding_matches_reference(weights, settings, attn):
    ref, ours = pair(weights, attn)
    ids, mask = padded_batch(length=8)
    common = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, pad_token_id=0, **settings)
    torch.manual_seed(7)
    expected = ref.generate(ids, **common)
    torch.manual_seed(7)
    got = ours.generate(ids, **common)
    assert torch.equal(got, expected)


def test_generate_uses_the_cache_incrementally(weights):
    """With the cache, each step after the prompt feeds exactly one new token through the model."""
    _, ours = pair(weights)
    ids, mask = padded_batch(length=8)
    lengths = []
    hook = ours.transformer.wte.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    ours.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    hook.remove()
    assert lengths == [8, 1, 1, 1, 1]


def test_gradient_checkpointing_gives_the_same_gradients(weights):
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = GPT2LMHeadModel.from_pretrained(weights, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(block.gradient_checkpointing for block in model.transformer.h)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], **EXACT)


@pytest.mark.parametrize("reentrant", [True, False])
def test_peft_lora_with_gradient_checkpointing_trains(weights, tmp_path, reentrant):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = GPT2LMHeadModel.from_pretrained(weights)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    ids, mask = padded_batch(length=16)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    # The adapter made on our GPT-2 loads with stock PEFT onto transformers' GPT-2 and gives the same logits.
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    ref = PeftModel.from_pretrained(RefLMHead.from_pretrained(weights), tmp_path / "adapter").eval()
    with torch.no_grad():
        real = mask.bool()
        assert_close(ref(ids, attention_mask=mask).logits[real],
                     peft_model(input_ids=ids, attention_mask=mask).logits[real], **EXACT)


def test_bitsandbytes_4bit_matches_reference(weights):
    """bitsandbytes turns our Conv1D layers into 4-bit linears exactly as it does transformers' GPT-2's."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ref = RefLMHead.from_pretrained(weights, quantization_config=quant, **no_dropout)
    ours = GPT2LMHeadModel.from_pretrained(weights, quantization_config=quant, **no_dropout)
    assert isinstance(ours.transformer.h[0].attn.c_attn, bnb.nn.Linear4bit)
    assert isinstance(ours.transformer.h[1].mlp.c_fc, bnb.nn.Linear4bit)
    # Train mode before the first forward: on this CPU an eval-mode forward repacks the weights (PITFALLS).
    ref.train()
    ours.train()
    ids, mask = padded_batch()
    with torch.no_grad():
        real = mask.bool()
        assert_close(ours(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real], **EXACT)


def test_refuses_cross_attention_config():
    with pytest.raises(ValueError, match="cross-attention"):
        GPT2Model(GPT2Config(**TINY, add_cross_attention=True))
