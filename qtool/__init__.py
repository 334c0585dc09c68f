"""qtool: plan GPU memory, quantize to bnb-4bit, verify on CUDA."""

__version__ = "0.1.0"
