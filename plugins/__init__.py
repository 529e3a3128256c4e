"""The norms bundled with normzoo, installed as the package ``normzoo_plugins``.

Each module is a plugin registered through the ``normzoo`` entry-point group in
pyproject.toml, exactly as a third party's package would register its own.
"""
