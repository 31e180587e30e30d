"""Evaluate matchers (synthetic ground truth) or a finished run: ``python evaluate.py --help``."""

from saeot.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
