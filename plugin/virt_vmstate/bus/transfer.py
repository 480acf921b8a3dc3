"""Capture the helpers on a bus into a bundle, and restore a bundle into them."""

from __future__ import annotations

import time

from ..core import bundle as bundle_mod
from ..core.bundle import Bundle, HelperState
from ..core.names import random_uuid
from ..errors import MissingHelpersError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Collection, Sequence

    from .vmstate1 import Helper, HelperBus


def capture(bus: HelperBus, ids: Collection[str] | None = None, *,
            domain_uuid: str | None = None,
            allowed_uids: Collection[int] | None = None) -> Bundle:
    """Save the helpers (every one, or exactly ``ids``, all checked before any Save)."""
    chosen = bus.select(bus.helpers(ids), ids, allowed_uids)
    states = bus.save(chosen)
    return bundle_mod.new_bundle((HelperState(i, d) for i, d in states.items()),
                                 created_ms=int(time.time() * 1000), migration_id=random_uuid(),
                                 domain_uuid=domain_uuid)


def restore(bus: HelperBus, bundle: Bundle, ids: Collection[str] | None = None, *,
            allowed_uids: Collection[int] | None = None,
            found: Sequence[Helper] | None = None) -> list[Helper]:
    """Load each helper from its record; every check passes before the first Load.

    ``found``: the helpers a wait on this bus has just listed, not asked for again."""
    wanted = set(bundle.ids) if ids is None else set(ids)
    no_record = wanted - set(bundle.ids)
    if no_record:
        raise MissingHelpersError("the bundle has no state for", no_record,
                                  hint="save those helpers on the source too")
    on_bus = bus.helpers(wanted) if found is None else found
    absent = wanted - {h.id for h in on_bus}
    if absent:
        raise MissingHelpersError(f"helpers with state in the bundle are not on bus {bus.address}",
                                  absent, hint="start them (in incoming mode) before loading")
    chosen = bus.select(on_bus, wanted, allowed_uids)
    bus.load(chosen, {h.id: bundle.state_of(h.id).data for h in chosen})  # type: ignore[union-attr]
    return chosen
