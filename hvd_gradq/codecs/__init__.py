"""Codecs: pure tensor math (quantizers, level fitting, error feedback). No Horovod, no MPI here.

``make_codec(name, bits, bucket_size=..., norm=...)``, or ``make_codec(name, ratio=...)`` for the
sparsifiers "jointsq" and "topk", builds a per-rank codec behind the ``Codec`` interface (encode /
decode / exact payload bytes / uint8 stream); ``uniform`` holds the shared-scale quantizer whose
codes are summable in an allreduce.
"""
from hvd_gradq.codecs.base import Codec, Encoded
from hvd_gradq.codecs.error_feedback import ErrorFeedback, MomentumCorrection
from hvd_gradq.codecs.jointsq import JointSQCodec, JointSQState
from hvd_gradq.codecs.levels import LEVEL_CODECS, AdaptiveLevelCodec, LevelCodec, make_codec
from hvd_gradq.codecs.random import DitherSource
from hvd_gradq.codecs.topk import TopKCodec
from hvd_gradq.codecs.uniform import dequantize, dequantize_sum, quantize_stochastic, step_size

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
    "MomentumCorrection",
    "TopKCodec",
    "dequantize",
    "dequantize_sum",
    "make_codec",
    "quantize_stochastic",
    "step_size",
]
