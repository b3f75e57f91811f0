"""Records -> examples -> batches: sources, the cache, the gist template, compact examples, collation,
packing and per-rank batching."""

from .collate import pad_batch
from .examples import IGNORE, Examples
from .records import DataError, DataStats
from .sources import load_records
from .template import GistTemplate

__all__ = ["IGNORE", "DataError", "DataStats", "Examples", "GistTemplate", "load_records", "pad_batch"]
