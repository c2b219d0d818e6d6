"""The built-in crash scenario catalogue (``*.toml``) and its ``fixtures/``.

This folder is the source of truth; the build ships it inside the package as
``chaosfix.scenarios`` (see pyproject.toml) and ``chaosfix.scenario`` reads it with
importlib.resources, so a wheel, ``pip install .`` and an editable checkout behave alike.
"""
