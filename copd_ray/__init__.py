"""copd-ray: Co-Evolving Policy Distillation as a Ray-native system of long-lived actors."""

__version__ = "0.1.0"
