"""``UniformCompressor``: the preset of ``hvd_gradq.Compressor`` with one bit width for every layer
on the summable lanes (the stock path's first compressor; same codes and aggregates as before it
became a preset)."""
from __future__ import annotations

from collections.abc import Iterable

import torch

from hvd_gradq import checks
from hvd_gradq.bits.rotation import block_for
from hvd_gradq.horovod.compressor import Compressor
from hvd_gradq.wire.header import AVERAGE, SUM, header_len
from hvd_gradq.wire.lane_coder import lane_payload_bytes


class UniformCompressor(Compressor):
    """The preset of one bit width for every layer on summable lanes: ``Compressor(codec="rotated",
    transport="allreduce", block_scales="previous_step", bits=bits)`` (``rotation=0``:
    ``codec="shared_scale"``), i.e. one allreduce per layer whose codes Horovod's own allreduce
    sums under ``op=hvd.Sum``.

    What is communicated, per layer and step: a short header (``wire.header``) and the layer's codes
    packed into int64 lanes with headroom for the sum over N ranks. By default (``rotation``) each
    layer is first rotated by a randomized Hadamard transform shared by every rank, and every
    rotation block is quantized against its own scale, the same on all ranks: the MSE-optimal clip
    for the block's RMS in the previous step (``codecs.rotated``), so a sparse or heavy-tailed layer
    codes as well as a Gaussian one; the payload carries one statistic word per block for the next
    scales. With ``rotation=0`` the layer is quantized unrotated, stochastically, against one scale
    (the mean over ranks of max|g + residual| of the previous step). What clipping and rounding drop
    is kept by error feedback. A layer's first step, and any layer with fewer than ``min_elements``
    elements, is sent as float32. Under ``op=hvd.Average`` the lanes go in the compressor's own Sum
    allreduce (Horovod's Average would truncate integer codes) with the header as Horovod's placeholder.

    Args:
        bits: bit width 1..8 of every quantized layer.
        named_parameters: the model's ``named_parameters()`` (or ``parameters()``).
        op: ``hvd.Average`` (default, as in ``hvd.DistributedOptimizer``) or ``hvd.Sum``.
        min_elements: layers smaller than this are sent as float32 (header included).
        seed: of the rotations (the same on every rank) and of the stochastic rounding (each rank
            and layer draws from its own stream, so the order Horovod hands layers over, e.g. with
            ``groups=``, does not change the result).
        rotation: the largest rotation block, a power of two 8..65536 (default 4096); 0: no rotation
            (one scale per layer, stochastic rounding).
        rounding: of the rotated codes: "nearest" (default; biased, its error goes to error
            feedback) or "stochastic" (unbiased within the clip).
        process_set: the Horovod process set the optimizer reduces over.
    """

    label = "UniformCompressor"

    def __init__(self, bits: int, named_parameters: Iterable[tuple[str, torch.Tensor]], *, op=None,
                 min_elements: int = 1024, seed: int = 0, rotation: int = 4096, rounding: str = "nearest",
                 process_set=None) -> None:
        checks.integer(bits, "bits", 1, 8)
        checks.rotation_block(rotation, "rotation")
        super().__init__(named_parameters, op=op, process_set=process_set, codec="rotated" if rotation else
                         "shared_scale", bits=bits, transport="allreduce", block_scales="previous_step",
                         min_elements=min_elements, seed=seed, rotation=rotation or 4096, rounding=rounding)
        self.bits_per_layer = bits

    def payload_bytes(self, numel: int, packed: bool = True, bits: int | None = None) -> int:
        """Predicted bytes of a layer of ``numel`` elements (coded, or sent as float32)."""
        packed = packed and numel >= self.coding.min_elements
        block = block_for(numel, self.coding.rotation) if self.coding.codec == "rotated" else 0
        size = self.gradient_exchange.size
        out = lane_payload_bytes(numel, (bits or self.bits_per_layer) if packed else None, size, SUM, block)
        if self.op == AVERAGE:  # the placeholder Horovod's Average reduces
            out += 8 * header_len(torch.float64, size)
        return out
