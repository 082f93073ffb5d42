"""Codecs: pure tensor math (quantizers, error feedback). No Horovod, no MPI here."""
from hvd_gradq.codecs.error_feedback import ErrorFeedback
from hvd_gradq.codecs.uniform import dequantize, dequantize_sum, quantize_stochastic, step_size

__all__ = ["ErrorFeedback", "dequantize", "dequantize_sum", "quantize_stochastic", "step_size"]
