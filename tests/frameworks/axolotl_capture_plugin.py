"""axolotl plugin for the tests: ``plugins: [axolotl_capture_plugin.CapturePlugin]`` (see capture.py)."""

from axolotl.integrations.base import BasePlugin
from capture import CaptureFirstStep


class CapturePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [CaptureFirstStep()]
