"""Build script: the metadata is in setup.cfg; this adds the optional C module.

``sklearn_maf._nn._fused`` (fused element-wise passes of a training step,
see ``sklearn_maf/_nn/backprop.py``) is built when a C compiler is
available. It is optional: where it cannot be built, the install goes on
without it and training runs the same passes as torch operations.
"""

import sys

from setuptools import Extension, setup

# Let GCC and Clang vectorise loops with comparisons of floats (the clamps
# in _fused.c) and square roots: a floating-point operation never traps in
# Python either, and nothing in _fused.c reads errno.
FLAGS = [] if sys.platform == "win32" else ["-fno-trapping-math", "-fno-math-errno"]

setup(
    ext_modules=[
        Extension(
            "sklearn_maf._nn._fused",
            sources=["sklearn_maf/_nn/_fused.c"],
            extra_compile_args=FLAGS,
            optional=True,
        )
    ]
)
