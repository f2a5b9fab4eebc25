"""Engine adapters: one interface (`base.py`), one descriptor per kind (`kinds.py`). Nothing
above this package branches on kind."""
