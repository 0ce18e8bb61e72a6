"""One module per subcommand; each defines ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
cli.main discovers them, so adding a command is adding a file."""
