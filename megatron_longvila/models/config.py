"""Model shapes: the language model, the SigLIP tower, the projector, and the presets."""

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LanguageModelConfig:
    """A Llama-3 / Qwen2 shaped decoder (RMSNorm, SwiGLU, GQA, RoPE)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2: True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    family: str = "qwen2"  # qwen2 | llama

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """A SigLIP ViT (HF ``SiglipVisionModel``)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    intermediate_size: int
    norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


PROJECTOR_TYPES = ("mlp_downsample", "mlp_downsample_2x2_fix", "linear", "mlp2x_gelu")
# Merge order of the mlp_downsample* projectors (see models/projector.py): the default per type.
TOKEN_ORDERS = ("column_major", "row_major")
DEFAULT_TOKEN_ORDER = {"mlp_downsample": "column_major", "mlp_downsample_2x2_fix": "row_major"}


def resolve_token_order(projector_type: str, token_order=None):
    """The merge order of a projector: ``token_order`` checked against the type, else the
    type's default; ``None`` for projectors without a 2x2 merge."""
    if projector_type not in DEFAULT_TOKEN_ORDER:
        if token_order is not None:
            raise ValueError(f"projector type {projector_type!r} has no 2x2 merge; "
                             f"token order {token_order!r} does not apply")
        return None
    if token_order is None:
        return DEFAULT_TOKEN_ORDER[projector_type]
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"unknown token order {token_order!r}; known: {', '.join(TOKEN_ORDERS)}")
    if projector_type == "mlp_downsample_2x2_fix" and token_order != "row_major":
        raise ValueError("mlp_downsample_2x2_fix merges in row-major order only "
                         f"(got token order {token_order!r})")
    return token_order


@dataclass
class LongVILAConfig:
    llm: LanguageModelConfig
    vision: VisionConfig
    projector_type: str = "mlp_downsample"
    # VILA's mm_vision_select_layer: index into HF hidden_states (embeddings, layer 1 .. N).
    vision_select_layer: int = -2
    # VILA's mm_vision_select_feature; SigLIP has no CLS token, so "cls_patch" == "patch".
    vision_select_feature: str = "patch"
    # Order of the merged tokens in a frame for the mlp_downsample* projectors: "column_major"
    # (LongVILA-era VILA) or "row_major" (VILA since 36f6adc; always for _2x2_fix); None:
    # the type's default (models/projector.py), filled in so that checkpoints record it.
    projector_token_order: Optional[str] = None

    def __post_init__(self):
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {self.projector_type!r}; "
                             f"known: {', '.join(PROJECTOR_TYPES)}")
        self.projector_token_order = resolve_token_order(self.projector_type,
                                                         self.projector_token_order)
        n = self.vision.num_layers
        if not (-(n + 1) <= self.vision_select_layer <= n) or self.vision_select_layer == 0:
            raise ValueError(f"vision_select_layer {self.vision_select_layer} is outside the "
                             f"tower's hidden states (1..{n} or -1..-{n})")

    @property
    def vision_layers_used(self) -> int:
        """How many SigLIP blocks run to reach the selected hidden state."""
        n, sel = self.vision.num_layers, self.vision_select_layer
        return sel if sel > 0 else n + 1 + sel

    @property
    def tokens_per_frame(self) -> int:
        g = self.vision.grid
        if self.projector_type.startswith("mlp_downsample"):
            g = (g + 1) // 2
            return g * g
        return g * g

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        return cls(llm=LanguageModelConfig(**d.pop("llm")), vision=VisionConfig(**d.pop("vision")),
                   **d)


LLM_PRESETS = {
    "tiny": LanguageModelConfig(vocab_size=512, hidden_size=64, num_layers=2,
                                num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                                rope_base=10000.0, qkv_bias=True, tie_word_embeddings=True,
                                max_position_embeddings=8192),
    "qwen2-1.5b": LanguageModelConfig(vocab_size=151936, hidden_size=1536, num_layers=28,
                                      num_attention_heads=12, num_query_groups=2,
                                      ffn_hidden_size=8960, rope_base=1e6, qkv_bias=True,
                                      tie_word_embeddings=True),
    "qwen2-7b": LanguageModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28,
                                    num_attention_heads=28, num_query_groups=4,
                                    ffn_hidden_size=18944, rope_base=1e6, qkv_bias=True),
    "llama3-8b": LanguageModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32,
                                     num_attention_heads=32, num_query_groups=8,
                                     ffn_hidden_size=14336, rope_base=500000.0, norm_eps=1e-5,
                                     max_position_embeddings=8192, family="llama"),
}

VISION_PRESETS = {
    "tiny": VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3,
                         num_attention_heads=2, intermediate_size=64),
    "siglip-so400m-patch14-384": VisionConfig(image_size=384, patch_size=14, hidden_size=1152,
                                              num_layers=27, num_attention_heads=16,
                                              intermediate_size=4304),
}

# --model presets: language model + vision tower.
MODEL_PRESETS = {
    "tiny": ("tiny", "tiny"),
    "qwen2-1.5b": ("qwen2-1.5b", "siglip-so400m-patch14-384"),
    "qwen2-7b": ("qwen2-7b", "siglip-so400m-patch14-384"),
    "llama3-8b": ("llama3-8b", "siglip-so400m-patch14-384"),
}


def get_preset(name: str, projector_type: str = "mlp_downsample",
               vision: Optional[str] = None, projector_token_order: Optional[str] = None,
               **llm_overrides) -> LongVILAConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    llm_name, vision_name = MODEL_PRESETS[name]
    vision_name = vision or vision_name
    if vision_name not in VISION_PRESETS:
        raise ValueError(f"unknown vision preset {vision_name!r}; known: {', '.join(VISION_PRESETS)}")
    llm = dataclasses.replace(LLM_PRESETS[llm_name], **llm_overrides)
    return LongVILAConfig(llm=llm, vision=dataclasses.replace(VISION_PRESETS[vision_name]),
                          projector_type=projector_type,
                          projector_token_order=projector_token_order)
