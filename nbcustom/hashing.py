"""Content hashes shared by the api and the engines."""

from __future__ import annotations

import hashlib


def frame_sha256(frame) -> str:
    """A stable content hash of a DataFrame's rows and columns."""
    import pandas as pd

    digest = hashlib.sha256(",".join(map(str, frame.columns)).encode())
    digest.update(pd.util.hash_pandas_object(frame.astype(str), index=False).values.tobytes())
    return digest.hexdigest()
