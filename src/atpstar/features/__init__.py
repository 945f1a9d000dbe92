"""Feature circuits over dictionary latents: edges between latents of consecutive dictionaries and to the metric."""

from .circuit import FeatureCircuit, feature_circuit

__all__ = ["FeatureCircuit", "feature_circuit"]
