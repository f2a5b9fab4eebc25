"""Plain data, errors and pure functions. Imports nothing else of flm."""
