"""ModelConfig: every architecture llmkit runs is one set of these fields.

GPT-2 style (learned positions, LayerNorm, GELU, biases, tied embeddings), Llama style (RoPE,
RMSNorm, SwiGLU, grouped-query attention, no biases), Qwen2 (Llama with q/k/v biases) and Gemma-3
(offset norms, q/k norms, sandwich norms, scaled embeddings, sliding-window layers with their own
RoPE base) are all points in this space; the model reads the fields, never a family name.
`to_hf_config` / `from_hf_config` translate to and from the `config.json` that Hugging Face
transformers writes for `gpt2`, `llama`, `qwen2` and `gemma3_text`; `hf_model_type` says which
family a set of fields is, or names the fields that keep it out of each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import ConfigError
from llmkit.rope import check_rope_scaling, rope_from_hf, rope_to_hf

POS_EMBEDDINGS = ("rope", "learned")
LAYER_TYPES = ("full_attention", "sliding_attention")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
POOLINGS = ("last", "cls", "mean")

# transformers' names for our activations, both directions.
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "relu2": "relu2"}
_FROM_HF_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "relu2": "relu2",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


@dataclass
class ModelConfig:
    """Shape and style of a decoder-only transformer."""

    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain multi-head)
    head_dim: int | None = None  # None means d_model // n_head
    d_ff: int | None = None  # MLP width; None means 4*d_model (plain) or Llama's 8/3 rule (gated)
    max_seq_len: int = 2048
    pos_embedding: str = "rope"  # "rope" (rotary) or "learned" (absolute, GPT-2)
    rope_theta: float = 10000.0
    # Long-context RoPE scaling in transformers' `rope_scaling` form: None, or a dict with "rope_type"
    # ("linear", "dynamic", "yarn", "llama3") and that type's keys ("factor", ...); see llmkit/rope.py.
    rope_scaling: dict | None = None
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # an RMSNorm gain is (offset + weight): Gemma stores weight - 1 (offset 1.0)
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU-style down(act(gate(x)) * up(x)) instead of down(act(up(x)))
    bias: bool = False  # biases on every linear layer (GPT-2) or none (Llama)
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2); implied by `bias`
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Gemma-3, Qwen3)
    sandwich_norm: bool = False  # a second norm after attention and after the MLP, before the residual add (Gemma-2/3)
    embed_scale: bool = False  # token embeddings multiplied by sqrt(d_model) (Gemma)
    attn_scale: float | None = None  # softmax scale of attention scores; None means 1/sqrt(head_dim)
    # Sliding-window (local) attention: each query sees the last `sliding_window` positions (itself
    # included) in the layers whose `layer_types` entry is "sliding_attention"; the others are
    # "full_attention". layer_types None means every layer is full, or every layer sliding when
    # sliding_window is set (Mistral).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma-3: 10,000); None: rope_theta
    tie_embeddings: bool = False  # LM head shares the token-embedding matrix
    # The speedruns' options (modded-nanogpt, nanochat); off by default, so checkpoints load as they are.
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma-2's final_logit_softcapping)
    value_residual: bool = False  # layers > 0 mix their values with layer 0's: v = l*v + (1-l)*v_0, l learned
    # modded-nanogpt's U-net: the last n_layer // 2 layers each add, times a learned weight (init 1), the
    # output of a first-half layer, in reverse order (the last layer takes layer 0's)
    unet_skips: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # 0: a language model. N > 0: a sequence classifier (N classes) or reward model (N = 1): a `score`
    # head maps the last real token's hidden state to N logits, as transformers' *ForSequenceClassification.
    num_labels: int = 0
    # Encoders (BERT): bidirectional attention, BERT's embeddings and blocks, the MLM head and pooling.
    causal: bool = True  # False: every token attends to every real token of its row (an encoder; cannot generate)
    post_norm: bool = False  # x = norm(x + sublayer(x)) (BERT) instead of x + sublayer(norm(x)); no final norm
    type_vocab_size: int = 0  # > 0: token-type (segment) embeddings added to the token embeddings (BERT: 2)
    embed_norm: bool = False  # a norm over the summed embeddings, before the first block (BERT)
    mlm_head: bool = False  # the LM head reads norm(act(dense(h))) and has a bias (BertForMaskedLM's head)
    pooling: str = "last"  # the token a classifier reads: "last" real token (decoders), "cls" (first), "mean"
    pooler: bool = False  # the classifier reads act(dense(pooled)) and its `score` has a bias (BERT's pooler)
    pooler_activation: str = "tanh"  # that act: tanh (BERT's pooler) or the blocks' (RoFormer's classifier head)
    name: str = field(default="custom", compare=False)
    # Mixture of experts (llmkit/moe.py): n_experts > 0 replaces every block's MLP by a router and
    # n_experts MLPs of width d_ff, of which each token runs `experts_per_token` (Mixtral, Qwen2-MoE, OLMoE).
    n_experts: int = 0
    experts_per_token: int = 2
    moe_renormalize: bool = True  # top-k weights rescaled to sum to 1 (Mixtral); False: softmax probs (Qwen2-MoE, OLMoE)
    shared_expert_d_ff: int = 0  # width of an MLP every token runs besides its experts (Qwen2-MoE); 0: none
    shared_expert_gate: bool = True  # the shared MLP's output times sigmoid(x . w) (Qwen2-MoE's gate)
    router_aux_loss_coef: float = 0.01  # Switch/Mixtral load-balancing loss in the training objective
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss: mean logsumexp(router logits)^2
    # "layer": the balancing loss of each layer's router, averaged (Switch); "global": transformers'
    # load_balancing_loss_func over every layer's tokens at once, where one layer's dead expert can hide
    # behind another layer's busy one (docs/moe_vs_dense.md measured it).
    router_balance: str = "layer"

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.d_model % self.n_head:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                                  "set head_dim explicitly or choose sizes that divide")
            self.head_dim = self.d_model // self.n_head
        if self.d_ff is None:
            if self.gated_mlp:  # Llama: 2/3 of 4d, rounded up to a multiple of 256
                self.d_ff = 256 * ((int(8 * self.d_model / 3) + 255) // 256)
            else:
                self.d_ff = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                              "(each key/value head serves a whole group of query heads)")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ConfigError(f"pos_embedding={self.pos_embedding!r}; expected one of {POS_EMBEDDINGS}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm={self.norm!r}; expected one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.pooler_activation not in ("tanh", *ACTIVATIONS):
            raise ConfigError(f"pooler_activation={self.pooler_activation!r}; expected one of {('tanh', *ACTIVATIONS)}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if not self.rope_theta > 0 or (self.rope_local_theta is not None and not self.rope_local_theta > 0):
            raise ConfigError(f"rope_theta ({self.rope_theta}) and rope_local_theta ({self.rope_local_theta}) "
                              "must be positive")
        check_rope_scaling(self.rope_scaling)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ConfigError(f"layer_types must list one of {LAYER_TYPES} for each of the {self.n_layer} "
                                  f"layers, got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ConfigError(f"logit_softcap must be positive or None, got {self.logit_softcap!r}")
        if self.value_residual and not self.causal:
            raise ConfigError("value_residual is a decoder option (the speedruns'); encoders do not take it")
        if self.unet_skips and (not self.causal or self.n_layer < 2):
            raise ConfigError(f"unet_skips is a decoder option for 2 layers or more; this config is "
                              f"{'an encoder' if not self.causal else f'{self.n_layer} layer'}")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 0:
            raise ConfigError(f"num_labels must be an integer >= 0 (0: a language model), got {self.num_labels!r}")
        self._validate_moe()
        self._validate_encoder()

    def _validate_moe(self) -> None:
        for name in ("n_experts", "experts_per_token", "shared_expert_d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ModelConfig.{name} must be an integer >= 0, got {value!r}")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.router_balance not in ("layer", "global"):
            raise ConfigError(f"router_balance={self.router_balance!r}; expected 'layer' (each layer's router "
                              "balanced) or 'global' (transformers' loss over all layers at once)")
        if not self.n_experts:
            if self.shared_expert_d_ff:
                raise ConfigError(f"shared_expert_d_ff={self.shared_expert_d_ff} needs n_experts > 0 (a shared "
                                  "expert sits beside routed experts; a dense model sets d_ff instead)")
            return
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} with n_experts={self.n_experts}; expected "
                              f"1 <= experts_per_token <= n_experts (each token runs that many of the experts)")
        if not self.gated_mlp:
            raise ConfigError("n_experts > 0 needs gated_mlp=True (the experts are SwiGLU MLPs, as in Mixtral)")
        if self.bias:
            raise ConfigError("n_experts > 0 with bias=True is not supported (the experts and router have no biases)")

    def _validate_encoder(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r}; expected one of {POOLINGS}")
        if not isinstance(self.type_vocab_size, int) or isinstance(self.type_vocab_size, bool) or self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be an integer >= 0 (0: no token types), got {self.type_vocab_size!r}")
        if not self.causal and self.sliding_window is not None:
            raise ConfigError("causal=False (an encoder) with sliding_window: llmkit's encoders attend to the whole "
                              "sequence; set sliding_window=None")
        if self.post_norm and self.sandwich_norm:
            raise ConfigError("post_norm and sandwich_norm both set; a block is either post-norm (BERT) or "
                              "pre-norm with sandwich norms (Gemma)")

    def layer_type(self, layer: int) -> str:
        """ "full_attention" or "sliding_attention" for block `layer`."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "full_attention" if self.sliding_window is None else "sliding_attention"

    # ---- plain dict round trip (our own YAML/JSON, strict about unknown keys) ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})

    def cap_context(self, max_model_len: int) -> ModelConfig:
        """This model run with a shorter context (vLLM's `--max-model-len`): longer prompts are refused
        and KV caches hold at most `max_model_len` positions. Every number within it is the full model's
        (dynamic NTK reads max_seq_len as its trained context, but only beyond it, which is refused)."""
        if not isinstance(max_model_len, int) or not 1 <= max_model_len <= self.max_seq_len:
            raise ConfigError(f"max_model_len={max_model_len!r}; expected 1 to {self.max_seq_len}, the model's "
                              "context (max_seq_len): a longer context than it was built for is not served")
        return self.replace(max_seq_len=max_model_len)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})

    # ---- Hugging Face config.json ----
    @property
    def hf_model_type(self) -> str:
        """The transformers `model_type` that computes exactly this network (gpt2, llama, qwen2, gemma3_text),
        or, when only llmkit's own options (`llmkit_only`) keep it out, the family it otherwise is: its
        weights keep that family's names, and config.json says the checkpoint is llmkit's."""
        found = _family(self)
        if found is not None:
            return found[0]
        detail = "; ".join(f"{family} needs {', '.join(_misfits(self, family))}" for family in HF_FAMILIES)
        raise ConfigError(f"no transformers model_type computes this combination of fields: {detail}")

    @property
    def llmkit_only(self) -> dict[str, Any]:
        """The fields (of LLMKIT_FIELDS) that no transformers family computes for this config; empty when
        one computes it all. A checkpoint with any is written as model_type "llmkit" and refused by
        transformers and by GGUF export, instead of loading without them."""
        found = _family(self)
        return found[1] if found is not None else {}

    def check_exportable(self, target: str) -> None:
        """Refuse, by name, the fields `target` (transformers, GGUF) has no way to compute."""
        if extras := self.llmkit_only:
            raise ConfigError(f"cannot export to {target}: {', '.join(f'{k}={v!r}' for k, v in extras.items())} "
                              f"{'is' if len(extras) == 1 else 'are'} llmkit's own (the {self.hf_model_type} family "
                              "has no such layer); this model loads in llmkit only")

    def to_hf_config(self) -> dict[str, Any]:
        model_type = self.hf_model_type
        hf = {"gpt2": self._to_hf_gpt2, "llama": self._to_hf_llama, "qwen2": self._to_hf_qwen2,
              "gemma3_text": self._to_hf_gemma3, "mixtral": self._to_hf_mixtral,
              "qwen2_moe": self._to_hf_qwen2_moe, "bert": self._to_hf_bert,
              "roformer": self._to_hf_roformer}[model_type]()
        causal, classifier = HF_FAMILIES[model_type]
        if model_type in ENCODER_FAMILIES and not self.mlm_head:
            causal = ENCODER_FAMILIES[model_type]  # the bare encoder (sentence-transformers' checkpoints)
        hf = {"architectures": [classifier if self.num_labels else causal], "model_type": model_type, **hf,
              "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        if self.num_labels:
            hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            hf["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if extras := self.llmkit_only:  # a model_type transformers does not know: it refuses, not loads it wrong
            hf = {**hf, "architectures": ["Llmkit" + a for a in hf["architectures"]], "model_type": LLMKIT_MODEL_TYPE,
                  "llmkit_base_model_type": model_type, "llmkit": extras}
        return hf

    def _to_hf_gpt2(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size, "n_positions": self.max_seq_len, "n_embd": self.d_model,
            "n_layer": self.n_layer, "n_head": self.n_head, "n_inner": self.d_ff,
            "activation_function": "gelu_new" if self.activation == "gelu_tanh" else _HF_ACT[self.activation],
            "layer_norm_epsilon": self.norm_eps, "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
            "initializer_range": self.init_std, "tie_word_embeddings": True,
        }

    def _to_hf_decoder(self) -> dict[str, Any]:
        """The keys llama, qwen2 and gemma3_text share."""
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.d_model,
            "intermediate_size": self.d_ff, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim, "rms_norm_eps": self.norm_eps,
            **rope_to_hf(self.rope_theta, self.rope_scaling, self.max_seq_len),  # max_position_embeddings too
            "attention_dropout": self.dropout, "tie_word_embeddings": self.tie_embeddings,
            "initializer_range": self.init_std,
        }

    def _to_hf_llama(self) -> dict[str, Any]:
        return {**self._to_hf_decoder(), "hidden_act": _HF_ACT[self.activation], "attention_bias": self.bias,
                "mlp_bias": self.bias}

    def _to_hf_qwen2(self) -> dict[str, Any]:
        # transformers 5 reads layer_types; 4.x makes layers >= max_window_layers sliding.
        types = [self.layer_type(i) for i in range(self.n_layer)]
        sliding = "sliding_attention" in types
        leading_full = next((i for i, t in enumerate(types) if t == "sliding_attention"), self.n_layer)
        return {**self._to_hf_decoder(), "hidden_act": _HF_ACT[self.activation], "use_sliding_window": sliding,
                "sliding_window": self.sliding_window if sliding else None, "max_window_layers": leading_full,
                "layer_types": types}

    def _to_hf_gemma3(self) -> dict[str, Any]:
        hf = self._to_hf_decoder()
        local = self.rope_theta if self.rope_local_theta is None else self.rope_local_theta
        # transformers 5 keeps one RoPE per layer type; rope_scaling applies to the full-attention layers.
        hf["rope_parameters"] = {"full_attention": hf["rope_parameters"],
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
        scalar = self.head_dim if self.attn_scale is None else self.attn_scale ** -2
        return {**hf, "rope_local_base_freq": local, "hidden_activation": _HF_ACT[self.activation],
                "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                "sliding_window": self.sliding_window,
                "layer_types": [self.layer_type(i) for i in range(self.n_layer)], "attention_bias": False,
                "final_logit_softcapping": self.logit_softcap, "attn_logit_softcapping": None}

    def _to_hf_moe(self) -> dict[str, Any]:
        """The keys mixtral and qwen2_moe share; router_z_loss_coef and router_balance are llmkit's own
        (transformers keeps them)."""
        return {"num_experts_per_tok": self.experts_per_token, "router_aux_loss_coef": self.router_aux_loss_coef,
                "router_z_loss_coef": self.router_z_loss_coef, "router_balance": self.router_balance,
                "output_router_logits": False,
                "hidden_act": _HF_ACT[self.activation]}

    def _to_hf_mixtral(self) -> dict[str, Any]:
        return {**self._to_hf_decoder(), **self._to_hf_moe(), "num_local_experts": self.n_experts,
                "sliding_window": self.sliding_window, "router_jitter_noise": 0.0}

    def _to_hf_qwen2_moe(self) -> dict[str, Any]:
        return {**self._to_hf_decoder(), **self._to_hf_moe(), "num_experts": self.n_experts,
                "moe_intermediate_size": self.d_ff, "shared_expert_intermediate_size": self.shared_expert_d_ff,
                "intermediate_size": self.shared_expert_d_ff, "norm_topk_prob": self.moe_renormalize,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": self.qkv_bias,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": self.n_layer}

    def _to_hf_bert(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size, "hidden_size": self.d_model, "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head, "intermediate_size": self.d_ff,
            "hidden_act": _HF_ACT[self.activation], "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.dropout, "max_position_embeddings": self.max_seq_len,
            "type_vocab_size": self.type_vocab_size, "initializer_range": self.init_std,
            "layer_norm_eps": self.norm_eps, "position_embedding_type": "absolute", "is_decoder": False,
            "tie_word_embeddings": True,
        }

    def _to_hf_roformer(self) -> dict[str, Any]:
        hf = self._to_hf_bert()
        del hf["position_embedding_type"]
        return {**hf, "embedding_size": self.d_model, "rotary_value": False}

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the contents of a transformers `config.json` (gpt2, llama, qwen2 or gemma3_text)."""
        model_type = hf.get("model_type")
        if model_type == LLMKIT_MODEL_TYPE:
            return cls._from_llmkit_config(hf, source)
        architecture = (hf.get("architectures") or [""])[0]
        num_labels = 0
        if architecture.endswith("ForSequenceClassification"):
            num_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        readers = {"gpt2": cls._from_hf_gpt2, "llama": cls._from_hf_llama, "mistral": cls._from_hf_llama,
                   "qwen2": cls._from_hf_qwen2, "gemma3_text": cls._from_hf_gemma3, "mixtral": cls._from_hf_mixtral,
                   "qwen2_moe": cls._from_hf_qwen2_moe, "bert": cls._from_hf_bert, "roformer": cls._from_hf_roformer}
        if model_type == "gemma3":
            raise ConfigError(f"{source}: model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; "
                              "llmkit reads text-only Gemma-3 checkpoints (model_type 'gemma3_text')")
        if model_type not in readers:
            raise ConfigError(f"{source}: unsupported model_type {model_type!r}; llmkit reads "
                              f"{', '.join(repr(m) for m in readers)}")
        try:
            config = readers[model_type](hf, source).replace(num_labels=num_labels)
        except KeyError as e:
            raise ConfigError(f"{source}: model_type {model_type!r} needs the key {e.args[0]!r}, "
                              "which is missing") from None
        config.hf_model_type  # noqa: B018 - refuses a config.json no llmkit family computes
        return config

    @classmethod
    def _from_llmkit_config(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        """A family's config.json plus llmkit's own fields (see `to_hf_config`)."""
        extras, base = hf.get("llmkit"), hf.get("llmkit_base_model_type")
        if not isinstance(extras, dict) or not isinstance(base, str):
            raise ConfigError(f"{source}: model_type {LLMKIT_MODEL_TYPE!r} needs 'llmkit_base_model_type' (a "
                              "transformers model_type) and 'llmkit' (an object of llmkit's own fields)")
        if unknown := sorted(set(extras) - set(LLMKIT_FIELDS)):
            raise ConfigError(f"{source}: unknown llmkit field(s) {unknown}; known: {list(LLMKIT_FIELDS)}")
        config = cls.from_hf_config({**hf, "model_type": base}, source)
        return config.replace(**extras)

    @classmethod
    def _from_hf_gpt2(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        act = hf.get("activation_function", "gelu_new")
        if act not in _FROM_HF_ACT:
            raise ConfigError(f"{source}: unsupported activation_function {act!r}")
        return cls(
            name=hf.get("_name_or_path") or "gpt2", vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf.get("n_positions", 1024),
            pos_embedding="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=_FROM_HF_ACT[act], gated_mlp=False, bias=True, tie_embeddings=True,
            dropout=hf.get("resid_pdrop", 0.0), init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def _from_hf_bert(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        """BertModel, BertForMaskedLM or BertForSequenceClassification (the architecture picks the heads)."""
        return cls._from_hf_encoder(hf, source, "bert", {"position_embedding_type": "absolute"},
                                    pos_embedding="learned", pooler_activation="tanh")

    @classmethod
    def _from_hf_roformer(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        """RoFormer: BERT with rotary positions (interleaved pairs; the weight map reorders q and k rows
        into llmkit's halves) and a classifier head `out_proj(act(dense(cls)))` in place of the pooler."""
        hidden = hf["hidden_size"]
        act = hf.get("hidden_act", "gelu")
        return cls._from_hf_encoder(hf, source, "roformer", {"rotary_value": False, "embedding_size": hidden},
                                    pos_embedding="rope", rope_theta=10000.0,
                                    pooler_activation=_FROM_HF_ACT.get(act, "gelu"))

    @classmethod
    def _from_hf_encoder(cls, hf: dict[str, Any], source: str, family: str, fixed: dict[str, Any],
                         **fields: Any) -> ModelConfig:
        """The keys BERT and RoFormer share; `fixed`: the family's keys that must hold their one value."""
        bare, masked, classifier = ENCODER_FAMILIES[family], *HF_FAMILIES[family]
        architecture = (hf.get("architectures") or [bare])[0]
        if architecture not in (bare, masked, classifier):
            raise ConfigError(f"{source}: architecture {architecture!r} is not supported for {family}; llmkit reads "
                              f"{bare}, {masked} and {classifier}")
        for key, supported in {**fixed, "is_decoder": False, "add_cross_attention": False,
                               "tie_word_embeddings": True}.items():
            if hf.get(key) is not None and hf[key] != supported:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported for {family}; expected {supported!r}")
        act = hf.get("hidden_act", "gelu")
        if act not in _FROM_HF_ACT:
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}")
        return cls(
            name=hf.get("_name_or_path") or family, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"], d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 512), norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12), activation=_FROM_HF_ACT[act], gated_mlp=False, bias=True,
            tie_embeddings=True, dropout=hf.get("hidden_dropout_prob", 0.0), init_std=hf.get("initializer_range", 0.02),
            causal=False, post_norm=True, embed_norm=True, type_vocab_size=hf.get("type_vocab_size", 2),
            mlm_head=architecture == masked, pooling="cls", pooler=architecture != masked,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id", 0), **fields)

    @classmethod
    def _from_hf_decoder(cls, hf: dict[str, Any], source: str, act_key: str, defaults: dict[str, Any],
                         rope: dict[str, Any] | None = None, **fields: Any) -> ModelConfig:
        """The keys llama, qwen2 and gemma3_text share; `defaults`: the config class's own defaults;
        `rope`: the rope dict of the full-attention layers where a family keeps one per layer type."""
        act = hf.get(act_key, "silu")
        if act not in _FROM_HF_ACT:
            raise ConfigError(f"{source}: unsupported {act_key} {act!r}")
        values = dict(
            name=hf.get("_name_or_path") or hf["model_type"], vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_model=hf["hidden_size"], head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"],
            pos_embedding="rope", **rope_from_hf({"rope_theta": 10000.0, **defaults, **hf}, source, rope),
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), activation=_FROM_HF_ACT[act], gated_mlp=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))),
            dropout=hf.get("attention_dropout", 0.0), init_std=hf.get("initializer_range", 0.02),
            **{k: hf.get(k, defaults.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        return cls(**{**values, **fields})

    @classmethod
    def _from_hf_llama(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise ConfigError(f"{source}: attention_bias and mlp_bias differ; llmkit's `bias` field sets both")
        return cls._from_hf_decoder(hf, source, "hidden_act", {}, bias=bool(hf.get("attention_bias", False)))

    @classmethod
    def _from_hf_qwen2(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        types = hf.get("layer_types")
        if types is None and window is not None:  # transformers' rule for configs without layer_types
            types = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                     for i in range(hf["num_hidden_layers"])]
        return cls._from_hf_decoder(hf, source, "hidden_act", {}, qkv_bias=True, **_hf_layers(types, window))

    @classmethod
    def _from_hf_gemma3(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        for key in ("attn_logit_softcapping", "attention_bias", "use_bidirectional_attention"):
            if hf.get(key):
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported for gemma3_text "
                                  "(llmkit's Gemma-3 has no attention soft-capping or biases, and is causal)")
        rope = hf.get("rope_parameters") or {}
        if "full_attention" in rope or "sliding_attention" in rope:  # transformers >= 5: one per layer type
            full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        else:  # transformers 4: rope_scaling applies to the global layers, the local ones have their own base
            full, local = rope or hf.get("rope_scaling") or {}, {}
        local = rope_from_hf({"rope_theta": hf.get("rope_local_base_freq", 10000.0)}, source, local)
        if local["rope_scaling"] is not None:
            raise ConfigError(f"{source}: rope_parameters.sliding_attention has rope_type "
                              f"{local['rope_scaling']['rope_type']!r}; llmkit scales only the full-attention layers")
        types = hf.get("layer_types")
        if types is None:  # transformers' rule: every `sliding_window_pattern`-th layer is global
            pattern = hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(hf["num_hidden_layers"])]
        return cls._from_hf_decoder(
            hf, source, "hidden_activation", _GEMMA3_DEFAULTS, full, rope_local_theta=local["rope_theta"], norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True,
            attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5, logit_softcap=hf.get("final_logit_softcapping"),
            **_hf_layers(types, hf.get("sliding_window", 4096)))


    @staticmethod
    def _from_hf_moe(hf: dict[str, Any], source: str, experts_key: str) -> dict[str, Any]:
        if hf.get("router_jitter_noise"):
            raise ConfigError(f"{source}: router_jitter_noise={hf['router_jitter_noise']!r} is not supported "
                              "(llmkit's router adds no noise; expected 0)")
        return dict(n_experts=int(hf[experts_key]), experts_per_token=int(hf.get("num_experts_per_tok", 2)),
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
                    router_z_loss_coef=float(hf.get("router_z_loss_coef", 0.0)),
                    router_balance=hf.get("router_balance", "layer"))

    @classmethod
    def _from_hf_mixtral(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        window = hf.get("sliding_window")
        return cls._from_hf_decoder(hf, source, "hidden_act", {"rope_theta": 1e6},
                                    sliding_window=int(window) if window else None,
                                    **cls._from_hf_moe(hf, source, "num_local_experts"))

    @classmethod
    def _from_hf_qwen2_moe(cls, hf: dict[str, Any], source: str) -> ModelConfig:
        dense = [i for i in range(hf["num_hidden_layers"]) if i in (hf.get("mlp_only_layers") or [])
                 or (i + 1) % hf.get("decoder_sparse_step", 1)]
        if dense:
            raise ConfigError(f"{source}: layers {dense} are dense MLPs (mlp_only_layers / decoder_sparse_step); "
                              "llmkit's qwen2_moe has experts in every layer (expected decoder_sparse_step 1, "
                              "mlp_only_layers [])")
        if hf.get("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported for qwen2_moe; expected false")
        shared = int(hf.get("shared_expert_intermediate_size", 0))
        if not shared:
            raise ConfigError(f"{source}: shared_expert_intermediate_size=0; llmkit's qwen2_moe has a shared expert")
        return cls._from_hf_decoder(hf, source, "hidden_act", {}, d_ff=int(hf["moe_intermediate_size"]),
                                    qkv_bias=bool(hf.get("qkv_bias", True)), shared_expert_d_ff=shared,
                                    moe_renormalize=bool(hf.get("norm_topk_prob", False)),
                                    **cls._from_hf_moe(hf, source, "num_experts"))


def parse_model_options(spec: str) -> dict[str, Any]:
    """'qk_norm=true,logit_softcap=15' -> {'qk_norm': True, 'logit_softcap': 15}: ModelConfig fields to change
    from a preset (values read as YAML scalars; the names are checked when the config is built)."""
    import yaml

    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"model option {item!r}: expected FIELD=VALUE (e.g. qk_norm=true), comma-separated")
        options[name.strip()] = yaml.safe_load(value.strip())
    return options


# Fields of llmkit's own (the speedruns' options; QK-norm outside Gemma-3) that some or no transformers
# family computes; a checkpoint that needs them is model_type "llmkit" (`ModelConfig.llmkit_only`).
LLMKIT_FIELDS = ("logit_softcap", "value_residual", "qk_norm", "unet_skips")
LLMKIT_MODEL_TYPE = "llmkit"

# transformers model_type -> (causal LM class, sequence-classification class)
HF_FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeForSequenceClassification"),
    "bert": ("BertForMaskedLM", "BertForSequenceClassification"),
    "roformer": ("RoFormerForMaskedLM", "RoFormerForSequenceClassification"),
}
# The encoder families and their bare model (no MLM head: sentence-transformers' checkpoints).
ENCODER_FAMILIES = {"bert": "BertModel", "roformer": "RoFormerModel"}

# Gemma3TextConfig's defaults where they matter when a key is absent.
_GEMMA3_DEFAULTS = {"rope_theta": 1_000_000.0, "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}

# The fields each family fixes (field -> required value); the others (sizes, theta, eps, ...) are free.
_NOT_GEMMA = dict(norm_offset=0.0, qk_norm=False, sandwich_norm=False, embed_scale=False, attn_scale=None,
                  rope_local_theta=None, logit_softcap=None)
_FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "gpt2": dict(pos_embedding="learned", norm="layernorm", gated_mlp=False, bias=True, tie_embeddings=True,
                 rope_scaling=None, **_NOT_GEMMA),
    "llama": dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True, **_NOT_GEMMA),
    "qwen2": dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True, bias=False, qkv_bias=True, **_NOT_GEMMA),
    "gemma3_text": dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True, bias=False, qkv_bias=False,
                        norm_offset=1.0, qk_norm=True, sandwich_norm=True, embed_scale=True),
    "mixtral": dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True, bias=False, qkv_bias=False,
                    moe_renormalize=True, shared_expert_d_ff=0, **_NOT_GEMMA),
    "qwen2_moe": dict(pos_embedding="rope", norm="rmsnorm", gated_mlp=True, bias=False, shared_expert_gate=True,
                      **_NOT_GEMMA),
    "bert": dict(pos_embedding="learned", norm="layernorm", gated_mlp=False, bias=True, tie_embeddings=True,
                 rope_scaling=None, causal=False, post_norm=True, embed_norm=True, pooling="cls",
                 pooler_activation="tanh", **_NOT_GEMMA),
    # RoFormer's sinusoids are RoPE with base 10,000 over the whole head.
    "roformer": dict(pos_embedding="rope", rope_theta=10000.0, norm="layernorm", gated_mlp=False, bias=True,
                     tie_embeddings=True, rope_scaling=None, causal=False, post_norm=True, embed_norm=True,
                     pooling="cls", **_NOT_GEMMA),
}
# What every decoder family fixes: none of the encoder fields.
_DECODER = dict(causal=True, post_norm=False, type_vocab_size=0, embed_norm=False, mlm_head=False, pooling="last",
                pooler=False)
_MOE_FAMILIES = ("mixtral", "qwen2_moe")


def _fixed(family: str) -> dict[str, Any]:
    """The field values `family` requires."""
    fixed = _FAMILY_FIELDS[family] if family in ENCODER_FAMILIES else {**_FAMILY_FIELDS[family], **_DECODER}
    return {**fixed, "value_residual": False, "unet_skips": False}  # no transformers family has either


def _family(c: ModelConfig) -> tuple[str, dict[str, Any]] | None:
    """(the family that computes `c`, {}), or else (the family that computes it but for some LLMKIT_FIELDS,
    those fields' values), or None. Each family is asked only for the LLMKIT_FIELDS it fixes (Gemma-3 keeps
    its QK-norm and takes any soft-cap)."""
    for family in HF_FAMILIES:
        if not _misfits(c, family):
            return family, {}
    for family in HF_FAMILIES:
        differ = {k: v for k, v in _fixed(family).items() if k in LLMKIT_FIELDS and getattr(c, k) != v}
        if differ and not _misfits(c.replace(**differ), family):
            return family, {k: getattr(c, k) for k in LLMKIT_FIELDS if k in differ}
    return None


def _misfits(c: ModelConfig, family: str) -> list[str]:
    """What keeps `c` out of `family`, as 'field=wanted (got value)' strings; empty when it fits."""
    fixed = _fixed(family)
    wrong = [f"{k}={v!r} (got {getattr(c, k)!r})" for k, v in fixed.items() if getattr(c, k) != v]
    sliding = c.sliding_window is not None and any(c.layer_type(i) == "sliding_attention" for i in range(c.n_layer))
    if (family in _MOE_FAMILIES) != (c.n_experts > 0):
        wrong.append(f"n_experts{'>' if family in _MOE_FAMILIES else '='}0 (got n_experts={c.n_experts})")
    if family == "qwen2_moe" and not c.shared_expert_d_ff:
        wrong.append("shared_expert_d_ff>0 (got 0)")
    if family == "qwen2_moe" and sliding:
        wrong.append(f"no sliding_attention layers (got sliding_window={c.sliding_window})")
    if family == "mixtral" and c.layer_types is not None:
        wrong.append("the same attention in every layer (got layer_types)")
    if family in ("gpt2", "llama") and sliding:
        wrong.append(f"no sliding_attention layers (got sliding_window={c.sliding_window})")
    if family == "roformer" and c.pooler_activation != c.activation:
        wrong.append(f"pooler_activation=activation (got {c.pooler_activation!r}, {c.activation!r})")
    if family in ENCODER_FAMILIES and (c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.d_model or c.type_vocab_size < 1
                             or (c.num_labels and not c.pooler)):
        wrong.append(f"n_kv_head=n_head, head_dim*n_head=d_model, type_vocab_size >= 1 and a pooler when a "
                     f"classifier (got n_kv_head={c.n_kv_head}, head_dim={c.head_dim}, "
                     f"type_vocab_size={c.type_vocab_size}, pooler={c.pooler})")
    if family == "gpt2" and (c.n_kv_head != c.n_head or c.head_dim * c.n_head != c.d_model):
        wrong.append(f"n_kv_head=n_head and head_dim*n_head=d_model (got n_kv_head={c.n_kv_head}, "
                     f"head_dim={c.head_dim})")
    if family == "llama" and c.qkv_bias and not c.bias:
        wrong.append("bias=True with qkv_bias (its attention_bias covers q, k, v and o)")
    return wrong


def _hf_layers(types: list[str] | None, window: int | None) -> dict[str, Any]:
    """llmkit's (layer_types, sliding_window): None for uniform stacks (all full: no window either)."""
    if types is None or window is None or all(t == "full_attention" for t in types):
        return {"layer_types": None, "sliding_window": None}
    if all(t == "sliding_attention" for t in types):
        return {"layer_types": None, "sliding_window": int(window)}
    return {"layer_types": list(types), "sliding_window": int(window)}


_GPT2 = dict(pos_embedding="learned", norm="layernorm", activation="gelu_tanh", gated_mlp=False,
             bias=True, tie_embeddings=True, vocab_size=50257, max_seq_len=1024,
             bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", activation="silu", gated_mlp=True, bias=False)
# BERT: learned positions + token types, post-norm GELU blocks with biases, the MLM head, bidirectional.
_BERT = dict(pos_embedding="learned", norm="layernorm", norm_eps=1e-12, activation="gelu", gated_mlp=False, bias=True,
             tie_embeddings=True, causal=False, post_norm=True, embed_norm=True, type_vocab_size=2, mlm_head=True,
             pooling="cls")
# RoFormer: BERT with rotary positions. From scratch it learns word order far sooner than BERT's learned
# positions (docs/encoders.md: an MLM run of the same size and budget).
_ROFORMER = dict(_BERT, pos_embedding="rope", rope_theta=10000.0, pooler_activation="gelu")

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, d_model=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, d_model=1280),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576,
                         d_ff=1536, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "smollm2-360m": dict(_LLAMA, vocab_size=49152, n_layer=32, n_head=15, n_kv_head=5, d_model=960,
                         d_ff=2560, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    # The real checkpoints of wave 2's families (their GGUFs' metadata; tests/test_real_families.py).
    "qwen2.5-0.5b": dict(_LLAMA, vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896, d_ff=4864,
                         max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643),
    "gemma-3-270m": dict(_LLAMA, vocab_size=262144, n_layer=18, n_head=4, n_kv_head=1, d_model=640, head_dim=256,
                         d_ff=2048, max_seq_len=32768, rope_theta=1e6, rope_local_theta=1e4, norm_eps=1e-6,
                         activation="gelu_tanh", norm_offset=1.0, qk_norm=True, sandwich_norm=True,
                         embed_scale=True, attn_scale=256 ** -0.5, sliding_window=512,
                         layer_types=[("full" if i % 6 == 5 else "sliding") + "_attention" for i in range(18)],
                         tie_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # Small Llama-style sizes for CPU work, named by their parameter count at an 8,192-token vocabulary.
    "llama-tiny": dict(_LLAMA, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=192,
                       max_seq_len=256),
    "llama-2m": dict(_LLAMA, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                     d_ff=384, max_seq_len=512, tie_embeddings=True),
    # llama-2m's active parameters as a mixture of experts: 8 experts of width 192, two per token
    # (2 x 192 = llama-2m's 384), plus a 128 x 8 router per layer; 4x the MLP weights in all.
    "mixtral-2m": dict(_LLAMA, vocab_size=8192, n_layer=4, n_head=4, n_kv_head=2, d_model=128,
                       d_ff=192, max_seq_len=512, tie_embeddings=True, n_experts=8, experts_per_token=2),
    "llama-4m": dict(_LLAMA, vocab_size=8192, n_layer=6, n_head=6, n_kv_head=2, d_model=192,
                      d_ff=512, max_seq_len=512, tie_embeddings=True),
    "llama-8m": dict(_LLAMA, vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=256,
                      d_ff=704, max_seq_len=512, tie_embeddings=True),
    # A small encoder for MLM pretraining on CPU (about 2M parameters at an 8,192-token vocabulary).
    "bert-2m": dict(_BERT, vocab_size=8192, n_layer=4, n_head=4, d_model=128, d_ff=512, max_seq_len=512),
    "roformer-2m": dict(_ROFORMER, vocab_size=8192, n_layer=4, n_head=4, d_model=128, d_ff=512, max_seq_len=512),
    "llama-16m": dict(_LLAMA, vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=384,
                      d_ff=1024, max_seq_len=1024, tie_embeddings=True),
}
