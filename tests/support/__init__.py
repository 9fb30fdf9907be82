"""What the tests import besides fixtures (conftest.py defines only fixtures and hooks)."""
