from setuptools import find_packages, setup

setup(
    name="megatron-longvila",
    version="0.1.0",
    description="LongVILA long-video vision-language model training on Megatron-Core",
    packages=find_packages(include=["megatron_longvila", "megatron_longvila.*"]),
    python_requires=">=3.10",
    # torch is not pinned to any build: NGC containers bring their own CUDA torch.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "transformers>=4.45",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "webdataset>=0.2.86",
        "av>=12",
        "pillow",
        "numpy",
        "tqdm",
        "einops",
        "pyyaml",
        "psutil",  # megatron-core dist checkpointing's writer hangs on the CPU without it
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "import-linter>=2.1", "matplotlib", "megatron-energon", "pyarrow",
                 "imageio-ffmpeg",  # a static ffmpeg: reference decoding in the video tests
                 "tensorboard", "wandb"],
        # --tensorboard-dir / --wandb-project (a run asking for one that is missing stops at
        # start-up)
        "logging": ["tensorboard", "wandb"],
        "text": ["pyarrow"],  # parquet text corpora
        "energon": ["megatron-energon"],
        "eval": ["matplotlib"],
        "gpu": ["transformer-engine[pytorch]", "apex", "flash-attn"],
    },
)
