"""ValidatingAdmissionPolicy: CEL validations the server evaluates on writes (admissionregistration.k8s.io/v1).

A write is checked against every binding whose policy matches it, after schema validation, as
kube-apiserver's ValidatingAdmissionPolicy plugin does. The subset (docs/localkube.md):
matchConstraints and the binding's matchResources (resourceRules with ``*`` and ``resource/subresource``,
excludeResourceRules, namespaceSelector and objectSelector with matchLabels and matchExpressions),
the policy's matchConditions, validations (expression, message, messageExpression, reason) with the
variables ``object``, ``oldObject``, ``request`` (operation, namespace, name, subResource, dryRun,
kind, resource), ``namespaceObject`` and ``variables`` (spec.variables), and validationActions Deny
and Warn (Audit is accepted and does nothing here). failurePolicy: an expression that errors denies
under Fail and is skipped under Ignore. Not evaluated: paramKind / paramRef (a binding with a paramRef
is skipped), auditAnnotations, type checking (no status), the DELETE and CONNECT operations.
CEL runs on the evaluator of CRD validation rules (cel.py).
"""

from __future__ import annotations

from typing import Any

from loraplane.localkube import cel
from loraplane.localkube.resources import ResourceType
from loraplane.localkube.status import ApiError

Obj = dict[str, Any]
GROUP = "admissionregistration.k8s.io"
POLICIES = "validatingadmissionpolicies"
BINDINGS = "validatingadmissionpolicybindings"
# The reasons a validation may give, and the HTTP code each answers with.
_CODES = {"Unauthorized": 401, "Forbidden": 403, "Invalid": 422, "RequestEntityTooLarge": 413}


def check(
    cluster: Any,
    rt: ResourceType,
    operation: str,
    obj: Obj | None,
    old: Obj | None,
    subresource: str = "",
    dry_run: bool = False,
) -> list[str]:
    """Warnings from Warn bindings; raises ApiError for the first Deny binding whose validation fails."""
    policies_rt = cluster.find_type(GROUP, "v1", POLICIES)
    bindings_rt = cluster.find_type(GROUP, "v1", BINDINGS)
    if policies_rt is None or bindings_rt is None or rt.plural in (POLICIES, BINDINGS):
        return []
    bindings = list(cluster.store.items(bindings_rt.storage))
    if not bindings:
        return []
    subject = obj if obj is not None else old or {}
    meta = subject.get("metadata") or {}
    ns = meta.get("namespace", "") if rt.namespaced else ""
    namespace = cluster.store.get("/namespaces", "", ns) if ns else None
    request = {
        "operation": operation,
        "namespace": ns,
        "name": meta.get("name", ""),
        "subResource": subresource,
        "dryRun": dry_run,
        "kind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
        "resource": {"group": rt.group, "version": rt.version, "resource": rt.plural},
        "userInfo": {},
    }
    activation: Obj = {
        "object": obj,
        "oldObject": old,
        "request": request,
        "namespaceObject": namespace,
        "params": None,
    }
    warnings: list[str] = []
    for binding in sorted(bindings, key=lambda b: b["metadata"]["name"]):
        spec = binding.get("spec") or {}
        if spec.get("paramRef"):
            continue  # params are not supported (see the module docstring)
        policy = cluster.store.get(policies_rt.storage, "", spec.get("policyName", ""))
        if policy is None:
            continue
        pspec = policy.get("spec") or {}
        where = (rt, operation, subresource, subject, namespace)
        if not _matches(pspec.get("matchConstraints") or {}, *where):
            continue
        if spec.get("matchResources") and not _matches(spec["matchResources"], *where):
            continue
        act = {**activation, "variables": _variables(pspec, activation)}
        fail_closed = pspec.get("failurePolicy", "Fail") == "Fail"
        if not _conditions_hold(pspec.get("matchConditions") or [], act, fail_closed):
            continue
        message = _first_failure(pspec.get("validations") or [], act, fail_closed)
        if message is None:
            continue
        text, reason = message
        actions = spec.get("validationActions") or []
        who = f"ValidatingAdmissionPolicy '{policy['metadata']['name']}' with binding '{binding['metadata']['name']}'"
        if "Warn" in actions:
            warnings.append(f"Validation failed for {who}: {text}")
        if "Deny" in actions:
            raise _denied(rt, meta.get("name", ""), f"{who} denied request: {text}", reason)
    return warnings


def _denied(rt: ResourceType, name: str, message: str, reason: str) -> ApiError:
    """kube-apiserver's answer: admission.NewForbidden's message, then the validation's reason and code."""
    qualified = f"{rt.plural}.{rt.group}" if rt.group else rt.plural
    details: Obj = {"name": name, "group": rt.group, "kind": rt.plural, "causes": [{"message": message}]}
    if not rt.group:
        details.pop("group")
    return ApiError(_CODES.get(reason, 422), f'{qualified} "{name}" is forbidden: {message}', reason, details)


def _variables(pspec: Obj, activation: Obj) -> Obj:
    out: Obj = {}
    for var in pspec.get("variables") or []:
        ok, value = _run(var.get("expression", ""), {**activation, "variables": out})
        out[var.get("name", "")] = value if ok else None
    return out


def _run(expression: str, activation: Obj) -> tuple[bool, Any]:
    try:
        return True, cel._program(expression)(activation)
    except Exception as e:  # compile errors and runtime errors (no such key) alike
        return False, str(e)


def _conditions_hold(conditions: list[Obj], act: Obj, fail_closed: bool) -> bool:
    for cond in conditions:
        ok, value = _run(cond.get("expression", ""), act)
        if not ok:
            return fail_closed  # an error: Fail still applies the policy (and its validations decide)
        if value is not True:
            return False
    return True


def _first_failure(validations: list[Obj], act: Obj, fail_closed: bool) -> tuple[str, str] | None:
    """(message, reason) of the first validation that is not true, or None when all pass."""
    for v in validations:
        expression = v.get("expression", "")
        ok, value = _run(expression, act)
        if ok and value is True:
            continue
        if not ok and not fail_closed:
            continue
        reason = v.get("reason") or "Invalid"
        if not ok:
            return f"expression '{expression}' resulted in error: {value}", reason
        message = v.get("message") or f"failed expression: {expression}"
        if v.get("messageExpression"):
            got, text = _run(v["messageExpression"], act)
            if got and isinstance(text, str) and text.strip():
                message = text
        return message, reason
    return None


def _matches(
    match: Obj, rt: ResourceType, operation: str, subresource: str, subject: Obj, namespace: Obj | None
) -> bool:
    """MatchResources: a resource rule matches and no exclude rule does; the selectors hold."""
    name = (subject.get("metadata") or {}).get("name", "")
    rules = match.get("resourceRules")
    if rules is not None and not any(_rule(r, rt, operation, subresource, name) for r in rules):
        return False
    if any(_rule(r, rt, operation, subresource, name) for r in match.get("excludeResourceRules") or []):
        return False
    if rt.namespaced and "namespaceSelector" in match:
        labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
        if not _selects(match["namespaceSelector"], labels):
            return False
    if "objectSelector" in match:
        labels = (subject.get("metadata") or {}).get("labels") or {}
        if not _selects(match["objectSelector"], labels):
            return False
    return True


def _rule(rule: Obj, rt: ResourceType, operation: str, subresource: str, name: str) -> bool:
    def has(values: list[str] | None, value: str) -> bool:
        return bool(values) and ("*" in values or value in values)  # type: ignore[operator]

    if not has(rule.get("operations"), operation):
        return False
    if not has(rule.get("apiGroups"), rt.group) or not has(rule.get("apiVersions"), rt.version):
        return False
    names = rule.get("resourceNames")
    if names and name not in names:
        return False
    want = f"{rt.plural}/{subresource}" if subresource else rt.plural
    for resource in rule.get("resources") or []:
        main, _, sub = resource.partition("/")
        if resource in ("*", want) or (main == "*" and sub == subresource and subresource):
            return True
        if sub == "*" and main == rt.plural:
            return True
    return False


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
