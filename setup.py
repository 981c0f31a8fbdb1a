"""Only the optional C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The CPU dropout-mask generator (lorakern/_philox.c). optional=True: without a C
        # compiler the install still succeeds and lorakern.reference uses its numpy path.
        Extension("lorakern._philox", ["lorakern/_philox.c"], optional=True, extra_compile_args=["-O3"]),
    ],
)
