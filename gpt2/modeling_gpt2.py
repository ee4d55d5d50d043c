"""GPT-2, written out by hand: the reference answer of Task 4.

This file rebuilds OpenAI's GPT-2 (Radford et al., 2019) as a 🤗 transformers model. It has the same
parameter names and shapes as `transformers.GPT2LMHeadModel`, so the real `gpt2` checkpoint loads into it,
what it saves loads back into transformers, and `.generate()`, `Trainer`, PEFT (LoRA) and bitsandbytes
quantization all work on it. `Check_gpt2-base.py` proves that it computes the same numbers as transformers.

The model, bottom to top:

    tokens ──> wte (token embedding) + wpe (position embedding)
           ──> n_layer x Block:   x = x + Attention(LayerNorm(x))
                                  x = x + MLP(LayerNorm(x))
           ──> ln_f (final LayerNorm) ──> lm_head (wte transposed) ──> logits over the vocabulary

Usage:
    from gpt2.modeling_gpt2 import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("model/gpt2-base")
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, GPT2Config, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.pytorch_utils import Conv1D as _TransformersConv1D


class Conv1D(_TransformersConv1D):
    """A linear layer y = x @ W + b whose weight is stored as (in_features, out_features).

    Why "Conv1D" and why transposed? OpenAI's original TensorFlow GPT-2 wrote its linear layers as 1x1
    convolutions, which keep the weight as (in, out); nn.Linear keeps (out, in). The published checkpoint
    has the (in, out) layout, so we keep it too and multiply by W, not by W.T.

    We subclass transformers' Conv1D (and only re-write its forward, to show what it does) so that the
    libraries that look for that class recognise ours: PEFT (LoRA needs `fan_in_fan_out=True` here) and
    bitsandbytes (which replaces it with a quantized linear layer).
    """

    def forward(self, x):
        # addmm computes bias + x @ weight in one fused call, on x flattened to (tokens, in_features).
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


def gelu_new(x):
    """GELU, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    GPT-2 was trained with this approximation (it was cheaper than erf in 2018). The exact GELU differs by
    up to ~1e-3, enough to change the model's outputs, so to reproduce GPT-2 we must use this one.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    """Multi-head causal self-attention: each token looks at itself and the tokens before it."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != config.hidden_size:
            raise ValueError(f"hidden size {config.hidden_size} is not divisible by {self.num_heads} heads")
        self.layer_idx = layer_idx  # which slot of the KV cache belongs to this layer
        self.config = config

        # Scores q·k grow like √head_dim (a sum of head_dim products of unit-variance numbers); dividing by
        # √head_dim keeps them near unit variance, so the softmax does not saturate into one-hot weights.
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # an option of some later GPT-2 trainings
            self.scale /= float(layer_idx + 1)

        self.c_attn = Conv1D(3 * config.hidden_size, config.hidden_size)  # q, k and v in one matrix product
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)  # mixes the heads back together
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states, attention_mask=None, cache=None, output_attentions=False):
        batch, length, width = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(width, dim=2)
        # (batch, length, width) -> (batch, heads, length, head_dim): every head attends on its own.
        query, key, value = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                             for t in (query, key, value))

        # The KV cache holds, per layer, the keys and values of all tokens seen so far. When generating,
        # only the new token is fed in; its key and value are appended and it attends to all of them.
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        # attention_mask is True where a query may look at a key. None means the plain causal pattern
        # (no padding; either no cache, or a single new token that may see everything before it).
        if self.config._attn_implementation == "eager" or output_attentions:
            # The textbook formula softmax(q·kᵀ·scale + mask)·v, spelled out, so the weights can be returned.
            scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
            allowed = attention_mask
            if allowed is None:
                total = key.size(-2)
                allowed = torch.ones(length, total, dtype=torch.bool, device=scores.device).tril(total - length)
            # Add the most negative number where a key is not allowed: softmax then gives it weight 0.
            bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device)
            scores = scores + bias.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = F.softmax(scores, dim=-1).type(value.dtype)
            output = torch.matmul(self.attn_dropout(weights), value)
        else:
            # The same formula in one fused kernel (PyTorch's scaled_dot_product_attention): faster, and it
            # never stores the (length x length) weight matrix.
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=self.attn_dropout.p if self.training else 0.0,
                is_causal=attention_mask is None and length > 1, scale=self.scale,
            )
            weights = None

        # (batch, heads, length, head_dim) -> (batch, length, width): concatenate the heads.
        output = output.transpose(1, 2).reshape(batch, length, width)
        output = self.resid_dropout(self.c_proj(output))
        return output, weights


class GPT2MLP(nn.Module):
    """The feed-forward network applied to every position: widen 4x, GELU, project back."""

    def __init__(self, intermediate_size, config):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.hidden_size)
        self.act = gelu_new
        self.c_proj = Conv1D(config.hidden_size, intermediate_size)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        hidden_states = self.c_fc(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.c_proj(hidden_states)
        return self.dropout(hidden_states)


class GPT2Block(GradientCheckpointingLayer):
    """One transformer layer, "pre-LN": normalise, transform, add back to the residual stream.

    GPT-2 moved LayerNorm in front of each sub-layer (GPT-1 had it after); the residual stream itself is
    never normalised, which makes deep stacks train stably. GradientCheckpointingLayer lets
    `model.gradient_checkpointing_enable()` recompute this layer in the backward pass to save memory.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner_dim, config)

    def forward(self, hidden_states, attention_mask=None, cache=None, output_attentions=False, **kwargs):
        attn_output, attn_weights = self.attn(self.ln_1(hidden_states), attention_mask, cache, output_attentions)
        hidden_states = hidden_states + attn_output  # residual connection
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))  # residual connection
        return hidden_states, attn_weights


class GPT2PreTrainedModel(PreTrainedModel):
    """What transformers needs to load, save, initialise and generate with our classes."""

    config_class = GPT2Config
    base_model_prefix = "transformer"  # parameters are named transformer.h.0.attn.c_attn.weight, ...
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block"]  # device_map="auto" must keep a block (and its residual) on one device
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]  # old checkpoints stored the causal mask

    @classmethod
    def _can_set_attn_implementation(cls):
        # Our attention reads config._attn_implementation at every call, so set_attn_implementation("eager"
        # or "sdpa") may switch it at any time. (transformers guesses this from the source text otherwise.)
        return True

    def _init_weights(self, module):
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            # Each block adds two outputs to the residual stream, so after n_layer blocks its variance would
            # grow ~2·n_layer times; the GPT-2 paper scales the projections into the stream by 1/√(2·n_layer).
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))


class GPT2Model(GPT2PreTrainedModel):
    """The GPT-2 body: embeddings, n_layer blocks, final LayerNorm. Outputs one vector per token."""

    def __init__(self, config):
        super().__init__(config)
        if config.add_cross_attention:
            raise ValueError("this GPT-2 is a decoder-only language model; cross-attention is not implemented")
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)  # token id -> vector
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)  # position -> vector (learned)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)  # pre-LN needs a last norm
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values=None,  # the older name of `cache`
        **kwargs,
    ):
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a layer in the backward pass would append to the cache twice
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0

        # Positions continue after the cached tokens. (With left padding, generate() passes position_ids
        # computed from the attention mask, so every prompt starts at position 0.)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device).unsqueeze(0)
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))

        mask = self.causal_padding_mask(attention_mask, batch, length, past_length, hidden_states.device)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.h:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = block(hidden_states, mask, cache=cache, output_attentions=output_attentions)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states, attentions=all_attentions
        )

    @staticmethod
    def causal_padding_mask(attention_mask, batch, length, past_length, device):
        """A (batch, 1, length, past_length + length) boolean mask: True where a query may see a key.

        A query may see a key if the key is not in its future (causal) and is not padding. Returns None
        when the plain causal pattern is all there is, so attention can use its fast path.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool()  # a ready-made 4-D mask: use as given
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding anywhere: nothing beyond causality to mask
        if attention_mask is None and (past_length == 0 or length == 1):
            return None  # causal only: attention applies it without a mask tensor (one new token sees all)
        total = past_length + length
        query_pos = torch.arange(past_length, total, device=device).view(-1, 1)
        key_pos = torch.arange(total, device=device).view(1, -1)
        mask = (key_pos <= query_pos).expand(batch, 1, length, total)
        if attention_mask is not None:
            mask = mask & attention_mask.bool().view(batch, 1, 1, total)
        return mask


class GPT2LMHeadModel(GPT2PreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modelling head: the next-token logits at every position."""

    # The output matrix is the input embedding matrix itself ("weight tying"): one vocabulary table both
    # reads and writes tokens, which saves 38M parameters in GPT-2 small.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ):
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.transformer(
            input_ids,
            cache=cache if cache is not None else past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        # generate() only needs the last position's logits: skip the (length x vocab) product for the rest.
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.causal_lm_loss(logits, labels.to(logits.device), kwargs.get("num_items_in_batch"))

        if not return_dict:
            output = (logits, outputs.cache, outputs.hidden_states, outputs.attentions)
            output = tuple(v for v in output if v is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @staticmethod
    def causal_lm_loss(logits, labels, num_items_in_batch=None):
        """Cross-entropy of predicting token t+1 from position t; labels equal to -100 are ignored.

        `labels` are aligned with the input (labels = input_ids is fine): we shift them one step left here.
        Trainer passes `num_items_in_batch` under gradient accumulation, so that the loss is the mean over
        all the tokens of the whole accumulated batch, not a mean of per-micro-batch means.
        """
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        logits = logits.float()  # softmax over 50k entries in fp32, also under bf16 autocast
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100,
                               reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss


__all__ = ["GPT2Model", "GPT2LMHeadModel", "GPT2PreTrainedModel"]
