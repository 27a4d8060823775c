"""The typed run config: what a training (or evaluation) run is, as plain dataclasses.

``arguments.py`` maps the command line to a :class:`RunConfig`; :func:`resolve_run_config`
checks it against the world size and fills the derived values (data-parallel size,
accumulation steps, the model architecture) once, returning a new config. Each section checks
its own fields; the rules of the parallel layout live in the ``parallel`` package
(:func:`~megatron_longvila.parallel.groups.validate_mmsp_sizes`,
:func:`~megatron_longvila.parallel.layout.check_sequence_length`) and are only called from here.

Checkpoints store :meth:`RunConfig.to_dict` (JSON); :meth:`RunConfig.from_dict` reads it back,
for the trainer's resume and for the evaluation tools alike. Test-only fault injection
(:class:`DebugConfig`) is never stored.
"""

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .data.energon import is_metadataset
from .data.text import is_text_source
from .models.config import LongVILAConfig, get_preset
from .models.specs import resolve_transformer_impl
from .parallel.groups import hierarchical_sizes, validate_mmsp_sizes
from .parallel.layout import RING_TYPES, check_sequence_length
from . import checkpoint

STAGES = ("align", "pretrain", "sft", "context-extension", "long-sft")
# LongVILA's recipe: which parts each stage trains (vision tower, projector, LLM).
STAGE_TRAINABLE = {
    "align": ("projector",),
    "pretrain": ("projector", "llm"),
    "sft": ("vision", "projector", "llm"),
    "context-extension": ("llm",),
    "long-sft": ("vision", "projector", "llm"),
}
TRAINABLE_PARTS = ("vision", "projector", "llm")
PRECISIONS = ("fp32", "bf16", "fp16")


def _err(msg):
    raise ValueError(msg)


def _at_least(section, names, minimum=1):
    for name in names:
        v = getattr(section, name)
        if v is None or v < minimum:
            _err(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


@dataclass
class ModelConfig:
    """Which model: a preset (or the ``--load`` checkpoint's architecture) plus overrides.
    ``name`` None (no --model): the tiny preset, or the checkpoint's architecture."""
    name: Optional[str] = "tiny"
    vision_model: Optional[str] = None
    projector_type: str = "mlp_downsample"
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    rotary_base: Optional[float] = None
    max_position_embeddings: Optional[int] = None
    norm_epsilon: Optional[float] = None
    add_qkv_bias: Optional[bool] = None
    untie_embeddings_and_output_weights: Optional[bool] = None
    vocab_size: Optional[int] = None  # Megatron-LM's: padded to a multiple of the next x TP
    make_vocab_size_divisible_by: int = 128
    kv_channels: Optional[int] = None  # Megatron-LM's; must be hidden / heads
    override_checkpoint_config: bool = False
    transformer_impl: str = "auto"
    recompute_granularity: Optional[str] = None
    precision: str = "fp32"
    arch: Optional[LongVILAConfig] = None  # resolved: the architecture that is built

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def resolve_arch(self, load: Optional[str], tp: int = 1) -> LongVILAConfig:
        """The preset's (or ``load``'s stored) LongVILAConfig with the overrides applied."""
        over = {k: v for k, v in dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups, rope_base=self.rotary_base,
            max_position_embeddings=self.max_position_embeddings, norm_eps=self.norm_epsilon,
            qkv_bias=self.add_qkv_bias,
            tie_word_embeddings=None if self.untie_embeddings_and_output_weights is None
            else not self.untie_embeddings_and_output_weights,
            vocab_size=None if self.vocab_size is None else padded_vocab_size(
                self.vocab_size, self.make_vocab_size_divisible_by, tp)).items()
            if v is not None}
        cfg = None
        if load and not self.override_checkpoint_config:
            cfg = checkpoint.read_checkpoint_config(load)
            if cfg is not None and self.name is not None:
                _check_preset_matches(self.name, cfg, load, self.projector_type, over)
        if cfg is None:
            cfg = get_preset(self.name or "tiny", projector_type=self.projector_type,
                             vision=self.vision_model)
        if over:
            cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **over))
        if self.kv_channels is not None and self.kv_channels != cfg.llm.kv_channels:
            _err(f"--kv-channels {self.kv_channels}: the attention head size here is "
                 f"--hidden-size / --num-attention-heads = {cfg.llm.kv_channels}")
        return cfg


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: the next multiple of ``divisible_by x tp``."""
    if vocab_size < 1 or divisible_by < 1:
        _err(f"--vocab-size {vocab_size} / --make-vocab-size-divisible-by {divisible_by} "
             "must be >= 1")
    m = divisible_by * tp
    return -(-vocab_size // m) * m


@dataclass
class ParallelConfig:
    """TP x SP x DP. The SP (MM-SP) size is Megatron's context-parallel size; it splits into
    ``ulysses_size x ring_size`` (Megatron's hierarchical context-parallel sizes)."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    ring_size: int = 1
    ring_type: str = "zigzag_ring_varlen"
    sequence_parallel: bool = False  # Megatron's TP sequence parallelism (norms/dropout)
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    distributed_backend: str = "auto"
    distributed_timeout_minutes: int = 30
    world_size: int = 1  # resolved
    data_parallel_size: int = 1  # resolved

    @property
    def ulysses_size(self) -> int:
        return self.context_parallel_size // self.ring_size

    @property
    def hierarchical_context_parallel_sizes(self) -> Optional[List[int]]:
        return hierarchical_sizes(self.context_parallel_size, self.ring_size)

    def describe(self) -> str:
        return (f"TP={self.tensor_model_parallel_size} x SP={self.context_parallel_size} "
                f"({self.ulysses_size} Ulysses x {self.ring_size} ring, {self.ring_type}) x "
                f"DP={self.data_parallel_size}")

    def resolve(self, world_size: int, arch: LongVILAConfig,
                tokens_per_micro_batch: Optional[int] = None,
                transformer_impl: str = "auto") -> "ParallelConfig":
        """Check the layout against the world and the model; return it with the derived values.

        ``tokens_per_micro_batch``: the packed row length the layout must split (None: rows of
        any length, as in generation, where the layout pads). ``transformer_impl``: the model's
        (Megatron's sequence parallelism needs transformer-engine)."""
        tp, pp, cp = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.context_parallel_size)
        _at_least(self, ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
        if pp != 1:
            _err(f"--pipeline-model-parallel-size {pp}: pipeline parallelism is not supported "
                 "(LongVILA scales with TP x SP x DP)")
        if self.ring_type not in RING_TYPES:
            _err(f"--seq-parallel-ring-type {self.ring_type!r} is not one of {RING_TYPES}")
        cuda = torch.cuda.is_available()
        if self.overlap_grad_reduce and not cuda:
            _err("--overlap-grad-reduce needs CUDA GPUs (Megatron-Core's DDP overlaps on a CUDA "
                 "stream); drop the flag on the CPU")
        backend = self.distributed_backend
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if backend == "nccl" and not cuda:
            _err("--distributed-backend nccl needs CUDA GPUs; none is visible")
        validate_mmsp_sizes(world_size, tp, cp, self.ring_size, arch.llm.num_attention_heads,
                            arch.llm.num_query_groups, pp)
        if arch.llm.vocab_size % tp:
            _err(f"vocab size {arch.llm.vocab_size} is not divisible by "
                 f"--tensor-model-parallel-size {tp}")
        if arch.llm.ffn_hidden_size % tp:
            _err(f"FFN hidden size {arch.llm.ffn_hidden_size} is not divisible by "
                 f"--tensor-model-parallel-size {tp}")
        if arch.vision.num_attention_heads % tp:
            _err(f"vision attention heads {arch.vision.num_attention_heads} are not divisible by "
                 f"--tensor-model-parallel-size {tp}")
        if transformer_impl == "transformer_engine":
            resolve_transformer_impl(transformer_impl)  # not importable: error; else a warning
        seq_par = self.sequence_parallel and tp > 1  # as Megatron-LM: TP 1 has nothing to split
        if seq_par and resolve_transformer_impl(transformer_impl) != "transformer_engine":
            _err("--sequence-parallel needs --transformer-impl transformer_engine (with "
                 "transformer-engine installed, e.g. in the NGC image): Megatron-Core's torch "
                 "norms do not support sequence parallelism")
        if cp > 1 and tokens_per_micro_batch is not None:
            check_sequence_length(tokens_per_micro_batch, self.ring_size, cp // self.ring_size,
                                  self.ring_type, tp if seq_par else 1,
                                  what="--seq-length x --micro-batch-size")
        return dataclasses.replace(self, sequence_parallel=seq_par, distributed_backend=backend,
                                   world_size=world_size,
                                   data_parallel_size=world_size // (tp * cp))


@dataclass
class DataConfig:
    data_path: Optional[List[str]] = None  # None: the embedded synthetic default
    valid_data_path: Optional[List[str]] = None
    tokenizer_model: Optional[str] = None
    chat_template: Optional[str] = None
    num_workers: int = 2
    num_frames: Optional[int] = None
    drop_or_subsample: str = "subsample"
    skip_bad_samples: int = 0  # unusable samples each loading process may skip (named, counted)
    shuffle: bool = True
    synthetic_videos: int = 64
    synthetic_frames: int = 4
    synthetic_text_only: bool = False
    synthetic_dir: Optional[str] = None

    def resolve(self, model_name: str) -> "DataConfig":
        _at_least(self, ("num_workers",), 0)
        _at_least(self, ("synthetic_frames",))
        if self.num_frames is not None:  # 0 frames would turn every video into text
            _at_least(self, ("num_frames",))
        for flag in ("data_path", "valid_data_path"):
            _check_blend(flag, getattr(self, flag))
            for item in getattr(self, flag) or []:
                if not _is_number(item) and not (os.path.isdir(item) or is_text_source(item)
                                                 or is_metadataset(item)):
                    _err(f"--{flag.replace('_', '-')} {item}: no such shard directory, text "
                         f"corpus (.jsonl/.json/.parquet) or Megatron indexed dataset "
                         f"(PREFIX.bin/.idx) or energon metadataset (.yaml)")
                if not _is_number(item) and os.path.isdir(item) and not is_text_source(item):
                    from .data.loader import read_dataset  # metadata: before any model is built
                    try:
                        read_dataset(item)
                    except (OSError, ValueError, KeyError) as e:
                        _err(f"--{flag.replace('_', '-')} {item}: {e}")
        if self.skip_bad_samples < 0:
            _err(f"--skip-bad-samples {self.skip_bad_samples}: must be >= 0")
        tok = self.tokenizer_model
        if tok is None:
            if model_name != "tiny" and self.data_path:
                _err(f"--tokenizer-model is required for model {model_name!r}")
            tok = "tiny"
        elif tok != "tiny" and not os.path.exists(tok):
            _err(f"--tokenizer-model {tok}: no such file or directory")
        return dataclasses.replace(self, tokenizer_model=tok)


@dataclass
class TrainingConfig:
    stage: Optional[str] = None
    trainable: Optional[List[str]] = None  # resolved: the stage's parts, else all
    seq_length: int = 256
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # resolved: default micro x DP
    train_iters: Optional[int] = None  # resolved: default 100, or train_samples // global batch
    train_samples: Optional[int] = None  # Megatron-LM's training length in samples
    seed: int = 1234
    on_nan: str = "stop"
    max_skipped_iters: int = 10
    # cluster habits (Megatron-LM's): finish the step, save, exit 0 on SIGTERM / after a wall
    # time / at an iteration multiple
    exit_signal_handler: bool = False
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    num_micro_batches: int = 1  # resolved: accumulation steps

    def resolve(self, dp: int, world_size: int, tp: int, cp: int,
                arch: LongVILAConfig) -> "TrainingConfig":
        _at_least(self, ("seq_length", "micro_batch_size"))
        if self.global_batch_size is not None:
            _at_least(self, ("global_batch_size",))
        if self.exit_interval is not None:
            _at_least(self, ("exit_interval",))
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            _err(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        mbs = self.micro_batch_size
        gbs = self.global_batch_size if self.global_batch_size is not None else mbs * dp
        if gbs % (mbs * dp):
            _err(f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x "
                 f"data-parallel size {dp} (= world {world_size} / (tp {tp} x sp {cp}))")
        iters = self.train_iters
        if self.train_samples is not None:  # as Megatron-LM: whole global batches
            iters = self.train_samples // gbs
            if iters < 1:
                _err(f"--train-samples {self.train_samples} is less than one global batch {gbs}")
        elif iters is None:
            iters = 100
        if iters < 1:
            _err(f"--train-iters must be >= 1, got {iters}")
        if self.seq_length > arch.llm.max_position_embeddings:
            _err(f"--seq-length {self.seq_length} exceeds the model's max position embeddings "
                 f"{arch.llm.max_position_embeddings} (raise --max-position-embeddings)")
        trainable = self.trainable
        if trainable is None:
            trainable = list(STAGE_TRAINABLE[self.stage]) if self.stage else list(TRAINABLE_PARTS)
        return dataclasses.replace(self, global_batch_size=gbs, trainable=list(trainable),
                                   num_micro_batches=gbs // (mbs * dp), train_iters=iters)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # resolved: default --train-iters
    lr_warmup_iters: int = 0
    lr_warmup_init: float = 0.0
    lr_wsd_decay_iters: Optional[int] = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    optimizer: str = "adam"  # adam | sgd
    sgd_momentum: float = 0.9
    start_weight_decay: Optional[float] = None  # default: weight_decay
    end_weight_decay: Optional[float] = None
    weight_decay_incr_style: str = "constant"
    loss_scale: Optional[float] = None  # fp16: static scale; None: dynamic
    initial_loss_scale: float = 2.0 ** 16
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2
    # Megatron-LM's schedule in samples (with --train-samples)
    lr_decay_samples: Optional[int] = None
    lr_warmup_samples: int = 0
    lr_warmup_fraction: Optional[float] = None
    lr_wsd_decay_samples: Optional[int] = None
    # resolved: the scheduler's lengths in samples, as Megatron-LM's OptimizerParamScheduler
    warmup_steps: int = 0
    decay_steps: int = 0
    wsd_decay_steps: Optional[int] = None
    wd_incr_steps: int = 0

    def resolve(self, train_iters: int, global_batch_size: int,
                train_samples: Optional[int] = None) -> "OptimizerConfig":
        for name in ("lr", "min_lr", "lr_warmup_init", "weight_decay", "adam_beta1",
                     "adam_beta2", "adam_eps", "clip_grad"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                _err(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.min_lr > self.lr:
            _err(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.lr_warmup_iters < 0:
            _err(f"--lr-warmup-iters must be >= 0, got {self.lr_warmup_iters}")
        if self.lr_warmup_fraction is not None and not 0.0 <= self.lr_warmup_fraction <= 1.0:
            _err(f"--lr-warmup-fraction {self.lr_warmup_fraction} is not in [0, 1]")
        gbs = global_batch_size
        decay_iters = self.lr_decay_iters if self.lr_decay_iters is not None else train_iters
        if self.lr_warmup_iters > decay_iters:
            _err(f"--lr-warmup-iters {self.lr_warmup_iters} exceeds the decay iterations "
                 f"{decay_iters} (--lr-decay-iters, default --train-iters)")
        if train_samples is not None:
            decay = self.lr_decay_samples if self.lr_decay_samples is not None else train_samples
            warmup, what = self.lr_warmup_samples, "--lr-warmup-samples"
            wsd, wd_incr = self.lr_wsd_decay_samples, train_samples
        else:
            decay = decay_iters * gbs
            warmup, what = self.lr_warmup_iters * gbs, "--lr-warmup-iters"
            wsd = None if self.lr_wsd_decay_iters is None else self.lr_wsd_decay_iters * gbs
            wd_incr = train_iters * gbs
        if self.lr_warmup_fraction is not None:
            warmup, what = int(self.lr_warmup_fraction * decay), "--lr-warmup-fraction"
        if warmup > decay:
            _err(f"{what} gives {warmup} warm-up samples, more than the {decay} decay samples "
                 "(--lr-decay-iters / --lr-decay-samples, default the training length)")
        if self.optimizer not in ("adam", "sgd"):
            _err(f"--optimizer {self.optimizer!r} is not adam or sgd")
        return dataclasses.replace(self, lr_decay_iters=decay_iters, warmup_steps=warmup,
                                   decay_steps=decay, wsd_decay_steps=wsd, wd_incr_steps=wd_incr)


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    ckpt_step: Optional[int] = None
    load_optim: bool = True
    load_rng: bool = True
    load_loader_state: bool = True
    keep_last_checkpoints: Optional[int] = None
    optim_fully_reshardable: bool = False  # distributed optimizer: model-space state
    exit_on_missing_checkpoint: bool = False

    def resolve(self) -> "CheckpointConfig":
        if self.save_interval is not None and self.save_interval < 1:
            _err(f"--save-interval must be >= 1, got {self.save_interval}")
        if self.load is not None:
            if not os.path.isdir(self.load):
                _err(f"--load {self.load}: no such directory")
            tracker = os.path.join(self.load, checkpoint.TRACKER_FILE)
            if not os.path.isfile(tracker) and not (
                    self.save and os.path.abspath(self.save) == os.path.abspath(self.load)):
                _err(f"--load {self.load}: no {checkpoint.TRACKER_FILE} there (no completed "
                     "checkpoint)")
            if self.ckpt_step is not None:
                step_dir = os.path.join(self.load, checkpoint.checkpoint_name(self.ckpt_step))
                if not os.path.isfile(os.path.join(step_dir, "metadata.json")):
                    _err(f"--ckpt-step {self.ckpt_step}: no complete checkpoint {step_dir}")
        # nothing to save to (e.g. SAVE=none in examples/): no interval
        return dataclasses.replace(self, save_interval=self.save_interval if self.save else None)

    def check_dirs(self, data_parallel_size: int):
        """Before any model is built: --save writable and no orphaned iter_* there; the
        checkpoint --load names complete and holding what resuming at this layout needs."""
        if self.save:
            checkpoint.check_no_orphans(self.save)
            checkpoint.check_save_dir(self.save)
        if self.load and (checkpoint.has_checkpoint(self.load) or self.ckpt_step is not None):
            resume = not self.finetune
            checkpoint.check_resume(
                self.load, self.ckpt_step, data_parallel_size,
                need_rank_state=resume and (self.load_rng or self.load_loader_state),
                need_loader=resume and self.load_loader_state)


@dataclass
class LoggingConfig:
    log_interval: int = 5
    eval_interval: Optional[int] = None
    eval_iters: int = 2
    tensorboard_dir: Optional[str] = None
    metrics_file: Optional[str] = None
    log_sample_keys: bool = False
    peak_tflops: Optional[float] = None
    # Megatron-LM's logging flags
    tensorboard_log_interval: int = 1
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    log_throughput: bool = False
    log_params_norm: bool = False
    timing_log_level: int = 0
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_dir: Optional[str] = None  # resolved: --tensorboard-dir, else ./profile

    def resolve(self) -> "LoggingConfig":
        _at_least(self, ("log_interval", "tensorboard_log_interval"))
        if self.timing_log_level not in (0, 1, 2):
            _err(f"--timing-log-level must be 0, 1 or 2, got {self.timing_log_level}")
        if self.tensorboard_dir:
            require_module("tensorboard", "--tensorboard-dir", "logging")
        if self.wandb_project:
            require_module("wandb", "--wandb-project", "logging")
        if self.profile:
            if not 0 <= self.profile_step_start < self.profile_step_end:
                _err(f"--profile-step-start {self.profile_step_start} must be >= 0 and below "
                     f"--profile-step-end {self.profile_step_end}")
            prof = self.profile_dir or self.tensorboard_dir or os.path.join(os.getcwd(), "profile")
            return dataclasses.replace(self, profile_dir=prof)
        if self.eval_interval is not None and self.eval_interval < 1:
            _err(f"--eval-interval must be >= 1, got {self.eval_interval}")
        return self


@dataclass
class DebugConfig:
    """Test hooks (never stored): SIGKILL after an iteration / during a save, a NaN loss at an
    iteration. Carried out by :mod:`megatron_longvila.training.faults`."""
    kill_after_iteration: Optional[int] = None
    kill_during_save: Optional[int] = None
    nan_at_iteration: Optional[int] = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @property
    def arch(self) -> LongVILAConfig:
        assert self.model.arch is not None, "resolve_run_config() first"
        return self.model.arch

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready (what a checkpoint stores); the debug hooks are left out."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "debug":
                continue
            sec = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                sec["arch"] = self.model.arch.to_dict() if self.model.arch is not None else None
            out[f.name] = sec
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        """The inverse of :meth:`to_dict`; an unknown section or key raises ``ValueError``
        naming it (a config written by another version is never read half)."""
        if not isinstance(d, dict):
            _err(f"a run config is a JSON object, got {type(d).__name__}")
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name != "debug"}
        sections = {}
        for name, sec in d.items():
            if name not in kinds:
                _err(f"run config: unknown section {name!r} (known: {sorted(kinds)})")
            sec = dict(sec)
            known = {f.name for f in dataclasses.fields(kinds[name])}
            bad = sorted(set(sec) - known)
            if bad:
                _err(f"run config: unknown key(s) {bad} in section {name!r}")
            if name == "model" and sec.get("arch") is not None:
                sec["arch"] = LongVILAConfig.from_dict(sec["arch"])
            sections[name] = kinds[name](**sec)
        return cls(**sections)


def resolve_run_config(cfg: RunConfig, world_size: int) -> RunConfig:
    """Check ``cfg`` against ``world_size`` before any process group exists and return it with
    every derived value filled (the model architecture, DP size, accumulation steps, defaults).
    Raises ``ValueError`` naming the flags and numbers."""
    ckpt = cfg.checkpoint.resolve()
    arch = cfg.model.resolve_arch(ckpt.load, cfg.parallel.tensor_model_parallel_size)
    if cfg.model.name is None:  # no --model: the checkpoint's architecture (or tiny)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, name=preset_name_of(arch) or f"custom (from --load {ckpt.load})"))
    tr = cfg.training
    par = cfg.parallel.resolve(world_size, arch, tr.seq_length * tr.micro_batch_size,
                               cfg.model.transformer_impl)
    training = tr.resolve(par.data_parallel_size, world_size, par.tensor_model_parallel_size,
                          par.context_parallel_size, arch)
    if cfg.model.precision not in PRECISIONS:
        _err(f"precision {cfg.model.precision!r} is not one of {PRECISIONS}")
    ckpt.check_dirs(par.data_parallel_size)  # last: it may create --save
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, arch=arch), parallel=par,
        data=cfg.data.resolve(cfg.model.name), training=training,
        optimizer=cfg.optimizer.resolve(training.train_iters, training.global_batch_size,
                                        training.train_samples), checkpoint=ckpt,
        logging=cfg.logging.resolve())


def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False


# the shape a --model preset must share with the --load checkpoint's stored architecture
# (rope base and max positions may differ: stage 4 changes them)
_SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "vocab_size")


def _shape(arch: LongVILAConfig) -> Dict[str, int]:
    return {k: getattr(arch.llm, k) for k in _SHAPE_KEYS}


def _check_preset_matches(name: str, stored: LongVILAConfig, load: str, projector_type: str,
                          over: Dict[str, Any]):
    """--model NAME (with the shape flags given beside it, e.g. --num-layers) and a --load
    checkpoint of another architecture: refuse, naming both."""
    preset = get_preset(name, projector_type=projector_type)
    shape_over = {k: v for k, v in over.items() if k in _SHAPE_KEYS}
    want = _shape(dataclasses.replace(preset, llm=dataclasses.replace(preset.llm, **shape_over)))
    have = _shape(stored)
    if want != have:
        diff = ", ".join(f"{k} {have[k]} (preset {want[k]})" for k in _SHAPE_KEYS
                         if have[k] != want[k])
        _err(f"--model {name} does not match the checkpoint in --load {load}: its language "
             f"model has {diff}; drop --model to train the checkpoint's architecture, or give "
             f"the matching preset")


def preset_name_of(arch: LongVILAConfig) -> Optional[str]:
    """The preset whose language-model shape ``arch`` has (None: none does)."""
    from .models.config import MODEL_PRESETS
    for name in MODEL_PRESETS:
        if _shape(get_preset(name)) == _shape(arch):
            return name
    return None


def _check_blend(flag: str, items: Optional[List[str]]):
    """Megatron-style ``W1 PATH1 W2 PATH2`` weights: finite, >= 0, not all 0."""
    items = list(items or [])
    if len(items) < 2 or len(items) % 2 or not all(_is_number(x) and not os.path.exists(x)
                                                   for x in items[0::2]):
        return
    weights = [float(x) for x in items[0::2]]
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad or sum(weights) <= 0:
        _err(f"--{flag.replace('_', '-')}: blend weights must be finite numbers >= 0, not all "
             f"0; got {' '.join(items[0::2])}")


def require_module(module: str, flag: str, extra: str):
    """A flag that needs an optional package: stop at start-up when it is missing."""
    if importlib.util.find_spec(module) is None:
        _err(f"{flag} needs the {module!r} package, which is not installed: "
             f"pip install {module} (or pip install -e .[{extra}])")
