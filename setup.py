"""The one compiled part: the HTTP listener's fast path for plain HTTP/1.1 messages (fabric/proxy/_head.c).
Optional: where it cannot be built (no C compiler), fabric installs without it and reads those messages
in Python (fabric/proxy/plain.py). Everything else about the package is in setup.cfg."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("fabric.proxy._head", ["fabric/proxy/_head.c"], extra_compile_args=["-O2", "-Wall"], optional=True)
    ]
)
