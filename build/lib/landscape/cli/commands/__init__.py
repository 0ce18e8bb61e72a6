"""One module per subcommand; each defines ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
landscape.cli.main discovers them, so adding a command is adding a file."""
