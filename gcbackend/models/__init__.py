"""Reference models, written once against the array API and broadcasting over a batch axis.

``linear``: the notebook's 1-D model J = θ·x. ``mlp``: the notebook's fraud-detection net,
LINEAR→RELU→…→LINEAR→SIGMOID with mean binary cross-entropy, of any layer sizes.
"""

from . import linear, mlp

__all__ = ["linear", "mlp"]
