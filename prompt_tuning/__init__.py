"""prompt-tuning: parameter-efficient prompt tuning of frozen T5-family models in JAX/Flax."""
from prompt_tuning.model.config import PRESETS, T5Config
from prompt_tuning.model.t5 import T5
from prompt_tuning.model.prompt import PromptConfig

__version__ = "0.1.0"


def load_pretrained(path, config=None, dtype=None):
  """Loads an HF, T5X (legacy or orbax) or prompt-tuning checkpoint: returns `(model, params)`.

  See `prompt_tuning.formats.pretrained.load_pretrained`.
  """
  from prompt_tuning.formats.pretrained import load_pretrained as _load
  import jax.numpy as jnp
  return _load(path, config=config, dtype=jnp.float32 if dtype is None else dtype)


__all__ = ["PRESETS", "PromptConfig", "T5", "T5Config", "load_pretrained"]
