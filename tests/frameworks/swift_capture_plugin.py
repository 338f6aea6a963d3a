"""ms-swift external plugin for the tests: ``--callbacks capture_first_step`` (see capture.py)."""

from capture import CaptureFirstStep
from swift.callbacks import callbacks_map

callbacks_map["capture_first_step"] = CaptureFirstStep
