"""SAE training: the SAE's math, activations, the trainer, checkpoints (DESIGN §2, §4).

Modules: ``sae`` (math), ``config`` (typed run config), ``data`` (text), ``activations`` and
``activation_cache`` (residual-stream batches), ``trainer`` (the recipe), ``metrics``,
``checkpoint`` (format), ``meta`` (its metadata), ``run`` (a whole run), ``models`` (loading,
hookpoints), ``evals``.
"""

from saescope.training.checkpoint import CheckpointError, load_sae, save_checkpoint
from saescope.training.config import ConfigError, TrainConfig, load_config
from saescope.training.meta import CheckpointMeta
from saescope.training.sae import SAE, SAEConfig

__all__ = [
    "SAE",
    "CheckpointError",
    "CheckpointMeta",
    "ConfigError",
    "SAEConfig",
    "TrainConfig",
    "load_config",
    "load_sae",
    "save_checkpoint",
]
