"""VILA's multimodal projectors, with VILA's parameter layout (``layers.N.*``).

``mlp_downsample`` merges each 2x2 block of the patch grid into one token (4x channels),
zero-padding an odd grid first (27x27 -> 28x28 -> 14x14 = 196 tokens for SigLIP-so400m-384),
then LayerNorm(4c) -> Linear -> GELU -> Linear. The order in which the four neighbours are
concatenated follows VILA's ``DownSampleBlock`` / ``DownSample2x2BlockFix``.

The order of the merged tokens inside a frame (``token_order``) is a recorded property of the
projector, because VILA changed it without renaming the projector type:

- ``"column_major"``: ``mlp_downsample`` of LongVILA-era VILA (up to NVlabs/VILA 54c9706,
  "Support LongVILA"), which trained the released LongVILA checkpoints: token ``j * h + i``
  holds the 2x2 block of row pair ``i``, column pair ``j`` (a transposed ``h x h`` grid).
- ``"row_major"``: token ``i * h + j``. ``mlp_downsample_2x2_fix`` always; and
  ``mlp_downsample`` of VILA since the NVILA release (36f6adc), whose
  ``DownSampleBlock.flat_square`` ends with one more permute.

``mlp_downsample`` defaults to ``"column_major"`` (:data:`DEFAULT_TOKEN_ORDER`), the meaning
of a released LongVILA checkpoint; the model config records the order it was built with.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DEFAULT_TOKEN_ORDER, TOKEN_ORDERS, resolve_token_order  # noqa: F401


def merge_2x2(x: torch.Tensor, token_order: str) -> torch.Tensor:
    """``x [n, P, c]`` with P a square grid -> ``[n, ceil(g/2)^2, 4c]``.

    The grid is indexed ``[n, a, b, c]`` (row-major patches). Odd sides are zero-padded at
    the end. Pairs along ``b`` are concatenated first, then pairs along ``a``. The merged
    tokens come out with ``b`` as the slow index (``"column_major"``, LongVILA-era VILA) or
    with ``a`` as the slow index (``"row_major"``, VILA since 36f6adc and ``_2x2_fix``).
    """
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"unknown token order {token_order!r}; known: {', '.join(TOKEN_ORDERS)}")
    n, p, c = x.shape
    g = int(round(p ** 0.5))
    if g * g != p:
        raise ValueError(f"mlp_downsample needs a square patch grid, got {p} patches")
    x = x.reshape(n, g, g, c)
    ga, gb = g + g % 2, g + g % 2
    if ga != g:
        x = F.pad(x, (0, 0, 0, gb - g, 0, ga - g))
    x = x.reshape(n, ga, gb // 2, 2 * c)          # neighbours along b side by side
    x = x.transpose(1, 2).reshape(n, gb // 2, ga // 2, 4 * c)  # then neighbours along a
    if token_order == "row_major":
        x = x.transpose(1, 2)
    return x.reshape(n, -1, 4 * c)


class _Merge2x2(nn.Module):
    def __init__(self, token_order: str):
        super().__init__()
        self.token_order = token_order

    def forward(self, x):
        return merge_2x2(x, self.token_order)


class MultimodalProjector(nn.Module):
    """``forward(x [frames, patches, vision_hidden]) -> [frames, tokens, llm_hidden]``."""

    def __init__(self, projector_type: str, vision_hidden: int, llm_hidden: int,
                 token_order=None):
        super().__init__()
        self.projector_type = projector_type
        self.token_order = resolve_token_order(projector_type, token_order)
        if projector_type == "linear":
            self.layers = nn.Linear(vision_hidden, llm_hidden)
        elif projector_type == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(),
                                        nn.Linear(llm_hidden, llm_hidden))
        elif projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                _Merge2x2(self.token_order),
                nn.LayerNorm(4 * vision_hidden),
                nn.Linear(4 * vision_hidden, llm_hidden),
                nn.GELU(),
                nn.Linear(llm_hidden, llm_hidden),
            )
        else:
            raise ValueError(f"unknown projector type {projector_type!r}")

    def forward(self, x):
        return self.layers(x)
