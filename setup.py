"""The native CPU backend of the kernels; everything else about the package is in pyproject.toml.

Two packages from one checkout: ``exgrpo_kernels`` (the folder ``kernels/``: the fused GRPO / log-prob / NLL kernels
and packing; core requirements only: torch, triton, numpy) and ``exgrpo`` (the trainer, EI pipeline and CLI, behind
the ``train`` extra).

The native CPU backend (``exgrpo_kernels._C``: the C++ kernels of ``csrc/``) is built here by CMake through the
top-level ``CMakeLists.txt``, against the torch already installed, so install with ``--no-build-isolation``
(``pip install --no-build-isolation -e .``). ``EXGRPO_NO_NATIVE=1`` skips it: the torch twins serve the CPU then.
Its row kernels are compiled for AVX-512, AVX2 and the x86-64 baseline and chosen when it loads;
``EXGRPO_NATIVE_ARCH=1`` compiles everything with ``-march=native`` instead (for this machine only).
Needs cmake >= 3.18 and a C++17 compiler (``pip install cmake ninja`` provides the first).

The kernels' import name is ``exgrpo_kernels``, not ``kernels``: PyPI's ``kernels`` (Hugging Face hub kernels)
is probed and imported by transformers, and the two must not overwrite each other.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NO_NATIVE = os.environ.get("EXGRPO_NO_NATIVE", "0") == "1"
# opt-in: -march=native (a library for this machine's vector unit only); the default build runs on any x86-64 host
NATIVE_ARCH = os.environ.get("EXGRPO_NATIVE_ARCH", "0") == "1"


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
               f"-DEXGRPO_OUTPUT_DIR={lib_dir}", f"-DEXGRPO_EXT_SUFFIX={suffix}", "-DCMAKE_BUILD_TYPE=Release",
               f"-DEXGRPO_NATIVE_ARCH={'ON' if NATIVE_ARCH else 'OFF'}"]
        if ninja and not (build_dir / "CMakeCache.txt").exists():
            cfg += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        subprocess.check_call(cfg)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 1)])
        built = lib_dir / out.name
        if not built.exists():
            raise RuntimeError(f"CMake did not produce {built}")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, out)

# Metadata, dependencies, extras, packages and entry points: pyproject.toml. Here: the native extension only.
setup(
    ext_modules=[] if NO_NATIVE else [CMakeExtension("exgrpo_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
