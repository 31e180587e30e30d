"""Match a finished run's features again under another matcher: ``python rematch.py --help``."""

from saeot.cli import rematch_main

if __name__ == "__main__":
    rematch_main()
