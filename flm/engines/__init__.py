"""Engine adapters: one interface, four kinds. Nothing above this package branches on kind."""
