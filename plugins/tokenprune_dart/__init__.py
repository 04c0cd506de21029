"""The ``dart`` reducer (being written; registers nothing yet)."""
