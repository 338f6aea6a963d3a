"""The folder of lorapro's ms-swift plugin file (see :mod:`lorapro.integrations.swift`)."""
