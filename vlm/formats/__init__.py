"""Shared formats: the bottom layer, imported by the offline tools (`data_tools`) and by every part of `vlm`.

`constants` (values that several parts must agree on), `errors` (`BadSample`, the one "skip this record"
exception), `records` (the one set of rules for a conversation record), `pictures` (how a decoded picture
is read: upright, 8-bit, RGB), `scoring` (answers against references), `manifest` (the shard-set contract). Nothing here imports another part of `vlm` or `data_tools`.
"""
