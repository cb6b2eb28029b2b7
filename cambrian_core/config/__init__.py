"""Config loading (mmengine ``Config`` with ``_base_``) and one-pass validation against typed schemas."""

from cambrian_core.config.loader import ConfigError, base_files, check, load_config, parse_cfg_options
from cambrian_core.config.schema import SECTIONS, Problem, register_section

__all__ = [
    "SECTIONS",
    "ConfigError",
    "Problem",
    "base_files",
    "check",
    "load_config",
    "parse_cfg_options",
    "register_section",
]
