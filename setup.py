"""Package discovery only; all metadata lives in pyproject.toml.

The built-in plugins live in the top-level ``plugins/`` folder but install under the import name
``cambrian_plugins`` so that they never collide with another distribution's ``plugins`` module.
"""

from setuptools import find_packages, setup

core = find_packages(include=["cambrian_core", "cambrian_core.*"])
builtin = ["cambrian_plugins" + p[len("plugins") :] for p in find_packages(include=["plugins", "plugins.*"])]

# The built-in configs ship inside wheels as the data-only package ``cambrian_configs`` (the ``cambrian::`` scope);
# in a checkout / editable install they are read from ``configs/`` directly.
setup(
    packages=[*core, *builtin, "cambrian_configs"],
    package_dir={
        "cambrian_core": "cambrian_core",
        "cambrian_plugins": "plugins",
        "cambrian_configs": "configs",
    },
)
