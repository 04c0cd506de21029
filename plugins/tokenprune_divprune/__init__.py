"""The ``divprune`` reducer (being written; registers nothing yet)."""
