"""Property tests (hypothesis): masks and prompt combination over random lengths and paddings,
and prompt export/import round trips.

Shapes stay fixed within each test (only lengths, paddings and values vary), so jax compiles
each combination once rather than once per example.
"""
import functools
import json
import pathlib
import tempfile

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from prompt_tuning.training import checkpoints
from prompt_tuning.model import masks
from prompt_tuning.formats import prompt_io
from prompt_tuning.model import prompt as prompts

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
B, L = 4, 10  # batch rows and input length of every combination example
PLENS = (1, 3)
MODES = prompts.COMBINATIONS


@functools.partial(jax.jit, static_argnames="mode")
def _combine(embedded, prompt, valid, mode):
  return prompts.combine(embedded, prompt, valid, mode)


@functools.partial(jax.jit, static_argnames=("plen", "mode"))
def _combine_mask(valid, plen, mode):
  return prompts.combine_mask(valid, plen, mode)


def _labelled(plen):
  """Input position i carries value i + 1 and prompt row k carries -(k + 1): the output says
  where every row came from."""
  x = np.broadcast_to(np.arange(1, L + 1, dtype=np.float32)[None, :, None], (B, L, 1))
  p = np.broadcast_to(-np.arange(1, plen + 1, dtype=np.float32)[None, :, None], (B, plen, 1))
  return np.ascontiguousarray(x), np.ascontiguousarray(p)


right_padded = st.lists(st.integers(0, L), min_size=B, max_size=B).map(
    lambda ns: np.arange(L)[None, :] < np.asarray(ns)[:, None])
any_padding = hnp.arrays(bool, (B, L))


@SETTINGS
@given(valid=st.one_of(right_padded, any_padding), plen=st.sampled_from(PLENS),
       mode=st.sampled_from(MODES))
def test_combined_validity_counts_prompt_plus_real_tokens(valid, plen, mode):
  """Every mode: valid positions = P + real input tokens, and combine_mask agrees with combine."""
  x, p = _labelled(plen)
  out, valid_out = _combine(x, p, valid, mode)
  valid_out = np.asarray(valid_out)
  np.testing.assert_array_equal(valid_out.sum(1), plen + valid.sum(1))
  np.testing.assert_array_equal(np.asarray(_combine_mask(valid, plen, mode)), valid_out)
  assert out.shape == (B, L + plen, 1)


@SETTINGS
@given(valid=st.one_of(right_padded, any_padding), plen=st.sampled_from(PLENS),
       mode=st.sampled_from(MODES))
def test_combination_keeps_input_order_and_a_contiguous_prompt(valid, plen, mode):
  """No input row is lost, duplicated or reordered; the prompt appears once, in order, in one
  block; a position is valid iff it is a prompt row or a valid input row."""
  x, p = _labelled(plen)
  out, valid_out = _combine(x, p, valid, mode)
  out, valid_out = np.asarray(out)[..., 0], np.asarray(valid_out)
  for b in range(B):
    np.testing.assert_array_equal(out[b][out[b] > 0], np.arange(1, L + 1))
    where = np.flatnonzero(out[b] < 0)
    np.testing.assert_array_equal(out[b][where], -np.arange(1, plen + 1))
    np.testing.assert_array_equal(np.diff(where), 1)
    source_valid = np.where(out[b] > 0, valid[b][np.clip(out[b].astype(int) - 1, 0, L - 1)], True)
    np.testing.assert_array_equal(valid_out[b], source_valid)


@SETTINGS
@given(valid=right_padded, plen=st.sampled_from(PLENS))
def test_where_each_mode_puts_the_prompt(valid, plen):
  """prefix: first; prefix_after_bos: right after the first token; suffix_before_eos: right
  before the last real token (the EOS), with no padding hole before the prompt or the EOS;
  suffix: right after the last real token, the pads after it."""
  x, p = _labelled(plen)
  lengths = valid.sum(1)
  for mode in MODES:
    out, valid_out = _combine(x, p, valid, mode)
    out, valid_out = np.asarray(out)[..., 0], np.asarray(valid_out)
    for b, n in enumerate(lengths):
      start = {"prefix": 0, "prefix_after_bos": 1, "suffix_before_eos": max(n - 1, 0),
               "suffix": n}[mode]
      np.testing.assert_array_equal(out[b, start:start + plen], -np.arange(1, plen + 1))
      if mode == "suffix_before_eos":
        if n:
          assert out[b, start + plen] == n  # the last real token follows the prompt
        np.testing.assert_array_equal(valid_out[b], np.arange(L + plen) < n + plen)
      if mode == "suffix":
        np.testing.assert_array_equal(out[b, :n], np.arange(1, n + 1))  # the input, EOS included
        np.testing.assert_array_equal(out[b, n + plen:], np.arange(n + 1, L + 1))  # then pads
        np.testing.assert_array_equal(valid_out[b], np.arange(L + plen) < n + plen)


@SETTINGS
@given(valid=st.one_of(right_padded, any_padding))
def test_attention_masks_and_biases(valid):
  """fully_visible is the outer product of validities; key_mask ignores the query; the bias is 0
  or NEG_INF; softmax stays finite even on rows with no valid key, and gives masked keys no
  weight otherwise."""
  full = np.asarray(masks.fully_visible_mask(valid, valid))
  np.testing.assert_array_equal(full[:, 0], valid[:, :, None] & valid[:, None, :])
  np.testing.assert_array_equal(full.sum((1, 2, 3)), valid.sum(1) ** 2)
  keys = np.asarray(masks.key_mask(valid))
  assert keys.shape == (B, 1, 1, L) and (keys[:, 0, 0] == valid).all()
  bias = np.asarray(masks.mask_to_bias(full))
  assert set(np.unique(bias)) <= {0.0, np.float32(masks.NEG_INF)}
  weights = np.asarray(jax.nn.softmax(np.zeros_like(bias) + bias, axis=-1))
  assert np.isfinite(weights).all()
  has_key = full[:, 0].any(-1)  # [B, Q]: a valid query with at least one valid key
  masked_weight = np.where(full, 0.0, weights).sum(-1)[:, 0]
  assert (masked_weight[has_key] < 1e-6).all()
  causal = np.asarray(masks.causal_mask(L))[0, 0]
  np.testing.assert_array_equal(causal, np.tril(np.ones((L, L), bool)))


# --- Export and import round trips --------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
prompt_arrays = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)),
                           elements=finite32)


def _same_bits(a, b):
  assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
  assert a.tobytes() == b.tobytes()  # exact, -0.0 and subnormals included


@SETTINGS
@given(prompt=prompt_arrays)
def test_npy_and_extensionless_exports_round_trip_exactly(prompt):
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    _same_bits(prompt_io.load_prompt(prompt_io.save_prompt_npy(tmp / "p.npy", prompt)), prompt)
    # The original implementation's exports: np.save to a file object, no extension.
    with open(tmp / "checkpoint_export", "wb") as f:
      np.save(f, prompt)
    _same_bits(prompt_io.load_prompt(tmp / "checkpoint_export"), prompt)
    assert sorted(p.name for p in tmp.iterdir()) == ["checkpoint_export", "p.npy"]  # no temps


@SETTINGS
@given(prompt=prompt_arrays, layers=st.integers(1, 4), heads=st.integers(1, 4))
def test_peft_adapter_round_trips_exactly(prompt, layers, heads):
  with tempfile.TemporaryDirectory() as tmp:
    out = prompt_io.export_peft_adapter(pathlib.Path(tmp) / "adapter", prompt,
                                        base_model_name_or_path="t5", num_layers=layers,
                                        num_attention_heads=heads)
    _same_bits(prompt_io.load_prompt(out, expected_shape=prompt.shape), prompt)
    config = json.loads((out / prompt_io.PEFT_CONFIG).read_text())
    assert (config["num_virtual_tokens"], config["token_dim"]) == prompt.shape
    assert (config["num_layers"], config["num_attention_heads"]) == (layers, heads)


@SETTINGS
@given(prompt=prompt_arrays, dtype=st.sampled_from([np.float16, np.float64]))
def test_other_float_dtypes_load_as_their_float32_value(prompt, dtype):
  with np.errstate(over="ignore"):
    cast = prompt.astype(dtype)
  if not np.isfinite(cast).all():  # float16 overflow: refused like any non-finite prompt
    return
  with tempfile.TemporaryDirectory() as tmp:
    np.save(pathlib.Path(tmp) / "p.npy", cast)
    _same_bits(prompt_io.load_prompt(pathlib.Path(tmp) / "p.npy"), cast.astype(np.float32))


@SETTINGS
@given(prompt=prompt_arrays, bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       where=st.tuples(st.integers(0, 5), st.integers(0, 5)))
def test_a_non_finite_prompt_is_never_written(prompt, bad, where):
  prompt = prompt.copy()
  prompt[where[0] % prompt.shape[0], where[1] % prompt.shape[1]] = bad
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for write in (lambda: prompt_io.save_prompt_npy(tmp / "p.npy", prompt),
                  lambda: prompt_io.export_peft_adapter(tmp / "adapter", prompt,
                                                        base_model_name_or_path="t5",
                                                        num_layers=1, num_attention_heads=1)):
      try:
        write()
        raise AssertionError("a non-finite prompt was written")
      except prompt_io.PromptFileError:
        pass
    assert list(tmp.iterdir()) == []


def test_checkpoint_numpy_export_round_trips_exactly(tmp_path):
  """The trainer's per-checkpoint export (`numpy_checkpoints/checkpoint_N/...npy`) reads back
  bit for bit, for prompts drawn by hypothesis."""
  ckpt = checkpoints.Checkpointer(tmp_path / "run", keep=None)
  steps = iter(range(10 ** 6))

  @SETTINGS
  @given(prompt=prompt_arrays)
  def check(prompt):
    step = next(steps)
    ckpt.ensure_numpy_export(step, {"encoder": {"prompt": {"prompt": prompt}}})
    path = ckpt.numpy_export_dir(step) / "encoder.prompt.prompt.npy"
    _same_bits(prompt_io.load_prompt(path), prompt)

  try:
    check()
  finally:
    ckpt.close()
