"""Build the vendored English-prose corpus ``quant/data/python_docs.jsonl.gz`` from Debian's python3.11-doc.

Source: the reStructuredText sources (``html/_sources/**/*.rst.txt``) of the Python 3.11 documentation as
shipped by the Debian package ``python3.11-doc`` (bookworm, 3.11.2-6+deb12u9), licensed under the PSF
License Agreement version 2 (see ``quant/data/PYTHON_DOCS_LICENSE``). The cleaner keeps English prose:
it drops code and doctest blocks, tables, directives that hold no prose (toctree, index, productionlist,
...), section under/overlines, comments and the changelog, and strips inline markup (roles, literals,
links, emphasis). Each source file becomes one document ``{"id": relative path, "text": paragraphs}``.

Reproduce (any machine reaching Debian's archive)::

    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/build_corpus.py /tmp/pydoc/usr/share/doc/python3.11/html/_sources quant/data/python_docs.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

#: directives whose body is prose worth keeping (dedented); every other directive's body is dropped
PROSE_DIRECTIVES = frozenset(
    {
        "note", "warning", "seealso", "versionadded", "versionchanged", "deprecated", "attention",
        "important", "tip", "caution", "admonition", "impl-detail", "function", "method", "class",
        "attribute", "data", "exception", "module", "classmethod", "staticmethod", "decorator",
        "describe", "opcode", "cmdoption", "option", "envvar", "glossary", "topic", "sidebar",
        "abstractmethod", "coroutinefunction", "coroutinemethod", "decoratormethod", "c:function",
        "c:type", "c:member", "c:macro", "c:var", "c:struct", "pdbcommand", "rubric", "availability",
        "deprecated-removed", "centered", "hlist", "only",
    }
)
SKIP_FILES = ("whatsnew/changelog.rst.txt",)
UNDERLINE = re.compile(r"^\s*([=\-~*^#+\"'`:.])\1{2,}\s*$")
DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")
ROLE = re.compile(r":[\w:+-]+:`(?:[!~])?([^`<]*?)(?:\s*<[^`>]*>)?`")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
REF = re.compile(r"`([^`]+)`_{1,2}")
LITERAL = re.compile(r"``([^`]+)``")
INTERP = re.compile(r"`([^`]+)`")
EMPH = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
SUBST = re.compile(r"\|([\w-]+)\|")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(text: str) -> str:
    text = ROLE.sub(lambda m: m.group(1).strip(), text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = REF.sub(r"\1", text)
    text = INTERP.sub(r"\1", text)
    text = EMPH.sub(lambda m: m.group(1) or m.group(2), text)
    text = SUBST.sub(r"\1", text)
    text = text.replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < 6:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    if letters / len(paragraph) < 0.85:
        return False
    return paragraph[0].isalnum() or paragraph[0] in "\"'(“"


def clean_rst(source: str) -> str:
    """English paragraphs of one reStructuredText document, one paragraph per line block."""
    lines = source.replace("\t", "    ").splitlines()
    out: list[str] = []
    skip_deeper_than: int | None = None  # drop lines indented more than this (a dropped block's body)
    literal_next = False  # previous paragraph ended with '::' -> next indented block is code
    para: list[str] = []
    para_indent = 0

    def flush() -> None:
        nonlocal para
        if para:
            text = " ".join(p.strip() for p in para)
            if text.endswith("::"):
                text = text[:-1]
            text = _inline(text)
            if _is_prose(text):
                out.append(text)
        para = []

    for line in lines:
        stripped = line.strip()
        ind = _indent(line)
        if skip_deeper_than is not None:
            if not stripped or ind > skip_deeper_than:
                continue
            skip_deeper_than = None
        if not stripped:
            if para and para[-1].rstrip().endswith("::"):
                literal_next = True
            flush()
            continue
        if literal_next:
            literal_next = False
            if ind > para_indent:
                skip_deeper_than = para_indent
                continue
        if UNDERLINE.match(line) or stripped.startswith(("+-", "+=", "|", ">>>", "...")):
            flush()
            if stripped.startswith((">>>", "...")):
                # doctest output lines follow at the same indent until a blank line
                skip_deeper_than = -1 if ind == 0 else ind - 1
            continue
        m = DIRECTIVE.match(line)
        if m:
            flush()
            name = m.group(2)
            if name not in PROSE_DIRECTIVES:
                skip_deeper_than = ind
            continue
        if COMMENT_OR_TARGET.match(line):
            flush()
            skip_deeper_than = ind
            continue
        if re.match(r"^:[\w -]+:(\s|$)", stripped):  # field list (":param x:")
            flush()
            para_indent = ind
            para = [re.sub(r"^:[\w -]+:(\s+|$)", "", stripped)]
            continue
        if stripped.startswith(("* ", "- ", "#. ")) or re.match(r"^\d+\.\s", stripped):
            flush()
            para_indent = ind
            para = [re.sub(r"^(\*|-|#\.|\d+\.)\s+", "", stripped)]
            continue
        if not para:
            para_indent = ind
        para.append(stripped)
    flush()
    return "\n".join(out)


def build(sources: Path) -> list[dict[str, str]]:
    docs: list[dict[str, str]] = []
    for path in sorted(sources.rglob("*.rst.txt")):
        rel = path.relative_to(sources).as_posix()
        if rel in SKIP_FILES:
            continue
        text = clean_rst(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= 400:
            docs.append({"id": rel, "text": text})
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", type=Path, help="the html/_sources folder of python3.11-doc")
    parser.add_argument("output", type=Path, help="output .jsonl.gz")
    args = parser.parse_args(argv)
    docs = build(args.sources)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(args.output, "wb", mtime=0) as raw:  # mtime=0: byte-identical rebuilds
        for doc in docs:
            raw.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {chars} characters -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
