"""Implementations of the command-line subcommands (parsers live in ``qmambair.cli``)."""
