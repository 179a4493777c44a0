"""PNGs for the study page: the source image rendered through dicom_io (the one pixel path), and
the heatmap overlays found at <data_dir>/heatmaps/<study>/<sop>.jpg."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from dicom_io import load_display_image

#: Longest side of a thumbnail, pixels.
THUMBNAIL_SIZE = 512
#: Thumbnails kept in memory (a page refresh must not decode every film again).
CACHE_ENTRIES = 64


class Thumbnails:
    """Source images as PNG thumbnails, cached by (path, size, mtime)."""

    def __init__(self, size: int = THUMBNAIL_SIZE, entries: int = CACHE_ENTRIES) -> None:
        self.size = size
        self.entries = entries
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, path: str | Path) -> bytes:
        """The image of the file at ``path`` (dicom_io.load_display_image) as a PNG; raises
        dicom_io.DicomInputError / OSError when it cannot be rendered."""
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        image = Image.fromarray(load_display_image(path).pixels)
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=False)
        data = buffer.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return data
