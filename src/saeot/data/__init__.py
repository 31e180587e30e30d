"""Text sources and the LightningDataModule that streams hidden states."""
