"""Training and evaluation of J-RAS on one site's data."""

from jras_core.training.evaluate import evaluate, predict
from jras_core.training.joint import JRASTrainer

__all__ = ["JRASTrainer", "evaluate", "predict"]
