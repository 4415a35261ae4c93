"""Writes corpus.jsonl beside this file: real English text with documents of varied length for the
pretrain_gpt.py tests, from the docstrings of Python's standard library (PSF licence), read with
ast (no module is imported). One document per module, class or function docstring of at least 40
characters, in a fixed order, until about 300 KB. Run with Python 3.11 to remake the shipped file:
    python tests/data/make_corpus.py
"""
import ast
import json
import os
import sysconfig

# Modules with long, plain-prose docstrings; the order fixes the corpus.
MODULES = ("argparse", "ast", "asyncio/events", "base64", "bisect", "calendar", "collections/__init__", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "email/message", "enum", "fractions", "ftplib",
           "functools", "gettext", "heapq", "http/client", "imaplib", "inspect", "ipaddress", "json/__init__",
           "logging/__init__", "mailbox", "pathlib", "pickle", "pprint", "random", "shutil", "smtplib",
           "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest/case",
           "urllib/parse", "uuid", "zipfile")
LIMIT = 300_000


def docstrings(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= 40:
                yield text


def main():
    stdlib, size, out = sysconfig.get_paths()["stdlib"], 0, []
    seen = set()
    for name in MODULES:
        for text in docstrings(os.path.join(stdlib, name + ".py")):
            if text not in seen and size < LIMIT:
                seen.add(text)
                out.append(json.dumps({"text": text}))
                size += len(out[-1]) + 1
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus.jsonl"), "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
