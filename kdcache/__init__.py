"""kdcache: distil CLIP models from a cache of teacher outputs.

Run the big teacher once (`kdcache build`), train small students many times from the cache alone.
"""

__version__ = "0.1.0"
