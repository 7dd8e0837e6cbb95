"""Training memory per device, estimated before anything is trained: will a cell fit, and on what.

The cell's formulation is built on the meta device (shapes, no values, no weights loaded) from its backbone's tiny
options, its `config.json`, or, when the weights are not on this machine, the published sizes its plugin declares
(`robovlms/backbone/architecture.py`). From it, per device:

    weights      every parameter, in its dtype: backbone.dtype for the backbone (float32 keeps fp32 master weights
                 under mixed precision), float32 for the formulation's own, 16-bit for all under *-true precision
    gradients    one per trainable parameter, in the parameter's dtype
    optimizer    AdamW's two moments per trainable parameter, in the parameter's dtype
    activations  what the training forward of one micro-batch (batch_size windows) keeps for backward: the
                 backbone's layers as it describes them (`Backbone.activation_layers`, the formula in
                 `robovlms/backbone/activations.py`) over the contexts its formulation builds for the cell's history,
                 views and image tokens; the formulation's own layers, counted by running its loss on the meta
                 device; and the batch itself
    checkpointed the activations with gradient checkpointing: each checkpointed layer keeps only its input, and
                 backward recomputes one layer at a time

Strategies divide what they shard among the devices of a cell (devices x num_nodes):

    auto, ddp    nothing (ddp keeps a second copy of the gradients in its all-reduce buckets)
    fsdp         weights, gradients and optimizer state (full sharding), plus one layer gathered at a time
    deepspeed    ZeRO (Rajbhandari et al. 2020) with 16-bit weights and gradients and an fp32 master copy inside the
                 optimizer state (12 bytes per trainable parameter under mixed precision): stage 2 shards gradients
                 and optimizer state, stage 3 the weights too

Not counted: the CUDA context and allocator fragmentation (leave 10-20% free), and transient buffers of one
operation (the largest: a discrete head's logits over the whole vocabulary, before the action tokens are picked out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from robovlms.backbone.activations import Elements, Layers
from robovlms.errors import ConfigError

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHARDED_STRATEGIES = ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3")


@dataclass
class MemoryEstimate:
    """Bytes per device of one training step; `activations` is None where the backbone does not describe its
    forward."""

    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    activations: float | None
    checkpointed: float | None  # the activations with gradient checkpointing
    other: float = 0.0  # the batch; ddp's gradient buckets; fsdp's gathered layer
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool = False) -> float | None:
        activations = self.checkpointed if checkpointing else self.activations
        if activations is None:
            return None
        return self.weights + self.gradients + self.optimizer + activations + self.other


@dataclass
class BackboneCall:
    """How a formulation's loss called its backbone: the shapes `Backbone.forward` received."""

    images: int  # B * T * V
    frames: int
    views: int
    suffix: int  # K
    instructions: int
    interleaved: bool
    instruction_per_frame: bool


def meta_formulation(config, action_dim: int, state_dim: int, published: bool = False):
    """The formulation `config` (a TrainingConfig) trains, built on the meta device with its freezing applied, and
    where its backbone's sizes came from (`robovlms/backbone/architecture.py`; `published`: stand in published
    sizes for a pretrained path that is not on this machine)."""
    from robovlms.backbone.architecture import meta_backbone
    from robovlms.data.store import Statistics
    from robovlms.training.run_dir import build_formulation

    def unit(dim: int) -> Statistics:
        return Statistics(p01=[-1.0] * dim, p99=[1.0] * dim, mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim,
                          max=[1.0] * dim)

    settings = config.backbone
    architecture = meta_backbone(settings.name, settings.size, settings.path, settings.options, published)
    with torch.device("meta"):
        formulation = build_formulation(config, architecture.backbone, unit(action_dim),
                                        unit(state_dim) if config.use_state else None)
    return formulation, architecture


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """Total and trainable parameters, each shared tensor once."""
    parameters = list(module.parameters())
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad)


def estimate_memory(config, formulation, batch: dict[str, torch.Tensor], instruction: str) -> MemoryEstimate:
    """Per-device training memory of `config` (a TrainingConfig) for `formulation` built on the meta device with
    its freezing applied, on a batch of `batch`'s shapes (images (B, T, V, S, S, 3), state, actions; any device),
    every context holding `instruction` (the longest the cell will see)."""
    backbone = formulation.backbone
    precision = str(config.precision)
    true_16 = precision.endswith("-true")
    world = devices(config.devices) * config.num_nodes
    strategy = str(config.strategy)

    parameters, trainable = parameter_counts(formulation)
    own = {id(p) for p in formulation.parameters()} - {id(p) for p in backbone.parameters()}
    weights = gradients = optimizer = 0.0
    for p in formulation.parameters():
        size = 2 if true_16 else (4 if id(p) in own else DTYPE_BYTES[config.backbone.dtype])
        weights += p.numel() * size
        if p.requires_grad:
            gradients += p.numel() * size
            optimizer += 2 * p.numel() * size
    notes = []
    other = float(batch_bytes(batch))
    if strategy.startswith("deepspeed"):
        sixteen = precision != "32"
        weights = sum(p.numel() for p in formulation.parameters()) * (2 if sixteen else 4)
        gradients = trainable * (2 if sixteen else 4) / world
        optimizer = trainable * (12 if sixteen else 8) / world
        if strategy == "deepspeed_stage_3":
            weights /= world
    elif strategy == "fsdp":
        weights, gradients, optimizer = weights / world, gradients / world, optimizer / world
        other += largest_layer_parameters(backbone) * (4 if precision == "32" else 2)
    elif strategy.startswith("ddp") and world > 1:
        other += gradients  # the all-reduce buckets: a second copy of the gradients
    elif strategy not in ("auto", "ddp", "single_device") and world > 1:
        notes.append(f"strategy {strategy}: estimated as replicated on every device")

    if precision.endswith("-mixed"):
        # autocast's 16-bit copies of the weights on the gradient path (every trainable one, and the frozen
        # language model's, through which the gradient reaches the suffix), kept for backward
        on_path = {id(p): p for p in formulation.parameters() if p.requires_grad}
        on_path.update({id(p): p for module in backbone.language_modules() for p in module.parameters()})
        other += 2 * sum(p.numel() for p in on_path.values() if p.dim() >= 2)
    activations = checkpointed = None
    calls, head = trace_backbone_calls(formulation, batch)
    described = [described_forward(backbone, call, instruction) for call in calls]
    if calls and all(described):
        layers = [item for items in described for item in items]
        whole = sum((item.saved() for item in layers), Elements()) + head
        activations = float(whole.bytes(precision))
        checkpointed = float(checkpointed_bytes(layers, head, precision, residual_bytes=2 if true_16 else 4))
    elif calls:
        notes.append(f"{backbone.name} does not describe its forward (Backbone.activation_layers): activations "
                     f"not estimated")
    return MemoryEstimate(parameters, trainable, weights, gradients, optimizer, activations, checkpointed, other,
                          notes)


def devices(value: Any) -> int:
    """A cell's devices per node as a count (Lightning also takes "auto", -1 or a list of indices)."""
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, str) and "," in value:
        return len([part for part in value.split(",") if part.strip()])
    return 1  # "auto" or -1: every device of the machine, unknown here; the estimate is per device anyway


def batch_bytes(batch: dict[str, torch.Tensor]) -> int:
    return sum(value.numel() * value.element_size() for value in batch.values() if torch.is_tensor(value))


def largest_layer_parameters(module: torch.nn.Module) -> int:
    """Parameters of the largest layer of any ModuleList in `module`: what FSDP gathers at once."""
    largest = 0
    for child in module.modules():
        if isinstance(child, torch.nn.ModuleList):
            for layer in child:
                largest = max(largest, sum(p.numel() for p in layer.parameters()))
    return largest


def checkpointed_bytes(layers: list, head: Elements, precision: str, residual_bytes: int) -> int:
    """Activations under gradient checkpointing: what is not checkpointed, the input of every checkpointed layer,
    and the largest checkpointed layer once more, recomputed in backward."""
    kept = head.bytes(precision)
    recomputed = 0
    for item in layers:
        if isinstance(item, Layers) and item.checkpointed:
            kept += item.count * item.layer_input() * residual_bytes
            if item.count:
                recomputed = max(recomputed, item.saved().bytes(precision) // item.count)
        else:
            kept += item.saved().bytes(precision)
    return kept + recomputed


def described_forward(backbone, call: BackboneCall, instruction: str) -> list | None:
    """`Backbone.activation_layers` for one call, with the contexts the backbone builds for it."""
    rows_per_sample = 1 if call.interleaved else call.frames
    context = backbone.build_context([instruction], call.frames, call.views, call.suffix, call.interleaved,
                                     call.instruction_per_frame)
    rows, length = call.instructions * rows_per_sample, context.input_ids.shape[1]
    return backbone.activation_layers(call.images, rows, length) or None


def trace_backbone_calls(formulation, batch: dict[str, torch.Tensor]) -> tuple[list[BackboneCall], Elements]:
    """Run the formulation's training loss on the meta device with its backbone's forward replaced by one of the
    same output shape: the calls it makes, and the elements its own layers (heads, fusion, losses) keep."""
    backbone = formulation.backbone
    calls: list[BackboneCall] = []

    def forward(pixel_values, instructions, suffix_embeds, interleaved=False, instruction_per_frame=False):
        B, T, V = pixel_values.shape[:3]
        calls.append(BackboneCall(B * T * V, T, V, suffix_embeds.shape[2], len(instructions), interleaved,
                                  instruction_per_frame))
        return suffix_embeds * 1.0  # (B, T, K, D), as a backbone returns it

    parameters = {id(p) for p in formulation.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in parameters and id(base) not in parameters:
            kept.setdefault(id(base), base)
        return tensor

    meta_batch = {key: value.to("meta") if torch.is_tensor(value) else value for key, value in batch.items()}
    backbone.forward = forward
    # nonzero has no meta shape; taken as every element nonzero, an upper bound (IDEFICS' decoupled embedding looks
    # up the teacher-forced action tokens of autoregressive decoding with torch.where)
    import torch.fx.experimental._config as fx_config

    try:
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
              fx_config.patch(meta_nonzero_assume_all_nonzero=True)):
            formulation.loss(meta_batch, torch.Generator().manual_seed(0))
    except (RuntimeError, NotImplementedError, TypeError) as error:
        if not calls:
            raise ConfigError(f"the loss of {formulation.name} cannot run on the meta device to find how it calls "
                              f"its backbone: {str(error).splitlines()[0]}") from None
    finally:
        del backbone.forward  # the class's forward again
    elements = sum(tensor.numel() for tensor in kept.values() if tensor.is_floating_point())
    return calls, Elements(other=elements)


def measure_memory(formulation, batch: dict[str, Any], autocast: torch.dtype | None = None) -> MemoryEstimate:
    """What one training step (loss, backward, AdamW step) of `formulation` on `batch` actually holds on the CPU:
    parameter, gradient and AdamW-state bytes, and the bytes of every tensor autograd keeps for backward (each
    storage once, parameters left out), measured with `torch.autograd.graph.saved_tensors_hooks`. `autocast`:
    run the forward under CPU autocast to that dtype (bf16-mixed)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in formulation.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    trainable = [p for p in formulation.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    formulation.train()
    with (torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None),
          torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)):
        loss = formulation.loss(batch, torch.Generator().manual_seed(0))[0]
    loss.backward()
    optimizer.step()
    parameters, trainable_count = parameter_counts(formulation)
    tensors = {id(p): p for p in formulation.parameters()}.values()
    return MemoryEstimate(
        parameters, trainable_count,
        weights=float(sum(p.numel() * p.element_size() for p in tensors)),
        gradients=float(sum(p.grad.numel() * p.grad.element_size() for p in tensors if p.grad is not None)),
        optimizer=float(sum(value.numel() * value.element_size() for state in optimizer.state.values()
                            for key, value in state.items() if key != "step")),
        activations=float(sum(kept.values())), checkpointed=None, other=float(batch_bytes(batch)))


def format_bytes(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / 1024 ** 2:.0f} MiB"

