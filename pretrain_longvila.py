"""LongVILA training on Megatron-Core.

    python pretrain_longvila.py                      # embedded default: tiny model, synthetic video
    torchrun --nproc-per-node 8 pretrain_longvila.py --model qwen2-7b --bf16 \\
        --tensor-model-parallel-size 2 --context-parallel-size 4 --seq-parallel-ring-size 2 ...

See ``python pretrain_longvila.py --help`` and ``examples/`` for the five stages.

An entry point: it switches on the CPU shims (``cpu_compat.enable()``, a no-op when CUDA is
there) before anything builds a model, maps the command line to a checked RunConfig, joins the
process group (``launch.init_process_group``) and runs the loop.
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
warnings.filterwarnings("ignore", category=FutureWarning)

from megatron_longvila import cpu_compat, launch  # noqa: E402
from megatron_longvila.arguments import run_config_from_argv  # noqa: E402
from megatron_longvila.data.loader import DatasetError, SampleError  # noqa: E402
from megatron_longvila.training.train import TrainingError, train  # noqa: E402


def main(argv=None):
    cpu_compat.enable()
    try:
        cfg = run_config_from_argv(argv, launch.world_size_from_env())
    except (ValueError, FileNotFoundError) as e:
        print(f"pretrain_longvila.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    launch.init_process_group(cfg.parallel.distributed_backend,
                              cfg.parallel.distributed_timeout_minutes)
    import torch.distributed as dist
    try:
        train(cfg)
    except (TrainingError, SampleError, DatasetError) as e:  # bad data: one line, shard + key
        print(f"[rank {dist.get_rank()}] error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # don't wait for ranks that stopped elsewhere
    finally:
        launch.shutdown()
    return 0


if __name__ == "__main__":  # the guard is required: dist checkpointing spawns processes
    sys.exit(main())
