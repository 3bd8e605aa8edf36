"""The config: its schema (every key), typed views, and one `validate`.

The library's modules import this package as `config_lib` and use these names.
"""

from clm_jax.config.checks import ConfigError
from clm_jax.config.checks import check_attention
from clm_jax.config.checks import check_layout
from clm_jax.config.checks import check_schema
from clm_jax.config.checks import mesh_shape
from clm_jax.config.checks import stream_count
from clm_jax.config.checks import unknown_keys
from clm_jax.config.checks import validate
from clm_jax.config.schema import ATTENTION
from clm_jax.config.schema import CODE_EVAL_TASKS
from clm_jax.config.schema import DTYPES
from clm_jax.config.schema import LANGUAGES
from clm_jax.config.schema import REMAT
from clm_jax.config.schema import SOURCES
from clm_jax.config.schema import flatten
from clm_jax.config.schema import get_config
from clm_jax.config.schema import parse_mixture
from clm_jax.config.views import ModelConfig

__all__ = [
  'ATTENTION',
  'CODE_EVAL_TASKS',
  'DTYPES',
  'LANGUAGES',
  'REMAT',
  'SOURCES',
  'ConfigError',
  'ModelConfig',
  'check_attention',
  'check_layout',
  'check_schema',
  'flatten',
  'get_config',
  'mesh_shape',
  'parse_mixture',
  'stream_count',
  'unknown_keys',
  'validate',
]
