"""The comparison harness behind ``tokenprune compare``: tasks, metrics, results, reports."""
