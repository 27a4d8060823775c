"""Data: video -> WebDataset shards, task encoder (chat template), packing, resumable loader.

API (what the trainer, the demo and the tests call)
---------------------------------------------------
build_tokenizer(name_or_path, template=None, system_prompt=<the format's default>)
    -> ChatTokenizer. "tiny" (in-process byte-level, ids < 512, qwen2 ChatML template), an HF
    tokenizer directory (local files only; template "auto" when it carries a chat template,
    else "qwen2" | "llama3" guessed from the vocab) or a sentencepiece ``.model`` file.
    Templates: "auto" (the tokenizer's own, as VILA applies it), "llama_3" / "hermes-2"
    (VILA's conversation modes), "qwen2" / "llama3" (built-in, piecewise). Attributes: pad_id,
    eos_id, vocab_size, chat_format, template, hf (the transformers tokenizer or None).
encode_chat(tokenizer, conversation, num_frames=0, add_generation_prompt=False,
            media_layout="train") -> (ids, targets)
    A conversation as VILA formats it (ids with one IMAGE_TOKEN_INDEX per frame; targets = the
    tokens trained on). vila_prompt_ids(tokenizer, question, num_frames, history=None,
    media_layout="generate") -> the inference prompt as VILA builds it; stop_token_ids(tok).

build_train_loader(data_paths, tokenizer, seq_length, micro_batch_size=1, tokens_per_frame=1,
                   image_size=384, dp_rank=0, dp_size=1, seed=1234, num_workers=2,
                   num_frames=None, drop_or_subsample="drop", shuffle=True, shuffle_buffer=64,
                   epochs=None, prefetch_factor=2) -> LongVILALoader
    data_paths: "dir", ["dir", ...], Megatron style [w1, "dir1", w2, "dir2"] or
    [("dir", w), ...] (weighted blending). An entry is a shard directory, a text corpus
    (.jsonl/.json/.parquet with a "text" field, or a Megatron indexed dataset PREFIX(.bin/.idx):
    documents packed into rows and split across rows, see data/text.py) or an energon
    metadataset YAML (its weighted blend, see data/energon.py). tokenizer: a ChatTokenizer or a
    name for build_tokenizer. sp_rank/sp_size: decode only the frames of this SP rank's vision
    shard (the batch then carries frame_range; the model takes it as frame_range=). num_frames: use at most this many frames per sample (uniform subset).
    drop_or_subsample: a sample longer than seq_length is dropped and counted ("drop") or keeps
    the most frames that fit ("subsample"; dropped if even one frame is too long).
    epochs=None streams forever (training); epochs=k stops after k epochs (tests, evaluation).
    Shuffling: shard order per epoch, then blocks of shuffle_buffer consecutive samples are
    permuted (raw JPEG bytes of one block are held per worker and dataset). num_workers=0 runs
    in the calling process; >0 uses torch DataLoader worker processes (fork).
    The loader is an iterator of micro-batches; state_dict() / load_state_dict(state) (a
    JSON-able dict) resume the stream exactly (same data, dp_size/dp_rank, num_workers, seed,
    lengths required; load_state_dict says which setting differs otherwise); stats() gives
    batches / dropped / subsampled counts; close() stops the worker processes.
    The batches depend on dp_rank only: every TP/SP/CP rank of one DP rank gets the same ones.
    dp_rank=None / dp_size=None: taken from megatron.core.parallel_state (the data-parallel
    group without context parallelism) when it is initialised, else 0 / 1.

make_synthetic_dataset(out_dir, num_videos=16, num_frames=4, image_size=32, seed=0,
                       num_text_only=0, shard_max_samples=4, image_format="jpg", ...) -> str
    Synthetic mp4 videos (PyAV) -> shards through the real preprocessing; returns the dataset
    directory to pass as a data path.
make_synthetic_videos(out_dir, num_videos, frames_per_video, width, height, fps, seed, ...)
    -> path of the annotation JSON written next to ``videos/``.
preprocess(annotation_path, out_dir, media_root=None, **PreprocessConfig fields)
    -> PreprocessSummary (also the CLI tools/preprocess_videos.py). Writes shard-NNNNNN.tar
    (+ energon's .tar.idx) and .nv-meta/{dataset.yaml, split.yaml, .info.yaml, .info.json,
    longvila.json}; megatron-energon 7.4 reads the result as a CrudeWebdataset as is.
decode_video(path, num_frames=8, fps=None, max_frames=None, start=None, end=None)
    -> DecodedVideo(frames [H,W,3] uint8 list, times, indices, ...); MediaError on bad input.

Micro-batch (dict), S = seq_length * micro_batch_size
-----------------------------------------------------
tokens [1, S] int64         IMAGE_TOKEN_INDEX (-200) x tokens_per_frame per frame, pad id at padding
labels [1, S] int64         labels[t] = tokens[t+1] when t+1 is an assistant-answer token of the
                            same sample, else IGNORE_INDEX (-100)
position_ids [1, S] int64   restart at 0 for each sample (and for the padding segment)
cu_seqlens int32 [n_seg+1]  sample boundaries; each packed row's padding is its own segment
frames float32 [F, 3, H, W] SigLIP normalisation (x/255 - 0.5) / 0.5, in sample order
                            ([0, 3, H, W] when the micro-batch has no frames)
frames_per_sample int64 [n_seg]   0 for text-only samples and padding segments
frame_range int64 [3]       only with sp_size > 1: [a, b, F]: ``frames`` holds frames [a, b) of the
                            micro-batch's F (this SP rank's vision shard)
num_samples int, sample_keys list[str]  (webdataset __key__s; "<corpus>:d<doc>@<offset>" for
                            the document pieces of text corpora)
"""

from .loader import LongVILALoader, build_train_loader, parse_data_paths, read_dataset
from .packing import build_micro_batch, expand_sample
from .preprocess import PreprocessConfig, PreprocessSummary, preprocess
from .synthetic import make_synthetic_dataset, make_synthetic_videos
from .task_encoder import EncodedSample, SampleError, TaskEncoder
from .tokenizer import (TEMPLATES, ChatTokenizer, build_tokenizer, encode_chat,
                        make_tiny_hf_tokenizer, stop_token_ids, vila_prompt_ids)
from .video import MediaError, decode_video, resize_frame

__all__ = [
    "build_train_loader", "build_tokenizer", "make_synthetic_dataset", "make_synthetic_videos",
    "preprocess", "PreprocessConfig", "PreprocessSummary", "LongVILALoader", "ChatTokenizer",
    "TaskEncoder", "EncodedSample", "SampleError", "MediaError", "TEMPLATES", "decode_video",
    "resize_frame", "build_micro_batch", "expand_sample", "parse_data_paths", "read_dataset",
    "make_tiny_hf_tokenizer", "encode_chat", "vila_prompt_ids", "stop_token_ids",
]
