"""deepserve: train, export and serve classic deep-learning models."""

__version__ = "0.1.0"
