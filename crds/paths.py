"""The accepted forms of ``spec.path``: one row per kind of source, shared by the CRD's CEL rules and
the Python check.

Admission (CEL in the CRD) and the operator/worker (pydantic) must refuse the same paths with the
same words, so each form is written once here: a regex that CEL's ``matches()`` and Python's ``re``
both understand (RE2 subset), and how the form is shown to a user. The grammar is the API's, so it
lives here (the operator checks paths without importing the worker); the worker's client for each
kind is a module of ``loraplane.worker.sources``, registered under the same ``kind``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PathForm:
    """One accepted form of spec.path: the kind of source it names and the regex that recognises it."""

    kind: str
    """Key of the source: the worker's client module registers under it; also ResolvedSource.kind."""
    pattern: str
    """RE2 regex (CEL matches() and Python re agree on it) over the whole path."""
    shown: str
    """How the form reads in messages and the CRD's description."""
    schemes: tuple[str, ...]
    """Prefixes stripped to get the location (the part the source's client reads)."""


# One name segment of a Hugging Face repo id (the Hub allows letters, digits, '-', '_', '.').
_HF_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"

FORMS: tuple[PathForm, ...] = (
    PathForm(
        "hf",
        rf"^(hf://)?{_HF_PART}/{_HF_PART}$",
        "a Hugging Face repo id (org/name or hf://org/name)",
        ("hf://",),
    ),
    PathForm("local", r"^(file://)?/.*$", "an absolute local path (/dir or file:///dir)", ("file://",)),
    # S3 bucket naming rules: 3-63 chars, lower case, digits, '.', '-'.
    PathForm("s3", r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", "s3://bucket/prefix", ("s3://",)),
    # Cloud Storage bucket names: 3-63 chars, lower case, digits, '.', '-', '_'.
    PathForm("gs", r"^gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9](/.*)?$", "gs://bucket/prefix", ("gs://",)),
)
FORMS_BY_KIND = {f.kind: f for f in FORMS}

HF_REPO, LOCAL, S3 = (FORMS_BY_KIND[k].pattern for k in ("hf", "local", "s3"))
DOT_DOT = r"(^|/)\.\.(/|$)"
# The schema's own pattern on spec.path (no spaces anywhere), beside the CEL rules.
PATH_PATTERN = r"^\S+$"

PATH_MAX_LENGTH = 1024

ACCEPTED_FORMS = ", ".join(f.shown for f in FORMS[:-1]) + f", or {FORMS[-1].shown}"


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
        rule=" || ".join(f"self.matches({_cel_string(f.pattern)})" for f in FORMS),
        message=f"path must be {ACCEPTED_FORMS}; relative paths and other schemes are not accepted",
    ),
    PathRule(
        rule=f"!self.matches({_cel_string(DOT_DOT)})",
        message="path must not contain '..' segments: give the adapter's directory itself",
    ),
)

SourceKind = str
"""A PathForm.kind: "hf", "local", "s3", ..."""


def path_problems(path: str) -> list[str]:
    """Messages of every rule on spec.path that ``path`` breaks (empty when it is accepted): what
    admission answers, so the worker, given a path from anywhere, answers the same."""
    problems = []
    if not re.fullmatch(r"\S+", path) or len(path) > PATH_MAX_LENGTH:  # PATH_PATTERN ($ in re: before a \n)
        problems.append(f"path must be 1 to {PATH_MAX_LENGTH} characters without spaces")
    if _form(path) is None:
        problems.append(PATH_RULES[0].message)
    if re.search(DOT_DOT, path):
        problems.append(PATH_RULES[1].message)
    return problems


def _form(path: str) -> PathForm | None:
    return next((f for f in FORMS if re.search(f.pattern, path)), None)


def source_kind(path: str) -> SourceKind:
    """Which kind of source an accepted path names; call only on paths with no path_problems()."""
    form = _form(path)
    if form is None:
        raise ValueError(f"{path!r}: {PATH_RULES[0].message}")
    return form.kind


def location(path: str) -> str:
    """An accepted path without its scheme: org/name, /abs/dir, bucket/prefix (no trailing slash)."""
    form = _form(path)
    for scheme in form.schemes if form else ():
        if path.startswith(scheme):
            path = path[len(scheme) :]
            break
    return path.rstrip("/") or "/"
