"""The LongVILA model: SigLIP vision tower + VILA projector + Megatron-Core GPTModel.

Layer: below ``training`` / ``evaluation`` / ``conversion``, above ``parallel`` (MM-SP
orchestration, which it calls to plan each micro-batch) and ``kernels`` (the attention its
core-attention module runs); see :mod:`megatron_longvila.kernels` for the whole layering.
``LongVILAModel.forward`` returns a :class:`LongVILAOutput` (this rank's output rows, their
loss mask and input positions): nothing travels through attributes of the model.
"""

from .config import (LLM_PRESETS, MODEL_PRESETS, VISION_PRESETS, LanguageModelConfig,
                     LongVILAConfig, VisionConfig, get_preset)
from .longvila import LongVILAModel, LongVILAOutput

__all__ = ["LLM_PRESETS", "MODEL_PRESETS", "VISION_PRESETS", "LanguageModelConfig",
           "LongVILAConfig", "VisionConfig", "get_preset", "LongVILAModel", "LongVILAOutput"]
