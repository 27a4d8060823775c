from .config import (LLM_PRESETS, MODEL_PRESETS, VISION_PRESETS, LanguageModelConfig,
                     LongVILAConfig, VisionConfig, get_preset)
from .longvila import LongVILAModel

__all__ = ["LLM_PRESETS", "MODEL_PRESETS", "VISION_PRESETS", "LanguageModelConfig",
           "LongVILAConfig", "VisionConfig", "get_preset", "LongVILAModel"]
