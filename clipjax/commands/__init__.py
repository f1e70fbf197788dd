"""One module per `clipjax` subcommand: HELP, add_arguments(parser), run(args) -> int."""
