"""LongVILA training on Megatron-Core.

    python pretrain_longvila.py                      # embedded default: tiny model, synthetic video
    torchrun --nproc-per-node 8 pretrain_longvila.py --model qwen2-7b --bf16 \\
        --tensor-model-parallel-size 2 --context-parallel-size 4 --seq-parallel-ring-size 2 ...

See ``python pretrain_longvila.py --help`` and ``examples/`` for the five stages.
"""

import sys


def main(argv=None):
    import os
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron_longvila.arguments import parse_args, validate_args
    from megatron_longvila.training.train import TrainingError, init_distributed, train, \
        world_size_from_env

    args = parse_args(argv)
    try:
        validate_args(args, world_size_from_env())
    except (ValueError, FileNotFoundError) as e:
        print(f"pretrain_longvila.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    init_distributed(args)
    import torch.distributed as dist
    try:
        train(args)
    except TrainingError as e:
        print(f"[rank {dist.get_rank()}] error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # don't wait for ranks that stopped elsewhere
    finally:
        if dist.is_initialized():
            try:
                from megatron.core import parallel_state
                parallel_state.destroy_model_parallel()
            except Exception:  # noqa: BLE001
                pass
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # the guard is required: dist checkpointing spawns processes
    sys.exit(main())
