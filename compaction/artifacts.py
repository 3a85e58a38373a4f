"""Atomic outputs: everything a stage writes appears whole or not at all.

A file is written to a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX within one filesystem), so a killed process never
leaves a half-written Parquet file or checkpoint behind under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it onto ``path`` on success.

    An existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, schema: pa.Schema | None = None) -> Path:
    """Write ``df`` to ``path`` atomically; returns the final path."""
    path = Path(path)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _parquet_read(path: Path, read):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Parquet file")
    try:
        return read(path)
    except Exception as exc:  # pyarrow's messages (e.g. "magic bytes not found") leave out the file
        raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from exc


def parquet_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a Parquet file (its schema only), failing with the file named."""
    import pyarrow.parquet as pq

    return _parquet_read(Path(path), lambda p: pq.read_schema(p).names)


def read_parquet(path: str | os.PathLike, required: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a Parquet file, failing with the file and the missing columns named."""
    path = Path(path)
    df = _parquet_read(path, pd.read_parquet)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; has {list(df.columns)}")
    return df
