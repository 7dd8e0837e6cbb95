"""What a backbone's forward keeps for backward: the layers it runs over a batch, described by the sizes of its
config, from which `robovlms/training/memory.py` estimates the activation memory of a training step.

A backbone describes its forward with `Backbone.activation_layers(images, rows, context)`: a list of `Layers`
(identical transformer layers and the tokens they run over) and `Saved` (anything else it keeps, counted by hand:
a conv stem's feature maps, the pixels). Each counts the elements autograd saves, measured per tensor on the
transformers implementations (docs/sweeps.md gives the formula and how well it agrees with a measured step).

Per token and layer, for a pre-norm layer of width h, MLP width f, a heads, key/value width kv:

    norms       LayerNorm: input and two statistics, h + 2; RMSNorm (computed in fp32): input, statistic and
                the normalised input its weight multiplies, 2h + 1 (h + 1 when its weight is frozen)
    attention   q, out and the log-sum-exp of a fused kernel (flash, memory-efficient, CPU flash): h + h + a,
                and k, v per key token: 2 kv; an explicit softmax instead keeps scores and probabilities,
                2 a x keys per query token
    linears     the input of each linear whose weight trains: h before q/k/v, h before the MLP, f before the
                MLP's output (none of them when frozen: a frozen linear passes the gradient on with its weight)
    MLP         plain: f x (1 or 2: what the activation keeps, 2 for quick_gelu); gated: 3f (act input, and
                both factors of the product)

Layers through which no gradient flows (a frozen vision tower) keep nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass(frozen=True)
class Elements:
    """Elements kept for backward, by how many bytes each takes: `norms` compute in fp32 under mixed precision
    (4 bytes), `masks` are dropout masks (1 byte), `other` take the activations' dtype, and `cast_copies` exist
    only under autocast: each linear keeps its own 16-bit copy of an fp32 input it shares with others (q, k and v
    after a norm)."""

    norms: int = 0
    other: int = 0
    masks: int = 0
    cast_copies: int = 0

    def __add__(self, more: Elements) -> Elements:
        return Elements(self.norms + more.norms, self.other + more.other, self.masks + more.masks,
                        self.cast_copies + more.cast_copies)

    def times(self, factor: int) -> Elements:
        return Elements(self.norms * factor, self.other * factor, self.masks * factor, self.cast_copies * factor)

    def bytes(self, precision: str) -> int:
        """Bytes under Lightning `precision` ("32", "bf16-mixed", "16-mixed", "bf16-true", ...)."""
        if precision == "32":
            return 4 * (self.norms + self.other) + self.masks
        mixed = precision.endswith("-mixed")
        return 4 * self.norms + 2 * (self.other + (self.cast_copies if mixed else 0)) + self.masks


@dataclass(frozen=True)
class Layers:
    """`count` identical transformer layers run over `sequences` sequences of `tokens` tokens each."""

    name: str
    count: int
    sequences: int
    tokens: int
    hidden: int
    intermediate: int  # 0: no MLP
    heads: int
    kv_hidden: int | None = None  # key/value width, when grouped-query attention makes it narrower than `hidden`
    input_projections: int = 3  # linears reading the attention's input: q, k, v (1 for a fused qkv)
    key_tokens: int | None = None  # cross-attention: tokens attended to per sequence; None: self-attention
    key_input: int = 0  # cross-attention: width of the key/value input, kept when the k/v projections train
    norm: Literal["layer", "rms"] = "layer"
    norms: int = 2  # pre-norms per layer
    mlp: Literal["plain", "gated"] = "plain"
    activation_copies: int = 1  # tensors of width `intermediate` the activation keeps (2 for quick_gelu)
    attention_norm: bool = False  # a norm between attention and its output projection (Kosmos-2's sub-layer norms)
    qk_norms: bool = False  # norms of the queries and keys (IDEFICS)
    mlp_norm: bool = False  # and between the MLP's activation and its output projection
    explicit_attention: bool = False  # scores and probabilities kept (an attention without a fused kernel)
    attention_mask: bool = False  # a mask of queries x keys per sequence, kept by every layer's attention
    dropouts: int = 0  # dropouts of width `hidden` per layer that keep a mask (dropout > 0 in the config)
    attention_trains: bool = True  # q/k/v/o weights train, or carry LoRA adapters
    mlp_trains: bool = True
    norms_train: bool = True
    on_gradient_path: bool = True  # False: nothing before or in it trains (a frozen vision tower): it keeps nothing
    checkpointed: bool = True  # recomputed in backward under gradient checkpointing, keeping only its input

    def saved(self) -> Elements:
        """Elements kept for backward by all `count` layers."""
        if not self.on_gradient_path:
            return Elements()
        h, f, a = self.hidden, self.intermediate, self.heads
        kv = self.kv_hidden or h
        keys = self.key_tokens or self.tokens
        norm_width = h + 2 if self.norm == "layer" else (2 * h + 1 if self.norms_train else h + 1)
        norms = ((self.norms + 2 * self.qk_norms) * norm_width + (h + 2 if self.attention_norm else 0)
                 + (f + 2 if self.mlp_norm else 0))
        per_query = 2 * h + a  # q, the output, the log-sum-exp
        if self.explicit_attention:
            per_query += 2 * a * keys
        if self.attention_mask:
            per_query += keys  # the fused kernel converts the model's boolean mask to an additive one at each call
        linears = h if self.attention_trains else 0  # the input of q/k/v
        if self.attention_norm and self.attention_trains:
            linears += h  # the sub-layer norm's output, before the output projection
        mlp = 0
        if f:
            linears += h + f if self.mlp_trains else 0  # the inputs of the MLP's two projections
            mlp = 3 * f if self.mlp == "gated" else self.activation_copies * f
        key_input = self.key_input if self.key_tokens and self.attention_trains else 0
        other = self.tokens * (per_query + linears + mlp) + keys * (2 * kv + key_input)
        copies = 0  # second copies of shared inputs: q/k/v's (self-attention) or k/v's (cross-attention), gate/up's
        if self.attention_trains:
            copies += keys * key_input if self.key_tokens else self.tokens * (self.input_projections - 1) * h
        if f and self.mlp_trains and self.mlp == "gated":
            copies += self.tokens * h
        per_sequence = Elements(norms=self.tokens * norms, other=other, masks=self.tokens * self.dropouts * h,
                                cast_copies=copies)
        return per_sequence.times(self.count * self.sequences)

    def layer_input(self) -> int:
        """Elements of one layer's input over every sequence: what gradient checkpointing keeps per layer."""
        return self.sequences * self.tokens * self.hidden if self.on_gradient_path else 0


@dataclass(frozen=True)
class Saved:
    """Elements a forward keeps outside transformer layers (a conv stem, pixels, a projection)."""

    name: str
    elements: Elements

    def saved(self) -> Elements:
        return self.elements


def training_flags(layer: nn.Module) -> dict[str, bool]:
    """Which parts of one transformer layer train, from its parameters' requires_grad (LoRA adapters count as
    their projection training): `attention_trains`, `mlp_trains`, `norms_train` for `Layers`."""
    flags = {"attention_trains": False, "mlp_trains": False, "norms_train": False}
    for name, module in layer.named_modules():
        trains = any(p.requires_grad for p in module.parameters(recurse=False))
        if not trains:
            continue
        parts = name.lower().split(".")
        if "norm" in type(module).__name__.lower():
            flags["norms_train"] = True
        elif any("attn" in part or "attention" in part for part in parts):
            flags["attention_trains"] = True
        elif any(part.startswith(("mlp", "ffn", "fc", "feed_forward", "dense")) for part in parts):
            flags["mlp_trains"] = True
    return flags


def trains(modules: list[nn.Module]) -> bool:
    """Whether any parameter of `modules` trains."""
    return any(p.requires_grad for module in modules for p in module.parameters())


def config_layers(name: str, layers: nn.ModuleList, config, sequences: int, tokens: int, on_gradient_path: bool,
                  **overrides) -> Layers:
    """`Layers` for a transformers stack (`layers`, its ModuleList) from its config (hidden_size or embed_dim,
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size or ffn_dim,
    hidden_act) and its first layer's modules (RMSNorm or LayerNorm, a gated MLP or not, what trains)."""
    hidden = _first(config, "hidden_size", "embed_dim", "d_model")
    heads = _first(config, "num_attention_heads", "attention_heads", "num_heads")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    modules = dict(layers[0].named_modules())
    sizes = dict(count=len(layers), sequences=sequences, tokens=tokens, hidden=hidden,
                 intermediate=_first(config, "intermediate_size", "ffn_dim"), heads=heads,
                 kv_hidden=kv_heads * head_dim,
                 norm="rms" if any("rms" in type(m).__name__.lower() for m in modules.values()) else "layer",
                 mlp="gated" if any(name.endswith("gate_proj") for name in modules) else "plain",
                 activation_copies=2 if getattr(config, "hidden_act", None) == "quick_gelu" else 1,
                 on_gradient_path=on_gradient_path, checkpointed=_checkpointed(layers[0]), **training_flags(layers[0]))
    return Layers(name, **{**sizes, **overrides})


def _checkpointed(layer: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing recomputes this layer (its layers derive from
    GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return isinstance(layer, GradientCheckpointingLayer)


def _first(config, *names: str):
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise AttributeError(f"{type(config).__name__} has none of {', '.join(names)}")


def find_layers(modules: list[nn.Module]) -> nn.ModuleList | None:
    """The first non-empty ModuleList among `modules`, or named `layers` under them (a transformers encoder's or
    decoder's layers)."""
    for module in modules:
        if isinstance(module, nn.ModuleList) and len(module):
            return module
        for name, child in module.named_modules():
            if isinstance(child, nn.ModuleList) and len(child) and name.split(".")[-1] == "layers":
                return child
    return None
