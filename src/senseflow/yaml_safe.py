"""Reading user YAML without silent surprises.

``yaml.safe_load`` already refuses to build arbitrary objects, but it (1) keeps the LAST of two
equal keys in a mapping, so a config with ``train:`` twice silently loses the first block, and
(2) expands aliases without limit when the result is walked (a "billion laughs" file is a few
hundred bytes and fills all memory once pydantic validates it).  :func:`load_yaml_text` refuses
both, and files larger than any config could reasonably be, with a one-line
:class:`~senseflow.teachers.base.SenseflowError`.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode

from .teachers.base import SenseflowError

#: no run config (nor prompt list in YAML) comes close to this; refusing bigger input bounds parse time
MAX_BYTES = 4 * 1024 * 1024
#: anchors are handy (one LoRA block reused); thousands of alias uses are an attack, not a config
MAX_ALIASES = 256
#: scalars + containers after alias expansion
MAX_NODES = 1_000_000


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and counts alias uses."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.alias_count = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise SenseflowError(f"more than {MAX_ALIASES} YAML aliases (*name) near line {mark.line + 1}: "
                                     "refusing a file that may expand without bound")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the stock loader reports unhashable keys itself
            if key in seen:
                raise SenseflowError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                                     f"{seen[key]}): YAML would silently keep only the last one; merge the two")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _count_nodes(data: Any, budget: int) -> int:
    """Nodes in ``data`` with aliases expanded, stopping as soon as ``budget`` is exceeded."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def load_yaml_text(text: str, what: str) -> Any:
    """Parse ``text`` (named ``what`` in errors) with :class:`StrictSafeLoader` and the size limits."""
    if len(text) > MAX_BYTES:
        raise SenseflowError(f"{what} is {len(text)} characters long (limit {MAX_BYTES}): not a config file")
    loader = StrictSafeLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    if _count_nodes(data, MAX_NODES) > MAX_NODES:
        raise SenseflowError(f"{what} expands to more than {MAX_NODES} values (YAML aliases): refusing it")
    return data
