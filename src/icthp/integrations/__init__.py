"""Integrations of icthp's scorers with other frameworks, each in its own module and behind its own extra.

- :mod:`icthp.integrations.ray`: Ray Data (``pip install "icthp[ray]"``): score a ``ray.data.Dataset`` of
  images and prompts with ``map_batches``, one scorer per actor.

Importing this package imports none of them (nor their frameworks).
"""
