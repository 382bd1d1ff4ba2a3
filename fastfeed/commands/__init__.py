"""Subcommands of the ``fastfeed`` CLI; see :mod:`fastfeed.cli` for the contract."""
