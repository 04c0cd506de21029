"""The ``cdpruner`` reducer (being written; registers nothing yet)."""
