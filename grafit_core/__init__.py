"""Grafit (Touvron et al., ICCV 2021) in plain PyTorch: models, losses, memory, metrics, data, engine.

Never imports Ray or MLflow: those live in `orchestrator/`.
"""

__version__ = "0.1.0"
