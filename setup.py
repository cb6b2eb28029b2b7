"""Package discovery only; all metadata lives in pyproject.toml.

The built-in plugins live in the top-level ``plugins/`` folder but install under the import name
``cambrian_plugins`` so that they never collide with another distribution's ``plugins`` module.
"""

from setuptools import find_packages, setup

core = find_packages(include=["cambrian_core", "cambrian_core.*"])
builtin = ["cambrian_plugins" + p[len("plugins") :] for p in find_packages(include=["plugins", "plugins.*"])]

setup(
    packages=core + builtin,
    package_dir={"cambrian_core": "cambrian_core", "cambrian_plugins": "plugins"},
    package_data={"cambrian_core": ["py.typed"]},
)
