"""The ``sparsevlm`` reducer (being written; registers nothing yet)."""
