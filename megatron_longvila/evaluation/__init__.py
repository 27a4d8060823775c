"""Evaluation: generation and the video needle-in-a-haystack (V-NIAH).

Layer: an entry-point package (beside ``training`` and ``conversion``) above ``models``,
``parallel`` and ``data``; see :mod:`megatron_longvila.kernels` for the whole layering.

generation.py   prompts (training chat template), frames (preprocessing steps), greedy/sampled
                decoding with the KV cache (sharded over the SP group), several prompts per
                call, teacher-forced scoring; the recompute path without a cache
needle.py       V-NIAH grid (frames x depth), scoring, resumable results JSON, heatmap PNG,
                needle sets (ours, LongVA's dataset.json, the HF parquet)
vniah.py        V-NIAH with the model: haystack embedded once per frame count, one prefill
                per cell for free generation and teacher-forced scores
needle_data.py  the synthetic needle task (grey frames, one coloured-square frame)
runtime.py      process/model setup shared by tools/generate.py and tools/eval_needle.py
hf_reference.py the Hugging Face reference (transformers modules, VILA's merge): the one copy
"""
