"""Real English text that installs offline: the documentation strings of Python's standard
library, as sentences. Deterministic for a given Python version (3.11 here)."""

from __future__ import annotations

import functools
import importlib
import inspect
import re

MODULES = ("abc", "argparse", "array", "base64", "bisect", "calendar", "collections", "contextlib",
           "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum",
           "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
           "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging",
           "mailbox", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint",
           "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
           "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
           "typing", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref",
           "xml.dom.minidom", "zipfile", "zlib")

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _docstrings():
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(module) or ""
        for attribute in sorted(vars(module)):
            if attribute.startswith("_"):
                continue
            value = getattr(module, attribute)
            if (inspect.isfunction(value) or inspect.isclass(value)) and \
                    getattr(value, "__module__", None) == module.__name__:
                yield inspect.getdoc(value) or ""


@functools.lru_cache(maxsize=1)
def stdlib_text() -> str:
    """All the docstrings, one after another (for language modelling)."""
    return "\n\n".join(doc for doc in _docstrings() if doc)


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Distinct prose sentences of 6 to 40 words (code and tables filtered out)."""
    found, seen = [], set()
    for doc in _docstrings():
        for paragraph in doc.split("\n\n"):
            text = " ".join(paragraph.split())
            if not text or text.startswith((">>>", "-", "*", "|")) or "::" in text:
                continue
            for sentence in _SENTENCE.split(text):
                words = sentence.split()
                letters = sum(ch.isalpha() for ch in sentence)
                if 6 <= len(words) <= 40 and letters > 0.7 * len(sentence) \
                        and sentence[-1] in ".!?" and sentence not in seen:
                    seen.add(sentence)
                    found.append(sentence)
    return tuple(found)
