"""SAEs: providers (pretrained, from disk, trained locally), records of where each SAE came from,
folding, one training path on sae_lens, and checks against the model."""

from saeot.saes.checks import check_sae_widths, check_saes
from saeot.saes.codes import decode, encode
from saeot.saes.folding import encoder_bias, fold_sae, fold_scale, fold_threshold
from saeot.saes.providers import DiskSAEs, LocalSAESettings, LocalTrainedSAEs, PretrainedSAEs, SAEProvider
from saeot.saes.records import disk_record, load_recorded, pretrained_record
from saeot.saes.training import (
    ARCHITECTURES,
    SAETrainingConfig,
    build_training_sae,
    inference_sae,
    train_sae,
)

__all__ = [
    "SAEProvider",
    "PretrainedSAEs",
    "DiskSAEs",
    "LocalTrainedSAEs",
    "LocalSAESettings",
    "load_recorded",
    "disk_record",
    "pretrained_record",
    "check_sae_widths",
    "check_saes",
    "encode",
    "decode",
    "fold_scale",
    "fold_threshold",
    "fold_sae",
    "encoder_bias",
    "ARCHITECTURES",
    "SAETrainingConfig",
    "build_training_sae",
    "train_sae",
    "inference_sae",
]
