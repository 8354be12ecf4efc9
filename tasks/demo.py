"""The bundled demo tasks: generated word-list tasks over a byte vocabulary (no downloads).

The demo's frozen model is trained (model tuning, from scratch) on `demo_pretrain`, a mixture of
four skills, each announced by a text prefix:
  "copy: cat red sun"  -> "cat red sun"      "upper: cat red sun" -> "CAT RED SUN"
  "first: cat red sun" -> "cat"              "last: cat red sun"  -> "sun"
The held-out task `demo_taskless_last` gives the bare word list with no prefix and expects the
last word. The frozen model never saw an input without a prefix, so it does not know what to do;
a soft prompt has to learn to play the missing instruction (the paper's setting: the prompt
replaces a task description the model would otherwise need).
"""
from __future__ import annotations

import functools
import random

import numpy as np
import seqio
import tensorflow as tf

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(VOCABULARY, add_eos=True, required=True),
    "targets": seqio.Feature(VOCABULARY, add_eos=True, required=True),
}
WORDS = ("cat dog sun red sky sea owl fox bee ant cow pig hen elk yak emu "
         "oak elm fig pea bean corn rice milk tea jam pie cake fish frog "
         "wolf bear lion deer duck goat crab moth toad mole seal hawk").split()
SPLIT_SIZES = {"train": 20000, "validation": 256}
SKILLS = {
    "copy": lambda ws: " ".join(ws),
    "upper": lambda ws: " ".join(ws).upper(),
    "first": lambda ws: ws[0],
    "last": lambda ws: ws[-1],
}


def _word_lists(split: str, seed_offset: int):
  # Disjoint streams per split and task (different seeds), reproducible on every machine.
  rng = random.Random(f"{split}-{seed_offset}")
  for _ in range(SPLIT_SIZES[split]):
    yield [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]


def _make_dataset(split, shuffle_files=False, seed=None, *, skill: str, prefix: bool,
                  seed_offset: int):
  del shuffle_files, seed
  inputs, targets = [], []
  for ws in _word_lists(split, seed_offset):
    text = " ".join(ws)
    inputs.append(f"{skill}: {text}" if prefix else text)
    targets.append(SKILLS[skill](ws))
  return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})


def exact_match(targets, predictions) -> dict[str, float]:
  """Percent of predictions equal to their target (task metrics are percentages, as T5's)."""
  return {"exact_match": 100 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def _register(name: str, skill: str, prefix: bool, seed_offset: int) -> None:
  if name in seqio.TaskRegistry.names():
    return
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          functools.partial(_make_dataset, skill=skill, prefix=prefix, seed_offset=seed_offset),
          splits=tuple(SPLIT_SIZES), num_input_examples=SPLIT_SIZES),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features=OUTPUT_FEATURES,
      metric_fns=[exact_match])


for _i, _skill in enumerate(SKILLS):
  _register(f"demo_{_skill}", _skill, prefix=True, seed_offset=_i)
_register("demo_taskless_last", "last", prefix=False, seed_offset=100)

if "demo_pretrain" not in seqio.MixtureRegistry.names():
  seqio.MixtureRegistry.add("demo_pretrain", [f"demo_{s}" for s in SKILLS], default_rate=1.0)
