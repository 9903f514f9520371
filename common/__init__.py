"""Torch-free pieces shared by the front end, the workers and the client."""

__version__ = "0.1.0"
