"""The protocol parity cases, collected by ``tests/evaluate/test_protocol_parity.py``."""
