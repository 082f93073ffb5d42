"""What travels: the summed header (``header``) and the frame header (``frames``) every rank can
check from the reduced or gathered bytes alone, and the coders that make and read payloads: the
shared-scale lane protocol (``lane_coder``) and the frames of gathered codecs (``gather_coder``).
Pure tensor code: rank, size and the codebook are passed in; nothing here talks to Horovod."""
from hvd_gradq.wire.header import AVERAGE, SUM, CodebookMismatchError, ReductionMismatchError

__all__ = ["AVERAGE", "SUM", "CodebookMismatchError", "ReductionMismatchError"]
