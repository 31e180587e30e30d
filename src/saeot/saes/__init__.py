"""SAEs: providers (pretrained, from disk, trained locally), folding, one training path on sae_lens."""

from saeot.saes.folding import encoder_bias, fold_sae, fold_scale, fold_threshold
from saeot.saes.providers import (
    DiskSAEs,
    LocalTrainedSAEs,
    PretrainedSAEs,
    SAEProvider,
    check_sae_widths,
)

__all__ = [
    "SAEProvider",
    "PretrainedSAEs",
    "DiskSAEs",
    "LocalTrainedSAEs",
    "check_sae_widths",
    "fold_scale",
    "fold_threshold",
    "fold_sae",
    "encoder_bias",
]
