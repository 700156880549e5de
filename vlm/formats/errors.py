"""The one exception the data stages raise for a sample that should be skipped and counted.

Anything else a stage raises is a bug or a configuration error and stops the run; `BadSample` means
"this record is unusable, drop it". The pipeline counts skips per `reason` (a short fixed identifier such
as ``"image_truncated"``) and aborts past `data.max_bad_fraction`.
"""

from __future__ import annotations


class BadSample(Exception):
    """A sample to skip. `reason` is a short identifier used for counting; `detail` is for the log only."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Raised inside DataLoader workers and re-raised in the main process: keep reason and detail apart.
        return type(self), (self.reason, self.detail)
