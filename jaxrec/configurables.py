"""Imports every module that registers gin configurables, so config files can name them."""

# pylint: disable=unused-import
import jaxrec.embedding.optimizers  # noqa: F401
import jaxrec.embedding.specs  # noqa: F401
import jaxrec.embedding.table_dicts  # noqa: F401  (embedding_tables)
import jaxrec.kernels.platform  # noqa: F401  (GpuTuning: Triton launch settings)
import jaxrec.models  # noqa: F401
import jaxrec.train.config  # noqa: F401
import jaxrec.data  # noqa: F401
import jaxrec.offload  # noqa: F401
import jaxrec.checkpoint  # noqa: F401  (CheckpointManager: written to W/config.gin)
