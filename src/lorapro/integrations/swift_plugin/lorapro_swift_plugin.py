"""ms-swift external plugin: ``--external_plugins <this file> --callbacks lorapro``.

ms-swift imports this file by path; it registers lorapro's callbacks (``lorapro``,
``lorapro_zero``, ``lorapro_symmetric``) into ``swift.callbacks.callbacks_map``.
"""

from lorapro.integrations.swift import register

register()
