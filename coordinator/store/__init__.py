"""The state store port (base.py), its key layout (keys.py) and adapters."""
