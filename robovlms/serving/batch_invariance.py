"""Batch invariance on the CPU: a row's result must not depend on how many rows share its forward pass.

The CPU kernels are not batch invariant below a few rows (measured with torch 2.13, MKL 2024.2 and oneDNN 3.12): a
row of an (M, K) @ (K, N) product with few rows M differs in its last bits from the same row among many (MKL's
small-M kernels). How few depends on the CPU: on one AVX-512 Xeon every M >= 4 gave the bits of M = 512; on an
AMX-capable one (Sapphire Rapids class) M up to 15 differed wherever K >= 128, and every M >= 16 gave the bits of
M = 512 wherever the row sits (K 38 to 4,096, N 6 to 1,024); a convolution of
one image differs from the same image among others (oneDNN); in bfloat16 oneDNN lays a convolution's output out
channels-last for some batch sizes only, and a GroupNorm after it reduces in another order on each layout, and a
3-D input to a linear layer takes another path than a 2-D one.

In a policy the few-row layers are the heads that read one vector per episode (B rows), the fusion of the history
(B * H rows), the state embedding, and a vision stem that sees one image per episode. Inside `with invariance:`,
every nn.Linear, recurrent layer and transformer encoder given fewer than MIN_ROWS rows, and every convolution given
fewer than MIN_IMAGES images, gets zero rows appended, whose outputs are dropped; a linear layer's input is always
one (rows, features) matrix and a convolution's output always contiguous. Layers that see enough rows (the
backbone's, whose rows are tokens) run as they are.

With that, and with the rows of one forward pass sharing their context length (robovlms/serving/batched_policy.py
groups the episodes so that none is padded), an episode's actions are bitwise equal alone and in any batch on the
CPU (tests/test_batched_policy.py, every formulation). On CUDA, cuBLAS picks its kernels by shape for every M, so
padding a few rows would not make it batch invariant and is not done: there a batched step may differ from a single
one in the last bits.
"""

from __future__ import annotations

import weakref
from typing import ClassVar, Self

import torch
from torch import nn

MIN_ROWS = 16  # of a matrix product (and of the batch of a recurrent layer or transformer encoder)
MIN_IMAGES = 2  # of a convolution: only a batch of one differed (fp32; bf16 never did)
_BATCH_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_DIM_BY_SETTING = (nn.RNNBase, nn.TransformerEncoder, nn.TransformerEncoderLayer)


def _pad(x: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = rows - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class BatchInvariance:
    """Hooks on `model`'s few-row layers, padding their rows to `rows` (a convolution's to `images`) while active
    (`with invariance: ...`).
    `BatchInvariance.of(model)` hooks a model once, however many policies serve it."""

    _hooked: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module) -> BatchInvariance:
        if model not in cls._hooked:
            cls._hooked[model] = cls(model)
        return cls._hooked[model]

    def __init__(self, model: nn.Module, rows: int = MIN_ROWS, images: int = MIN_IMAGES):
        self.rows, self.images = rows, images
        self.active = False
        self._handles = []
        self._padded: dict[int, list] = {}  # module id -> what each padded call must drop, innermost last
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._hook(module, self._pad_linear, self._unpad_linear)
            elif isinstance(module, _BATCH_FIRST) or isinstance(module, _BATCH_DIM_BY_SETTING) and not _inside_padded(module, model):
                self._hook(module, self._pad_batch, self._unpad_batch)

    def __enter__(self) -> Self:
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module: nn.Module, pad, unpad) -> None:
        self._handles.append(module.register_forward_pre_hook(pad))
        self._handles.append(module.register_forward_hook(unpad))

    # nn.Linear: the rows are every leading dimension together, always given as one (rows, features) matrix: a
    # bfloat16 product of a 3-D input takes another path than the 2-D one a padded input becomes
    def _pad_linear(self, module: nn.Linear, args):
        x = args[0]
        if not self.active or x.dim() == 0:
            self._padded.setdefault(id(module), []).append(None)
            return None
        rows = x.numel() // max(x.shape[-1], 1)
        self._padded.setdefault(id(module), []).append((rows, x.shape[:-1]))
        matrix = x.reshape(rows, x.shape[-1])
        return (_pad(matrix, 0, self.rows) if rows < self.rows else matrix, *args[1:])

    def _unpad_linear(self, module: nn.Linear, args, output: torch.Tensor):
        padded = self._padded[id(module)].pop()
        if padded is None:
            return None
        rows, leading = padded
        return output[:rows].reshape(*leading, output.shape[-1])

    # convolutions, recurrent layers, transformer encoders: the batch is one dimension of the first argument
    def _pad_batch(self, module: nn.Module, args):
        dim = _batch_dim(module)
        rows = self.images if isinstance(module, _BATCH_FIRST) else self.rows
        x = args[0] if args else None
        if not self.active or not torch.is_tensor(x) or x.dim() < 2 or x.shape[dim] >= rows:
            self._padded.setdefault(id(module), []).append(None)
            return None
        self._padded.setdefault(id(module), []).append(x.shape[dim])
        rest = list(args[1:])
        if isinstance(module, nn.RNNBase) and rest and rest[0] is not None:  # an initial state: (layers, B, W)
            rest[0] = tuple(_pad(h, 1, rows) for h in rest[0]) if isinstance(rest[0], tuple) else \
                _pad(rest[0], 1, rows)
        return (_pad(x, dim, rows), *rest)

    def _unpad_batch(self, module: nn.Module, args, output):
        rows = self._padded[id(module)].pop()
        if isinstance(module, _BATCH_FIRST) and self.active:
            # oneDNN returns a bfloat16 convolution's output channels-last for some batch sizes and not for others,
            # and the norms after it reduce in another order on each layout: always hand them the same one
            output = output.contiguous()
        if rows is None:
            return output
        dim = _batch_dim(module)
        if isinstance(module, nn.RNNBase):  # (outputs, state); the state (layers, B, W) or a tuple of them
            outputs, state = output
            state = tuple(h.narrow(1, 0, rows) for h in state) if isinstance(state, tuple) else state.narrow(1, 0, rows)
            return outputs.narrow(dim, 0, rows), state
        return output.narrow(dim, 0, rows)


def _batch_dim(module: nn.Module) -> int:
    if isinstance(module, _BATCH_FIRST):
        return 0
    if isinstance(module, nn.TransformerEncoder):
        return 0 if module.layers[0].self_attn.batch_first else 1
    if isinstance(module, nn.TransformerEncoderLayer):
        return 0 if module.self_attn.batch_first else 1
    return 0 if module.batch_first else 1


def _inside_padded(module: nn.Module, model: nn.Module) -> bool:
    """A layer inside a transformer encoder, which is padded as a whole (its fused fast path never calls its layers'
    forward hooks)."""
    return any(isinstance(outer, nn.TransformerEncoder) and any(inner is module for inner in outer.modules()
                                                                 if inner is not outer)
               for outer in model.modules())
