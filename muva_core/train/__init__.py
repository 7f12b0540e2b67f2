"""Training building blocks: losses, the prototype memory, schedulers, checkpoints.

The stage-1 / stage-2 loops build on these; nothing here depends on the model code.
"""
from muva_core.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
    unwrap_model,
)
from muva_core.train.losses import (
    STAGE2_TERMS,
    MUVALoss,
    cmp_loss,
    cross_entropy_label_smooth,
    i2tce_loss,
    imp_loss,
    mask_loss,
)
from muva_core.train.memory import PrototypeMemory, all_gather_variable
from muva_core.train.schedulers import WarmupCosineLR, WarmupMultiStepLR, make_param_groups

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
    "save_checkpoint",
    "unwrap_model",
    "STAGE2_TERMS",
    "MUVALoss",
    "cmp_loss",
    "cross_entropy_label_smooth",
    "i2tce_loss",
    "imp_loss",
    "mask_loss",
    "PrototypeMemory",
    "all_gather_variable",
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "make_param_groups",
]
