"""The accepted forms of ``spec.path``, as one table shared by the CRD's CEL rules and the Python check.

Admission (CEL in the CRD) and the operator/worker (pydantic) must refuse the same paths with the
same words, so each rule is written once here: a regex that CEL's ``matches()`` and Python's ``re``
both understand (RE2 subset), and the message a user sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

ACCEPTED_FORMS = (
    "a Hugging Face repo id (org/name or hf://org/name), an absolute local path (/dir or file:///dir), "
    "or s3://bucket/prefix"
)

# One name segment of a Hugging Face repo id (the Hub allows letters, digits, '-', '_', '.').
_HF_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HF_REPO = rf"^(hf://)?{_HF_PART}/{_HF_PART}$"
LOCAL = r"^(file://)?/.*$"
# S3 bucket naming rules: 3-63 chars, lower case, digits, '.', '-'.
S3 = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
DOT_DOT = r"(^|/)\.\.(/|$)"
# The schema's own pattern on spec.path (no spaces anywhere), beside the CEL rules.
PATH_PATTERN = r"^\S+$"

PATH_MAX_LENGTH = 1024


def _cel_string(regex: str) -> str:
    """A CEL string literal for ``regex`` (CEL strings treat backslash as an escape)."""
    return "'" + regex.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class PathRule:
    """One admission rule on spec.path: ``rule`` is CEL over ``self`` (the path string)."""

    rule: str
    message: str


PATH_RULES: tuple[PathRule, ...] = (
    PathRule(
        rule=" || ".join(f"self.matches({_cel_string(p)})" for p in (HF_REPO, LOCAL, S3)),
        message=f"path must be {ACCEPTED_FORMS}; relative paths and other schemes are not accepted",
    ),
    PathRule(
        rule=f"!self.matches({_cel_string(DOT_DOT)})",
        message="path must not contain '..' segments: give the adapter's directory itself",
    ),
)

SourceKind = Literal["hf", "local", "s3"]


def path_problems(path: str) -> list[str]:
    """Messages of every rule on spec.path that ``path`` breaks (empty when it is accepted): what
    admission answers, so the worker, given a path from anywhere, answers the same."""
    problems = []
    if not re.fullmatch(r"\S+", path) or len(path) > PATH_MAX_LENGTH:  # PATH_PATTERN ($ in re: before a \n)
        problems.append(f"path must be 1 to {PATH_MAX_LENGTH} characters without spaces")
    if not any(re.search(p, path) for p in (HF_REPO, LOCAL, S3)):
        problems.append(PATH_RULES[0].message)
    if re.search(DOT_DOT, path):
        problems.append(PATH_RULES[1].message)
    return problems


def source_kind(path: str) -> SourceKind:
    """Which kind of source an accepted path names; call only on paths with no path_problems()."""
    if path.startswith("s3://"):
        return "s3"
    if path.startswith(("/", "file://")):
        return "local"
    return "hf"


def location(path: str) -> str:
    """An accepted path without its scheme: org/name, /abs/dir, bucket/prefix (no trailing slash)."""
    for scheme in ("hf://", "file://", "s3://"):
        if path.startswith(scheme):
            path = path[len(scheme) :]
            break
    return path.rstrip("/") or "/"
