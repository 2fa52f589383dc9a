"""Configs: one frozen dataclass per command (``schema``), loaded from YAML with ``key=value`` overrides and saved
into the run folder (``loader``)."""
from exgrpo.config.loader import from_dict, load_config, parse_overrides, save_config, to_dict  # noqa: F401
from exgrpo.config.schema import *  # noqa: F401,F403
from exgrpo.config.schema import __all__ as _schema_all

__all__ = ["from_dict", "load_config", "parse_overrides", "save_config", "to_dict", *_schema_all]
