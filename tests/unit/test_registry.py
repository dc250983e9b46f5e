"""The Kopf registrations of gpuyard, as ``build_registry`` makes them."""

from __future__ import annotations

from gpuyard.handlers.runtime import build_registry


def test_no_handler_needs_the_diff_base_that_the_operator_does_not_keep() -> None:
    # start-up installs runtime.NoDiffBase, which keeps no last-handled state: a change handler
    # (on.create, on.update, on.field) or a daemon or timer would then see every event
    # as new. Registering one means giving Kopf's default diff-base storage back.
    registry = build_registry()
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    assert registry._watching.get_all_handlers(), "gpuyard's event handlers are registered"
