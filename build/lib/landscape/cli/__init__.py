"""The ``landscape`` command: thin argument parsing over the library."""
