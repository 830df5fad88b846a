"""A tiny kopf operator for the kopf test: assigns an id in status, posts an event, handles deletion."""

import kopf

GROUP, VERSION, PLURAL = "demo.example.com", "v1alpha1", "widgets"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: object) -> None:
    settings.peering.lifetime = 10
    settings.peering.stealth = False
    settings.watching.server_timeout = 30


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(name, spec, body, patch, **_):  # type: ignore[no-untyped-def]
    new_id = 1000 + sum(ord(c) for c in name) % 1000
    patch.status["id"] = new_id
    patch.status["phase"] = "Created"
    kopf.info(body, reason="IdAssigned", message=f"assigned id {new_id} (size={spec.get('size')})")


@kopf.on.update(GROUP, VERSION, PLURAL)
def on_update(patch, **_):  # type: ignore[no-untyped-def]
    patch.status["phase"] = "Updated"


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(name, body, **_):  # type: ignore[no-untyped-def]
    kopf.info(body, reason="Deleting", message=f"deleting {name}")
