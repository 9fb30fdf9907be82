"""The fault-injection suite (``make chaos``): see ``chaos/suite.py``."""
