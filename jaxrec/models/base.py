"""Model registry, factory and loss.

Every model maps `(dense [B, num_dense] f32, emb [B, F, D] f32)` to logits `[B]` f32,
where `emb` holds the pooled embeddings of the `F` sparse features in config order. Models
own only dense parameters; embedding tables live in `jaxrec.embedding`.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import optax

from jaxrec.errors import ConfigError, close_to
from jaxrec.models.dcnv2 import DCNv2
from jaxrec.models.deepfm import DeepFM
from jaxrec.models.dlrm import DLRM
from jaxrec.models.mlp import compute_dtype
from jaxrec.models.two_tower import (LOSSES, TwoTower, freeze_unused_item_bias,
                                     in_batch_softmax_loss)

MODELS: dict[str, type[nn.Module]] = {
    "dlrm": DLRM,
    "dcnv2": DCNv2,
    "deepfm": DeepFM,
    "two_tower": TwoTower,
}


@gin.configurable
def build_model(name: str = gin.REQUIRED, **kwargs) -> nn.Module:
  """Returns the model `name` (one of `MODELS`); `kwargs` override its gin bindings.

  Hyper-parameters are bound on the classes, e.g. `DLRM.bottom_mlp = (512, 256, 64, 16)`.
  """
  if name not in MODELS:
    lower = str(name).lower()   # the class's spelling, e.g. 'DCNv2'
    hint = f"; did you mean '{lower}'?" if lower in MODELS else close_to(str(name), MODELS)
    raise ConfigError(f"build_model.name: unknown model '{name}' (known: {', '.join(MODELS)})"
                      f"{hint}")
  cls = MODELS[name]
  try:
    model = cls(**kwargs)
  except TypeError as e:
    # gin appends lines to the TypeError ("No values supplied by Gin or caller for
    # arguments: ...", what it had bound); the first line says what is wrong.
    first = str(e).splitlines()[0]
    missing = re.findall(r"'(\w+)'", first) if " missing " in first else []
    if missing:
      names = " and ".join(f"{cls.__name__}.{m}" for m in missing)
      it = "them" if len(missing) > 1 else "it"
      raise ConfigError(f"build_model('{name}'): {names} not bound: the model has no default "
                        f"for {it}; bind {it} in the gin file or with --gin_bindings") from None
    unknown = re.findall(r"unexpected keyword argument '(\w+)'", first)
    if unknown:   # `build_model.x = ...` passes x on to the model: a misspelt parameter
      known = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
      raise ConfigError(f"build_model.{unknown[0]}: {cls.__name__} (build_model.name = "
                        f"'{name}') has no parameter '{unknown[0]}'"
                        f"{close_to(unknown[0], known) or '; it has: ' + ', '.join(known)}"
                        ) from None
    raise ConfigError(f"build_model('{name}'): {first}") from None
  # Checked here too (the model checks it again when called), so that a bad dtype stops a
  # run when the config is read, before planning or starting workers.
  compute_dtype(f"{MODELS[name].__name__}.dtype", model.dtype)
  if hasattr(model, "check_config"):   # e.g. a DCNv2.structure typo
    model.check_config()
  return model


def init_params(model: nn.Module, rng: jax.Array, num_dense: int, num_features: int,
                dim: int) -> Any:
  """Initialises the model's dense parameters (the `params` collection) from shapes alone."""
  dense = jnp.zeros((1, num_dense), jnp.float32)
  emb = jnp.zeros((1, num_features, dim), jnp.float32)
  return model.init(rng, dense, emb)["params"]


def compute_loss(model: nn.Module, params: Any, dense, emb, labels, item_keys=None,
                 log_q=None) -> tuple[jax.Array, jax.Array]:
  """Mean training loss and the logits used for metrics.

  Sigmoid binary cross-entropy for every model, except a `TwoTower` with
  `loss='in_batch_softmax'`, which uses `in_batch_softmax_loss`. Differentiable in
  `params` and `emb`.

  Args:
    model: a model from `build_model`.
    params: its `params` collection (not wrapped in `{'params': ...}`).
    dense: float32 `[B, num_dense]`.
    emb: float32 `[B, F, D]` pooled embeddings.
    labels: float32 `[B]` (0 or 1).
    item_keys: for `remove_accidental_hits`, what identifies each row's item
      (`item_bag_keys` of the batch); None: the item features' pooled embeddings.
    log_q: for `logq_correction`, float32 `[B]` log sampling probability of each row's
      item (`item_frequency.log_prob`; the trainer's estimate); required then.

  Returns:
    (scalar float32 loss, logits float32 `[B]`).
  """
  variables = {"params": params}
  loss_name = getattr(model, "loss", "bce")
  if loss_name not in LOSSES:
    raise ConfigError(f"{type(model).__name__}.loss must be one of {LOSSES}, got '{loss_name}'")
  labels = labels.astype(jnp.float32)
  if loss_name == "in_batch_softmax":
    if model.logq_correction and log_q is None:
      raise ConfigError("TwoTower.logq_correction: compute_loss needs log_q, the items' log "
                        "sampling probabilities (the trainer's `item_freq` estimate)")
    variables = {"params": freeze_unused_item_bias(model, params)}
    user, item = model.apply(variables, dense, emb, method="towers")
    logits = (user * item).sum(-1) / model.temperature
    keys = None
    if model.remove_accidental_hits:
      keys = (item_keys if item_keys is not None
              else model.apply(variables, emb, method="item_keys"))
    return in_batch_softmax_loss(user, item, labels, model.temperature, keys, log_q), logits
  logits = model.apply(variables, dense, emb)
  return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), logits
