"""Private JSON data objects on a token: what iscl-hsm keeps beside the keys.

Key records (:mod:`.key_records`), the dual-control policy and witnesses (:mod:`iscl_hsm.keys.policy`)
and the audit anchors (:mod:`iscl_hsm.keys.anchor`) are each a private token CKO_DATA object whose
CKA_APPLICATION says what it is, whose CKA_LABEL names what it is about, and whose CKA_VALUE is a JSON
object. A data object's value cannot change on SoftHSM2, so an update creates the new object, then
destroys the old one.
"""

from __future__ import annotations

import json
from typing import Any

from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

__all__ = ["create_data_object", "data_objects"]


def data_objects(
    session: Any, application: str, label: str | None = None
) -> list[tuple[Any, dict[str, Any] | None]]:
    """(object, its JSON object, or None when unreadable) of the data objects of ``application``
    (and ``label``). An object destroyed meanwhile by another process is left out."""
    template = {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application}
    if label is not None:
        template[Attribute.LABEL] = label
    found = []
    for obj in session.get_objects(template):
        try:
            value = json.loads(bytes(obj[Attribute.VALUE]))
        except p11.ObjectHandleInvalid:
            continue
        except ValueError:
            value = None
        found.append((obj, value if isinstance(value, dict) else None))
    return found


def create_data_object(session: Any, application: str, label: str, value: dict[str, Any]) -> Any:
    """A new private token data object of ``application`` and ``label`` holding ``value`` as JSON."""
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.APPLICATION: application,
            Attribute.LABEL: label,
            Attribute.VALUE: json.dumps(value).encode(),
        }
    )
