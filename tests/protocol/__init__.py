"""The protocol parity cases, collected by ``tests/test_protocol_parity.py``."""
