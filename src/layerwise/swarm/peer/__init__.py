"""The serving side of the swarm (like Petals' server/): a peer holds spans of layers and runs them."""

from .server import Peer, PeerOptions, serve

__all__ = ["Peer", "PeerOptions", "serve"]
