"""megatron-longvila: LongVILA long-video VLM training on Megatron-Core."""
__version__ = "0.1.0"
