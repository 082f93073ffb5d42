"""hvd_gradq: gradient compression for Horovod + PyTorch."""
__version__ = "0.1.0"
