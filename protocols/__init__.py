"""The protocol registry: datasets' class lists, named orders, splits and modes (protocols.md).

    from protocols import get_protocol, available_protocols, Protocol
"""

from .protocol import Protocol
from .registry import available_protocols, describe_protocols, get_protocol

__all__ = ["Protocol", "available_protocols", "describe_protocols", "get_protocol"]
