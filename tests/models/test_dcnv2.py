"""DCNv2 at init, with the shapes of configs/dcnv2_synthetic.gin: the cross network starts as
the identity, so unnormalised dense inputs do not give O(1-3) seed-dependent logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import ConfigError
from jaxrec.models import CrossNetwork, DCNv2
from jaxrec.models.base import build_model
from tests.models import init_testlib as lib

MODEL = DCNv2(num_cross_layers=3, low_rank=32, deep_mlp=(256, 128))


def test_cross_network_is_the_identity_at_init():
  x0 = jnp.asarray(np.random.default_rng(0).exponential(3.0, (8, 29)), jnp.float32)
  for low_rank in (None, 4):
    net = CrossNetwork(3, low_rank)
    params = net.init(jax.random.key(0), x0)
    np.testing.assert_array_equal(net.apply(params, x0), x0)
    # ... and every layer learns from the first step (low-rank: U_l; V_l once U_l moves)
    g = jax.grad(lambda p: (net.apply(p, x0) ** 2).sum())(params)["params"]
    assert all(float(jnp.abs(g[f"cross_{i}"]["kernel"]).max()) > 0 for i in range(3))


def test_initial_logits_are_small_and_loss_near_label_entropy():
  """With Glorot cross layers: logit mean up to 2.9, loss up to 1.14."""
  lib.assert_initial_loss_near_entropy(MODEL)


def test_bfloat16_cross_network_keeps_a_float32_residual_stream():
  """Under mixed precision only the cross layers' matmul operands are bfloat16:
  `h = W_l x_l + b_l` leaves each layer as its float32 sum and the residual
  `x_{l+1} = x0 * h + x_l` is float32 (it was computed from `h` rounded to bfloat16)."""
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
  bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)
  for low_rank in (None, 4):
    net = CrossNetwork(2, low_rank, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype),
                          net.init(jax.random.key(0), x0))
    out = net.apply(params, x0)
    assert out.dtype == jnp.float32
    p, x, want = params["params"], np.asarray(x0, np.float64), np.asarray(x0, np.float64)
    for i in range(2):
      h = bf(want)
      if low_rank is not None:
        h = bf(h @ bf(p[f"cross_{i}_v"]["kernel"]))
      h = h @ bf(p[f"cross_{i}"]["kernel"]) + np.asarray(p[f"cross_{i}"]["bias"], np.float64)
      want = x * h + want
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("binding, value", [("structure", "stackd"), ("num_cross_layers", -1),
                                            ("deep_mlp", 256)])
def test_bad_hyperparameter_stops_build_model(binding, value):
  """A typo such as `DCNv2.structure = 'stackd'` stops when the config is read (like a bad
  dtype), not only when the model is first called after planning."""
  with pytest.raises(ConfigError, match=f"DCNv2.{binding}"):
    build_model("dcnv2", **{binding: value})
