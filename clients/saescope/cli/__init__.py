"""The ``saescope`` command line (see ``saescope.cli.main``)."""
