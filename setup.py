"""
The build of the optional compiled reader, ``django_elasticache._speedups``; all metadata
lives in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler, no Python headers) the
build warns and installs the package without it, and ``django_elasticache.protocol`` uses
its pure-Python reader.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "django_elasticache._speedups",
            sources=["django_elasticache/_speedups.c"],
            optional=True,
        )
    ]
)
