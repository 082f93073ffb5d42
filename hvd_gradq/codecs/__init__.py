"""Codecs: pure tensor math (quantizers, level fitting, error feedback). No Horovod, no MPI here.

``make_codec(name, bits, bucket_size=..., norm=...)``, or ``make_codec(name, ratio=...)`` for the
sparsifiers "jointsq" and "topk", builds a per-rank codec behind the ``Codec`` interface (encode /
decode / exact payload bytes / uint8 stream); ``shared_scale`` holds the quantizer whose codes, with
one scale shared by every rank, are summable in an allreduce.
"""
from hvd_gradq.bits.dither import DitherSource
from hvd_gradq.codecs.base import Codec, Encoded
from hvd_gradq.codecs.error_feedback import ErrorFeedback
from hvd_gradq.codecs.jointsq import JointSQCodec, JointSQState
from hvd_gradq.codecs.levels import LEVEL_CODECS, AdaptiveLevelCodec, LevelCodec, make_codec
from hvd_gradq.codecs.shared_scale import dequantize, dequantize_sum, quantize_stochastic, step_size
from hvd_gradq.codecs.topk import TopKCodec

__all__ = [
    "LEVEL_CODECS",
    "AdaptiveLevelCodec",
    "Codec",
    "DitherSource",
    "Encoded",
    "ErrorFeedback",
    "JointSQCodec",
    "JointSQState",
    "LevelCodec",
    "TopKCodec",
    "dequantize",
    "dequantize_sum",
    "make_codec",
    "quantize_stochastic",
    "step_size",
]
