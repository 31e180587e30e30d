"""Profile SAE features, fit the reference space and match layers: ``python train.py --help``."""

from saeot.cli import train_main

if __name__ == "__main__":
    train_main()
