"""The hand-written cross-entropy gradient equals autodiff of the textbook formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.training import losses


def _reference(logits, targets, z_loss, label_smoothing):
  """T5X's definition written plainly; autodiff gives its gradient."""
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  normalizing = 0.0
  if label_smoothing > 0:
    normalizing = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
  ce = -jnp.sum(soft * log_probs, axis=-1) - normalizing
  z = z_loss * jnp.square(log_z)
  return ce + z, z


@pytest.mark.parametrize("z_loss,label_smoothing", [(0.0, 0.0), (1e-4, 0.0), (1e-2, 0.1)])
def test_cross_entropy_values_and_gradients_match_autodiff(z_loss, label_smoothing):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  logits = 3.0 * jax.random.normal(k1, (3, 5, 37))
  targets = jax.random.randint(k2, (3, 5), 0, 37)
  w_total = jax.random.uniform(k3, (3, 5)) * (jax.random.uniform(k4, (3, 5)) > 0.3)
  w_z = jax.random.uniform(k4, (3, 5))

  def objective(fn):
    def f(x):
      total, z = fn(x, targets, z_loss, label_smoothing)
      return jnp.sum(total * w_total) + 0.7 * jnp.sum(z * w_z)
    return f

  ours = lambda x, t, z, s: losses.token_losses(x, t, z_loss=z, label_smoothing=s)
  for a, b in zip(ours(logits, targets, z_loss, label_smoothing),
                  _reference(logits, targets, z_loss, label_smoothing)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(objective(ours))(logits)
  g_ref = jax.grad(objective(_reference))(logits)
  np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6)
  # Under jit as well (the train step's setting).
  np.testing.assert_allclose(jax.jit(jax.grad(objective(ours)))(logits), g_ref, rtol=1e-5,
                             atol=1e-6)


def test_token_correct_is_argmax_without_ties():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 50))
  argmax = jnp.argmax(logits, -1)
  other = (argmax + 1) % 50
  np.testing.assert_array_equal(losses.token_correct(logits, argmax), np.ones((4, 6), bool))
  np.testing.assert_array_equal(losses.token_correct(logits, other), np.zeros((4, 6), bool))
