"""Code the tests share (oracles, small builders): imported as ``helpers.<module>``; pytest puts
tests/ on sys.path (rootdir-relative "prepend" import mode, tests/ has no __init__.py)."""
