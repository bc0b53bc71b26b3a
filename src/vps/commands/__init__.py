"""One module per ``vps`` subcommand, each with ``add_arguments(parser)`` and ``run(args)``."""
