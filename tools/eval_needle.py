#!/usr/bin/env python
"""Video needle-in-a-haystack (V-NIAH): accuracy over a grid of frame counts x needle depths.

  python tools/eval_needle.py --load SAVE --haystack haystack.mp4 --needles needles.json \\
      --frame-counts 4,8,16,32 --depths 0,0.25,0.5,0.75,1 --output out/niah.json
  torchrun --nproc-per-node 2 tools/eval_needle.py --context-parallel-size 2 ...   # each forward MM-SP-sharded over 2 ranks

needles.json: ``[{"image": "needles/a.png", "question": "...", "answer": "..."}, ...]`` (image
paths relative to the JSON), or LongVA's dataset.json (path/prompt/answer), or the Hugging Face
needle set LongVILA uses (lmms-lab/v_niah_needles) as a .parquet file. --haystack is a video
(N-1 frames sampled uniformly for N frames) or "synthetic" (plain grey frames, see
megatron_longvila/evaluation/needle_data.py); its frames are encoded once per frame count. A
needle is inserted at frame floor(depth * (N-1) + 0.5). --score both (default): greedy answers
(--match exact | contains) and teacher-forced scoring as LongVILA scores V-NIAH (every answer
token the argmax), both from one prefill per cell with the KV cache.
Writes --output (JSON, rewritten after every cell; finished cells are skipped on a rerun with
the same settings) and the heatmap PNG (--heatmap, default: the output with .png).
"""

import argparse
import os
import sys
import time


from megatron_longvila import cpu_compat  # noqa: E402
from megatron_longvila.evaluation import generation as G  # noqa: E402
from megatron_longvila.evaluation import needle as N  # noqa: E402
from megatron_longvila.evaluation import runtime as R  # noqa: E402
from megatron_longvila.evaluation import vniah as V  # noqa: E402


def _floats(s):
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_model_arguments(p)
    g = p.add_argument_group("needle-in-a-haystack")
    g.add_argument("--haystack", required=True, help='a video file, or "synthetic"')
    g.add_argument("--haystack-seed", type=int, default=0, help="for --haystack synthetic")
    g.add_argument("--needles", required=True, help="needles JSON")
    g.add_argument("--frame-counts", type=_ints, default=[4, 8, 16])
    g.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    g.add_argument("--match", choices=("exact", "contains"), default="exact")
    g.add_argument("--score", choices=V.SCORES, default="both",
                   help="free generation, teacher-forced (LongVILA's V-NIAH score), or both")
    g.add_argument("--heatmap-score", choices=("generate", "teacher-forced"), default=None,
                   help="which accuracy the heatmap shows (default: generation's if scored)")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--image-size", type=int, default=None, help="default: the vision tower's")
    g.add_argument("--output", required=True, help="results JSON")
    g.add_argument("--heatmap", default=None, help="PNG (default: output with .png)")
    g.add_argument("--overwrite", action="store_true", help="discard earlier results")
    g.add_argument("--hf", default=None, metavar="HF_DIR",
                   help="evaluate a Hugging Face (VILA layout) checkpoint through transformers "
                        "instead of --load (one process; for comparisons)")
    return p


def settings_of(args, cfg, size):
    return {
        "checkpoint": (f"hf:{os.path.abspath(args.hf)}" if args.hf else
                       os.path.abspath(args.load) if args.load else f"random-init(seed={args.seed})"),
        "model": cfg.to_dict(),
        "haystack": args.haystack if args.haystack == "synthetic" else os.path.abspath(args.haystack),
        "haystack_seed": args.haystack_seed if args.haystack == "synthetic" else None,
        "needles": os.path.abspath(args.needles),
        "match": args.match,
        "score": args.score,
        "max_new_tokens": args.max_new_tokens,
        "image_size": size,
    }


def main(argv=None):
    cpu_compat.enable()  # an entry point: the CPU shims (no-op with CUDA)
    args = build_parser().parse_args(argv)
    if args.hf:
        from megatron_longvila.evaluation.hf_reference import HFLongVILA
        R.init_distributed()
        import torch.distributed as dist
        if dist.get_world_size() != 1:
            raise SystemExit("--hf runs in one process")
        from megatron.core import parallel_state
        from megatron_longvila.parallel.groups import initialize_mmsp
        if not parallel_state.model_parallel_is_initialized():
            initialize_mmsp()  # a one-rank layout: generation's forward takes the SP=1 path
        model = HFLongVILA.from_pretrained(args.hf)
        cfg = model.cfg
    else:
        model, cfg = R.setup_model(args)
    tok = R.resolve_tokenizer(args)
    size = args.image_size or cfg.vision.image_size
    needles = N.load_needles(args.needles)
    needle_frames = [nd.frame if nd.frame is not None else G.read_media(nd.image)[0]
                     for nd in needles]
    main_rank = R.is_main_rank()
    results = N.Results(args.output, settings_of(args, cfg, size), overwrite=args.overwrite)

    def haystack_fn(n):
        if n == 0:
            return []
        if args.haystack == "synthetic":
            import numpy as np
            from megatron_longvila.evaluation.needle_data import haystack_frames
            return list(haystack_frames(np.random.default_rng(args.haystack_seed), n, 2 * size))
        return G.read_media(args.haystack, n)

    gcfg = G.GenerationConfig(max_new_tokens=args.max_new_tokens, stop_ids=G.stop_token_ids(tok))
    ev = V.NeedleEvaluator(model, tok, size, gcfg, args.score, needles, needle_frames)

    def cell_fn(n, depth, i):
        if ev.frame_count != n:
            ev.set_haystack(n, haystack_fn(n - 1))
        return ev.cell(n, depth, i)

    t0 = time.time()
    N.run_cells(cell_fn, needles, args.frame_counts, args.depths, results, args.match,
                write=main_rank, log=print if main_rank else None)
    if main_rank:
        results.write()
        data = results.to_dict()
        png = args.heatmap or os.path.splitext(args.output)[0] + ".png"
        key = {"generate": "accuracy", "teacher-forced": "tf_accuracy", None: None}[
            args.heatmap_score]
        N.plot_heatmap(data, png, key=key)
        s = data["summary"]
        parts = []
        if s.get("accuracy") is not None:
            parts.append(f"accuracy {s['accuracy']:.4f} ({s['correct']}/{s['answers']})")
        if s.get("tf_accuracy") is not None:
            parts.append(f"teacher-forced accuracy {s['tf_accuracy']:.4f} "
                         f"({s['tf_correct']}/{s['answers']})")
        print(f"{'; '.join(parts)} over {s['cells']} cells; {time.time() - t0:.1f}s; "
              f"results {args.output}; heatmap {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
