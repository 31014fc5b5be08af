"""Per-sample, counter-based randomness: draws that follow the sample, not the process that holds it.

With `data.partitions` > 0 the global batch of a step does not depend on the world size (`data/partitions.py`), but
torch's RNG is one stream per process: a rank's stochastic depth, dropout masks, gate noise and detector samplers
depend on which samples share its batch. Inside `keyed_forward(keys_B)` those ops draw from a hash instead:

    draw = hash(key of the sample, call, element)

- the key of a sample is `sample_keys(positions_B, seed=, step=, micro=, task=)`: its position in the GLOBAL batch,
  handed in by the training side, which knows the layout (models never see ranks);
- `call` counts the draws of this forward: every rank runs the same modules in the same order, so the n-th draw is
  the same op everywhere (an op draws only when it is active, and whether it is depends on flags, not data);
- `element` indexes the draw within the sample (e.g. token n, expert e → n·E + e).

So a sample gets the same draws whether it sits in one batch of 8 or is the second of rank 3's 2. Outside the
context every op keeps torch's RNG, bit for bit (existing runs, checkpoints and tests do not move).

The hash is Wellons' lowbias32 over 32-bit values held in int64 tensors; each multiplication by a 32-bit constant is
split into 16-bit halves, so no product exceeds 2^49: int64 never overflows and CPU and CUDA give the same bits.

The context also collects the local denominators of loss terms that are means over a rank's pixels or sampled
anchors (`count_term`), so the training side can make those means global (`training/global_batch.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

_MASK = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x846CA68B)  # lowbias32's multipliers
_UNIFORM_BITS = 24  # float32's mantissa: every uniform is exact in fp32


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2^32 for 32-bit x and c, with every intermediate below 2^49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK


def mix32(x: Tensor) -> Tensor:
    """lowbias32: a bijection on 32-bit values (int64 tensor) with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX[1])
    return x ^ (x >> 16)


def _absorb(h: Tensor, word: Tensor | int) -> Tensor:
    return mix32(h ^ (torch.as_tensor(word, dtype=torch.int64, device=h.device) & _MASK))


def sample_keys(positions_B: Tensor, *, seed: int, step: int, micro: int, task: int) -> Tensor:
    """The key of each sample of a micro-batch: hash(seed, optimizer step, micro-batch, task, global position).

    Args:
        positions_B: [B] int64, each sample's position in the global batch of its task.
    Returns: [B] int64 holding 32-bit keys, on positions_B's device.
    """
    h = torch.zeros((), dtype=torch.int64, device=positions_B.device)
    for word in (seed & _MASK, seed >> 32, step, micro, task):
        h = _absorb(h, word)
    return _absorb(h.expand(positions_B.shape), positions_B.long())


class KeyedForward:
    """The draws and loss denominators of one forward over a slice of a global batch (see the module docstring)."""

    def __init__(self, keys_B: Tensor) -> None:
        self.keys_B = keys_B.long()
        self.calls = 0
        self.counts: dict[str, float] = {}  # loss term -> local count its mean divides by

    def bits(self, batch: int, count: int, device: torch.device) -> Tensor:
        """The next call's draws: [batch, count] int64 32-bit hashes; element j of sample b depends on (key_b, call,
        j) only. Raises ValueError when `batch` is not the keyed batch (a draw that could not follow its sample)."""
        if batch != self.keys_B.numel():
            raise ValueError(f"a keyed draw for {batch} samples inside a forward keyed for {self.keys_B.numel()}")
        key_B1 = _absorb(self.keys_B.to(device), self.calls).unsqueeze(1)
        self.calls += 1
        # two rounds: consecutive element indices differ in few bits
        return mix32(_absorb(key_B1, torch.arange(count, device=device)))

    def uniform(self, batch: int, count: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """[batch, count] uniform in (0, 1), 24-bit resolution (never 0 or 1)."""
        top = self.bits(batch, count, device) >> (32 - _UNIFORM_BITS)
        wide = torch.float64 if dtype == torch.float64 else torch.float32  # exact in both
        return ((top.to(wide) + 0.5) / float(1 << _UNIFORM_BITS)).to(dtype)

    def normal(self, batch: int, count: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """[batch, count] standard normal (Box-Muller over two uniform draws; 24-bit uniforms bound |z| by 5.9).

        In float64, rounded once: vectorised and scalar log/cos kernels (CPU SIMD body vs tail) differ in the last
        bit, and which elements fall in the tail depends on the tensor's size, i.e. on the local batch; one float64
        ulp changes the fp32 result only at a rounding tie (~2^-29 of the draws)."""
        u1, u2 = (self.uniform(batch, count, device, torch.float64) for _ in range(2))
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)

    def count_term(self, term: str, count: float) -> None:
        """Record that loss `term` of this forward is a mean over `count` local items (pixels, anchors, RoIs)."""
        self.counts[term] = self.counts.get(term, 0.0) + float(count)


_ACTIVE: ContextVar[KeyedForward | None] = ContextVar("keyed_forward", default=None)


@contextmanager
def keyed_forward(keys_B: Tensor) -> Iterator[KeyedForward]:
    """Key every random op of the forwards inside by `keys_B` [B] (`sample_keys`); yields the `KeyedForward`,
    whose `counts` the training side reads after the forward."""
    keyed = KeyedForward(keys_B)
    token = _ACTIVE.set(keyed)
    try:
        yield keyed
    finally:
        _ACTIVE.reset(token)


def active() -> KeyedForward | None:
    """The keyed forward in progress, or None (ops then use torch's RNG)."""
    return _ACTIVE.get()


def count_term(term: str, count: float) -> None:
    """`KeyedForward.count_term` when a keyed forward is in progress; nothing otherwise."""
    keyed = active()
    if keyed is not None:
        keyed.count_term(term, count)


def randn_like(x: Tensor, batch: int) -> Tensor:
    """`torch.randn_like(x)` outside a keyed forward; inside, normals keyed per sample, x's rows sample-major
    (`batch` samples of x.numel() / batch elements each, e.g. routing logits [B·N, E])."""
    keyed = active()
    if keyed is None:
        return torch.randn_like(x)
    return keyed.normal(batch, x.numel() // batch, x.device, x.dtype).view_as(x)


def softplus(x: Tensor) -> Tensor:
    """`F.softplus(x)` outside a keyed forward; inside, in float64 rounded once: CPU kernels compute the SIMD body and
    the scalar tail of a tensor differently in the last bit, and which elements are the tail depends on the size of
    the local batch (the gate noise std would differ by an ulp between layouts)."""
    if active() is None:
        return F.softplus(x)
    return F.softplus(x.double()).to(x.dtype)


def _keep_mask(keyed: KeyedForward, shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A {0, 1/(1-p)} mask of `shape` (dim 0 = samples) in like's dtype: element kept with probability 1 - p."""
    keep = keyed.uniform(shape[0], math.prod(shape[1:]), like.device) >= p
    return (keep.to(like.dtype) / (1.0 - p) if p < 1 else keep.to(like.dtype)).view(shape)


class KeyedDropPath(DropPath):
    """timm's `DropPath` (stochastic depth per sample); inside a keyed forward the per-sample keep draw is keyed."""

    def forward(self, x: Tensor) -> Tensor:
        keyed = active()
        if keyed is None or not self.training or self.drop_prob == 0.0:
            return super().forward(x)
        keep = 1.0 - self.drop_prob
        keep_B = (keyed.uniform(x.shape[0], 1, x.device) < keep).to(x.dtype)
        if keep > 0 and self.scale_by_keep:
            keep_B = keep_B / keep
        return x * keep_B.view(x.shape[0], *(1,) * (x.dim() - 1))


class KeyedDropout(nn.Dropout):
    """`nn.Dropout` ([B, ...] inputs); inside a keyed forward each sample's element mask is keyed."""

    def forward(self, x: Tensor) -> Tensor:
        keyed = active()
        if keyed is None or not self.training or self.p == 0.0 or x.dim() < 2:
            return super().forward(x)
        return x * _keep_mask(keyed, tuple(x.shape), self.p, x)


class KeyedDropout2d(nn.Dropout2d):
    """`nn.Dropout2d` ([B, C, H, W]: whole channels); inside a keyed forward each sample's channel mask is keyed."""

    def forward(self, x: Tensor) -> Tensor:
        keyed = active()
        if keyed is None or not self.training or self.p == 0.0 or x.dim() != 4:
            return super().forward(x)
        return x * _keep_mask(keyed, (x.shape[0], x.shape[1], 1, 1), self.p, x)


def keyed_dropout_allowed(p: float) -> None:
    """ValueError inside a keyed forward when a fused kernel would draw `p` > 0 dropout from torch's RNG."""
    if p > 0 and active() is not None:
        raise ValueError(f"attention dropout {p} draws from the process RNG inside a fused kernel: it cannot be "
                         "keyed per sample (data.partitions > 0); set it to 0")

