"""megarlhf: reward models, DPO and PPO for Llama-family models on megatron-core."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "megarlhf" / "__init__.py").read_text()).group(1)

setup(
    name="megarlhf",
    version=version,
    description="Megatron-core trainer for learning from preference feedback: reward models, "
                "DPO and PPO for Llama-family models, from a laptop to SLURM GPU clusters.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megarlhf", "megarlhf.*"]),
    include_package_data=True,
    install_requires=[
        # On CPU-only machines install the CPU build first (`pip install torch==2.13.0`);
        # the Makefile does this. Any torch the pinned megatron-core accepts works.
        "torch>=2.4",
        # The CPU compatibility layer (megarlhf/platform.py) is tested against 0.16.x,
        # the newest megatron-core release for Python 3.11. Widen only with tests.
        "megatron-core>=0.16.0,<0.17",
        "omegaconf>=2.3",
        "datasets>=2.19",
        "sentencepiece>=0.2",
        "protobuf>=3.20",  # SentencePiece's model proto (megarlhf.data.tokenizer)
        "safetensors>=0.4",
        "wandb>=0.17",
        "numpy>=1.24",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",  # the demo's reward curve and the scaling plots
    ],
    extras_require={
        # Transformer Engine (FP8 on Hopper). NVIDIA apex is used only when a cluster
        # image provides it: the PyPI package called "apex" is unrelated.
        "gpu": ["transformer-engine[pytorch]>=1.9"],
        # transformers: conversion checks against Hugging Face models; protobuf lets it
        # read SentencePiece tokenizers.
        "hf": ["transformers>=4.45", "protobuf>=3.20"],
        "dev": ["pytest>=8", "hypothesis>=6", "transformers>=4.45", "protobuf>=3.20"],
    },
    entry_points={"console_scripts": ["megarlhf=megarlhf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    license="Apache-2.0",
)
