"""jaxrec.models: the dense networks (DLRM, DCNv2, DeepFM, two-tower); embeddings injected.

Interface: `model.apply({'params': p}, dense [B, num_dense], emb [B, F, D]) -> logits [B]`.
"""

from jaxrec.models.base import MODELS, build_model, compute_loss, init_params
from jaxrec.models.dcnv2 import CrossNetwork, DCNv2
from jaxrec.models.deepfm import DeepFM, fm_second_order
from jaxrec.models.dlrm import DLRM, dot_interaction
from jaxrec.models.mlp import MLP
from jaxrec.models.two_tower import TwoTower, in_batch_softmax_loss

__all__ = [
    "MODELS", "build_model", "compute_loss", "init_params", "CrossNetwork", "DCNv2", "DeepFM",
    "fm_second_order", "DLRM", "dot_interaction", "MLP", "TwoTower", "in_batch_softmax_loss",
]
