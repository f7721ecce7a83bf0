"""transferlab: config-driven transfer-learning experiments for image classifiers."""

from transferlab.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
