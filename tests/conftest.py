import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the CPU shims, switched on once for in-process tests (a no-op with CUDA); spawned ranks get
# them from the bootstrap (megatron_longvila.launch)
from megatron_longvila import cpu_compat  # noqa: E402

cpu_compat.enable()
