"""Files that survive a kill: append-only JSONL logs keyed by a record key, and atomic writes."""
from __future__ import annotations

import json
import os


class AppendLog:
    """Append-only JSONL file of records keyed by ``key_fn(record)``.

    Opening it reads every complete record; a torn last line (the process died mid-write) is cut off, so
    appending goes on from the last complete record. Each append is flushed and fsynced.
    """

    def __init__(self, path: str, key_fn):
        self.path = path
        self.key_fn = key_fn
        self.records: dict = {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        good_end = 0
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            pos = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:
                    break  # torn tail
                line = data[pos:nl]
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.records[key_fn(rec)] = rec
                pos = good_end = nl + 1
            if good_end < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good_end)
        self._f = open(path, "a", encoding="utf-8")

    def __contains__(self, key):
        return key in self.records

    def __len__(self):
        return len(self.records)

    def append(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records[self.key_fn(rec)] = rec

    def extend(self, recs) -> None:
        for r in recs:
            self._f.write(json.dumps(r, ensure_ascii=False) + "\n")
            self.records[self.key_fn(r)] = r
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False))


def write_jsonl_atomic(path: str, records) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str, field_name: str = "data") -> list[dict]:
    """Every record of a JSONL file; a missing file is an error naming the config field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{field_name}: no such file {path} (run `exgrpo ei` first)")
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]
