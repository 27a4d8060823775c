"""VILA's multimodal projectors, with VILA's parameter layout (``layers.N.*``).

``mlp_downsample`` merges each 2x2 block of the patch grid into one token (4x channels),
zero-padding an odd grid first (27x27 -> 28x28 -> 14x14 = 196 tokens for SigLIP-so400m-384),
then LayerNorm(4c) -> Linear -> GELU -> Linear. The order in which the four neighbours are
concatenated, and the order of the merged tokens, follow VILA's ``DownSampleBlock``
(``mlp_downsample``) and ``DownSample2x2BlockFix`` (``mlp_downsample_2x2_fix``) exactly, so
released checkpoints keep their meaning.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def merge_2x2(x: torch.Tensor, fixed_order: bool) -> torch.Tensor:
    """``x [n, P, c]`` with P a square grid -> ``[n, ceil(g/2)^2, 4c]``.

    The grid is indexed ``[n, a, b, c]`` (row-major patches). Odd sides are zero-padded at
    the end. Pairs along ``b`` are concatenated first, then pairs along ``a``. VILA's first
    version emits the merged tokens with ``b`` as the slow index (a transposed grid);
    the "fix" variant restores row-major order.
    """
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
    if fixed_order:
        x = x.transpose(1, 2)
    return x.reshape(n, -1, 4 * c)


class _Merge2x2(nn.Module):
    def __init__(self, fixed_order: bool):
        super().__init__()
        self.fixed_order = fixed_order

    def forward(self, x):
        return merge_2x2(x, self.fixed_order)


class MultimodalProjector(nn.Module):
    """``forward(x [frames, patches, vision_hidden]) -> [frames, tokens, llm_hidden]``."""

    def __init__(self, projector_type: str, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.projector_type = projector_type
        if projector_type == "linear":
            self.layers = nn.Linear(vision_hidden, llm_hidden)
        elif projector_type == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(),
                                        nn.Linear(llm_hidden, llm_hidden))
        elif projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(
                _Merge2x2(fixed_order=projector_type.endswith("_fix")),
                nn.LayerNorm(4 * vision_hidden),
                nn.Linear(4 * vision_hidden, llm_hidden),
                nn.GELU(),
                nn.Linear(llm_hidden, llm_hidden),
            )
        else:
            raise ValueError(f"unknown projector type {projector_type!r}")

    def forward(self, x):
        return self.layers(x)
