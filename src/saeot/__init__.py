"""saeot: semantic optimal transport between sparse-autoencoder features.

Match SAE features across the layers of a language model, and compress feature
circuits into supernodes, with one distance: the Wasserstein distance between
activation-weighted distributions of the hidden states that express each feature.
"""

__version__ = "0.1.0"
