"""Data-parallel gradient communication in 1-5-2, with error feedback (a DDP communication hook).

Per DistributedDataParallel bucket and step, on every rank:

1. ``g = gradient + residual`` (error feedback: what this rank's earlier roundings left out);
2. one shared exponent bias for the bucket, from the largest ``|g|`` over all ranks (a 4-byte
   all-reduce), so that every rank's codes mean the same scale;
3. ``q = E5M2(g)``; the residual becomes ``g - q`` (kept on this rank, added next step);
4. **reduce-scatter in FP8**: the 1-byte codes are exchanged with ``all_to_all`` so that rank
   ``r`` receives every rank's codes of chunk ``r`` of the bucket and sums them (in float32;
   sums of a few E5M2 values are exact there);
5. the partial sum (plus this rank's residual of its chunk) is rounded to E5M2 again at the
   shared bias of ``world x max|g|``, the new residual kept;
6. **all-gather in FP8**: the codes of every chunk go to every rank, which decodes them and
   divides by the world size: the averaged gradient DDP expects.

Bytes each rank sends per bucket of ``n`` values: ``2 (w - 1) / w x n`` (two 1-byte exchanges of
``n / w`` values with each of ``w - 1`` ranks) against ``2 (w - 1) / w x 4n`` for a float32 ring
all-reduce: 4x fewer, plus 8 bytes for the shared maximum. The counters in
:class:`E5M2Communication` add these message sizes up (an accounting of what the collectives are
given, not a measurement of the wire). Without error feedback the roundings are simply lost.
"""

import math

import torch
import torch.distributed as dist

from hfp8.numerics.bias_selection import max_bias_for_amax
from hfp8.numerics.codes import decode, encode
from hfp8.numerics.fake_quant import fake_quantize
from hfp8.numerics.formats import E5M2, FloatFormat

__all__ = ["E5M2Communication", "e5m2_hook"]


class E5M2Communication:
    """State of :func:`e5m2_hook` for one DDP model: residuals and byte counters."""

    def __init__(self, fmt: FloatFormat = E5M2, error_feedback: bool = True, group=None) -> None:
        if fmt.bits > 8:
            raise ValueError(f"{fmt} does not fit one byte")
        self.fmt, self.error_feedback, self.group = fmt, error_feedback, group
        self.residuals: dict[int, torch.Tensor] = {}
        self.chunk_residuals: dict[int, torch.Tensor] = {}
        self.bytes_sent = 0  # by this rank, FP8 codes and the shared maxima
        self.float32_bytes = 0  # what a float32 ring all-reduce of the same buckets would send

    def _format_for(self, amax: float) -> FloatFormat:
        if not math.isfinite(amax) or amax == 0.0:
            return self.fmt
        return self.fmt.with_bias(int(max_bias_for_amax(torch.tensor([amax]), self.fmt)[0]))


def _rounded(values: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded values) of ``values`` at ``fmt``."""
    rounded = fake_quantize(values, fmt)
    return encode(rounded, fmt), rounded


# DDP compares this return annotation with the real type (not a string): no postponed annotations
# in this module.
def e5m2_hook(state: E5M2Communication, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket's gradients across ranks in 1-5-2 (see the
    module docstring). Register with ``ddp_model.register_comm_hook(state, e5m2_hook)``."""
    buffer = bucket.buffer()
    world = dist.get_world_size(state.group)
    index, count = bucket.index(), buffer.numel()
    values = buffer.detach().float()
    if state.error_feedback:
        values = values + state.residuals.get(index, torch.zeros_like(values))
    maximum = values.abs().max().reshape(1) if count else torch.zeros(1)
    maximum = torch.nan_to_num(maximum, nan=float("inf"))
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=state.group)
    finite = math.isfinite(float(maximum))
    first = state._format_for(float(maximum))
    codes, rounded = _rounded(values, first)
    if state.error_feedback:  # a non-finite step is skipped by the trainer: forget it here too
        state.residuals[index] = values - rounded if finite else torch.zeros_like(values)
    chunk = math.ceil(count / world)
    padded = torch.zeros(chunk * world, dtype=torch.uint8)
    padded[:count] = codes
    received = torch.empty_like(padded)
    dist.all_to_all_single(received, padded, group=state.group)
    partial = decode(received, first).view(world, chunk).sum(0)
    if state.error_feedback:
        partial = partial + state.chunk_residuals.get(index, torch.zeros_like(partial))
    second = state._format_for(float(maximum) * world)
    chunk_codes, chunk_rounded = _rounded(partial, second)
    if state.error_feedback:
        state.chunk_residuals[index] = partial - chunk_rounded if finite else torch.zeros_like(partial)
    gathered = torch.empty(chunk * world, dtype=torch.uint8)
    dist.all_gather_single(gathered, chunk_codes, group=state.group)
    averaged = decode(gathered, second)[:count] / world
    buffer.copy_(averaged.to(buffer.dtype))
    state.bytes_sent += 2 * (world - 1) * chunk + 8
    state.float32_bytes += round(2 * (world - 1) / world * 4 * count)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future
