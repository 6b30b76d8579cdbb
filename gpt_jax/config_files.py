"""How the configs/*.py files are built: a base recipe plus flat presets of the dotted fields they change.

A config file's `get_config(preset)` is `preset_config(base, PRESETS, preset)`; one file builds on
another through `load_config_file` (config files are plain files, not a package).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Mapping

import ml_collections


def load_config_file(path: str, preset: str = '') -> ml_collections.ConfigDict:
  """`get_config(preset)` of a config file given by path, as `config_flags` would load it.

  Config files are plain files, not a package, so one preset file builds on another through this
  (e.g. configs/shakespeare_bpe.py starts from configs/shakespeare.py).
  """
  name = '_gpt_jax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                   ) -> ml_collections.ConfigDict:
  """Sets each dotted field of `overrides` ('train.max_steps': 700) in `config`, in place; returns it.

  Only existing fields: a misspelt one is an error rather than a new field nobody reads.
  """
  for key, value in overrides.items():
    *sections, field = key.split('.')
    node = config
    for name in sections:
      node = node[name]
    if field not in node:
      raise KeyError(f'{key!r} is not a field of the base config')
    node[field] = value
  return config


def preset_config(base: Callable[[], ml_collections.ConfigDict], presets: Mapping[str, Mapping[str, Any]],
                  preset: str) -> ml_collections.ConfigDict:
  """`base()` with the overrides of `presets[preset]` ('' = the base recipe as it is)."""
  if preset not in presets:
    raise ValueError(f'unknown preset {preset!r}: use one of '
                     + ', '.join(repr(name) for name in presets))
  return with_overrides(base(), presets[preset])
