"""fedbgmd: Byzantine-robust federated learning simulation with FL-BGMD on Flower, PyTorch, Hydra."""

__version__ = "0.1.0"
