"""Built-in plugins, installed under the import name ``cambrian_plugins``."""
