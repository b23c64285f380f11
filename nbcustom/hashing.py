"""Content hashes shared by the api and the engines."""

from __future__ import annotations

import hashlib


def frame_sha256(frame) -> str:
    """A stable content hash of a DataFrame's rows and columns."""
    return frames_sha256(frame.columns, [frame])


def frames_sha256(columns, frames) -> str:
    """``frame_sha256`` of rows that come as several DataFrames, in order."""
    import pandas as pd

    digest = hashlib.sha256(",".join(map(str, columns)).encode())
    for frame in frames:
        digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).values.tobytes())
    return digest.hexdigest()
