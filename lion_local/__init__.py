"""lion-local: Lion's adversarial distillation loop, self-hosted."""

__version__ = "0.1.0"
