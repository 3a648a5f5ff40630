"""geohier: hierarchical geolocation of street-level photos on a lat/lon quadtree."""

from geohier.errors import GeohierError

__all__ = ["GeohierError"]
__version__ = "0.1.0"
