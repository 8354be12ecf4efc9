"""prompt-tuning: parameter-efficient prompt tuning of frozen T5-family models in JAX/Flax."""
from prompt_tuning.model.config import PRESETS, T5Config
from prompt_tuning.model.t5 import T5
from prompt_tuning.model.prompt import PromptConfig

__version__ = "0.1.0"


def load_pretrained(path, config=None, dtype=None):
  """Loads an HF, T5X (legacy or orbax) or prompt-tuning checkpoint: returns `(model, params)`.

  `config` may also be a gin model file (`gin/models/*.gin`). See
  `prompt_tuning.formats.pretrained.load_pretrained`.
  """
  import os
  import jax.numpy as jnp
  from prompt_tuning.formats.pretrained import load_pretrained as _load
  if isinstance(config, (str, os.PathLike)) and os.fspath(config).endswith(".gin"):
    # This is the edge: a gin model file is parsed here, the loader only takes configs.
    from prompt_tuning.cli import gin_utils
    config = gin_utils.config_from_gin(config)
  return _load(path, config=config, dtype=jnp.float32 if dtype is None else dtype)


__all__ = ["PRESETS", "PromptConfig", "T5", "T5Config", "load_pretrained"]
