"""The ``pdrop`` reducer (being written; registers nothing yet)."""
