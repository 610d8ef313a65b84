"""Subcommands of the `paradiff` CLI; each module has `add_parser(subparsers)` and `run(args) -> int`."""
