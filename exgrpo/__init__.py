"""ExGRPO: Explanatory Inversion, SFT warm-up and multi-turn GRPO with the Dialogue Structure Utility bonus."""
__version__ = "0.1.0"
