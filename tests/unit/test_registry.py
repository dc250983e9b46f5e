"""The Kopf registrations of gpuyard, as ``build_registry`` makes them."""

from __future__ import annotations

from gpuyard.handlers.runtime import build_registry, index_service


def test_no_handler_needs_the_diff_base_that_the_operator_does_not_keep() -> None:
    # start-up installs runtime.NoDiffBase, which keeps no last-handled state: a change handler
    # (on.create, on.update, on.field) or a daemon or timer would then see every event
    # as new. Registering one means giving Kopf's default diff-base storage back.
    registry = build_registry()
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    assert registry._watching.get_all_handlers(), "gpuyard's event handlers are registered"


def test_cached_services_leave_out_the_copies_of_their_spec() -> None:
    applied = {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "team": "search"}
    body = {
        "metadata": {
            "name": "llama",
            "managedFields": [{"manager": "kubectl"}],
            "annotations": applied,
        },
        "spec": {"pool": "a100"},
    }

    [cached] = index_service(namespace="team-a", name="llama", body=body).values()

    assert cached == {
        "metadata": {"name": "llama", "annotations": {"team": "search"}},
        "spec": {"pool": "a100"},
    }
    assert body["metadata"]["managedFields"], "the event's own body is left as it was"
