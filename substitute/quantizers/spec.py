"""JSON round trip shared by the specs stored in quantizer.json."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

SpecT = TypeVar("SpecT", bound="JsonSpec")


class JsonSpec:
    """Mixin for spec dataclasses: `to_json` and a `from_json` that rejects fields this version does not know."""

    label: ClassVar[str] = "quantizer spec"  # what the spec is, for error messages
    tuple_fields: ClassVar[tuple[str, ...]] = ()  # fields JSON turns into lists, turned back into tuples

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls: type[SpecT], data: dict[str, Any]) -> SpecT:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.label} has unknown fields {unknown}: a newer version wrote it, so upgrade vq-transplant")
        data = dict(data)
        for name in cls.tuple_fields:
            data[name] = tuple(data[name])
        return cls(**data)
