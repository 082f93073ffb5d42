"""Bits: lane layouts and packing for summable codes (``lanes``), byte streams (``bitstream``),
chunk bounds (``chunks``), the counter-based dither (``dither``) and the native kernels
(``native``, C sources in ``csrc/``). Pure tensor code: no Horovod, no MPI."""
